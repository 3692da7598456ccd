"""Workdirs and files at bucket URLs: gs:// served by an in-memory fsspec file system, so no
code that reads or writes a run's files may assume a local path (and no network is used)."""
import os
import subprocess
import sys

from etils import epath
from etils.epath import backend, gpath
import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kswap_jax import checkpoints, export, metrics_log, npz, paths, sweep, workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Bucket(MemoryFileSystem):
  """gs:// in memory (a store of its own)."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]


@pytest.fixture
def bucket(monkeypatch):
  """epath's gs:// backend reads and writes an empty in-memory bucket."""
  _Bucket.store.clear()
  for protocol in _Bucket.protocol:
    fsspec.register_implementation(protocol, _Bucket, clobber=True)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # fsspec, not tf.io.gfile
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield _Bucket.store
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def test_urls_stay_urls_and_local_paths_become_absolute():
  assert paths.absolute("gs://b/runs/x") == "gs://b/runs/x"
  assert paths.absolute("runs/x") == os.path.join(os.getcwd(), "runs/x")
  assert str(paths.of("gs://b/runs/x") / "model") == "gs://b/runs/x/model"
  assert paths.is_url("s3://b/x") and not paths.is_url("/tmp/x")


def test_workdir_files_in_a_bucket(bucket):
  run = "gs://b/runs/r1"
  assert workdir.open_dir(run) == run
  config = ml_collections.ConfigDict(dict(seed=1, data=dict(eval_batch_size=8)))
  with workdir.lock(run):  # a bucket is not locked: the block runs
    workdir.check_config(run, config)
  with pytest.raises(workdir.UserError, match="different config"):
    workdir.check_config(run, ml_collections.ConfigDict(dict(seed=2, data=dict(
        eval_batch_size=8))))
  workdir.write_json(f"{run}/results.json", {"acc": 0.5})
  assert workdir.read_json(f"{run}/results.json") == {"acc": 0.5}
  assert not workdir.finished(run)
  workdir.mark_finished(run)
  assert workdir.finished(run)
  assert {os.path.basename(k) for k in bucket} == {
      "config.json", "environment.json", "results.json", "finished.json"}


def test_atomic_file_in_a_bucket_writes_nothing_on_error(bucket):
  with pytest.raises(RuntimeError):
    with workdir.atomic_file("gs://b/x.json") as f:
      f.write("half")
      raise RuntimeError
  assert not epath.Path("gs://b/x.json").exists()


def test_metrics_stream_and_plot_in_a_bucket(bucket):
  path = "gs://b/run/metrics.jsonl"
  for step in (1, 2):
    workdir.append_text(path, f'{{"kind": "train", "step": {step}}}\n')
  assert [r["step"] for r in metrics_log._read(path)] == [1, 2]  # pylint: disable=protected-access
  rows = [{"acc_r": 90.0, "acc_f": 5.0}, {"acc_r": 80.0, "acc_f": 1.0}]
  sweep.pareto_plot(rows, 0, "gs://b/run/pareto.png", ("acc_r", "Acc_R"), ("acc_f", "Acc_F"),
                    None)
  assert epath.Path("gs://b/run/pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_export_to_and_pretrained_npz_from_a_bucket(bucket, tmp_path):
  params = {"head": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
  checkpoints.export_model(str(tmp_path / "model"), params,
                           ml_collections.ConfigDict(dict(variant="Nano/4")), [])
  export.export(str(tmp_path / "model"), "npz", "gs://b/out/model.npz")
  read = npz.read_npz("gs://b/out/model.npz")
  np.testing.assert_array_equal(read["head/kernel"], np.ones((4, 3)))
  with pytest.raises(npz.UserError, match="not found"):
    npz.read_npz("gs://b/out/missing.npz")


def test_cli_keeps_a_bucket_workdir_and_makes_a_local_one_absolute(tmp_path):
  code = ("import sys; from kswap_jax import cli, runner; "
          "runner.run = lambda job, config, workdir: print('WORKDIR', workdir); "
          "cli.main(['kswap', 'pretrain', '--config', 'configs/pretrain_digits.py', "
          "'--workdir', sys.argv[1]])")
  for given, expected in (("gs://b/runs/p", "gs://b/runs/p"),
                          ("runs/p", os.path.join(ROOT, "runs/p"))):
    out = subprocess.run([sys.executable, "-c", code, given], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert f"WORKDIR {expected}\n" in out.stdout, out.stderr[-2000:]


def test_safetensors_weights_from_a_bucket(bucket, tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  from kswap_jax import torch_import  # pylint: disable=g-import-not-at-top
  tensors = {"head.weight": np.arange(12.0, dtype=np.float32).reshape(3, 4),
             "head.bias": np.ones(3, np.float32)}
  st.save_file(tensors, str(tmp_path / "m.safetensors"))
  epath.Path("gs://b/w/m.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes())
  local = torch_import.read_state(str(tmp_path / "m.safetensors"))
  remote = torch_import.read_state("gs://b/w/m.safetensors")
  assert sorted(remote) == sorted(tensors)
  for k, v in local.items():
    np.testing.assert_array_equal(remote[k], v)
  with pytest.raises(torch_import.UserError, match="not found"):
    torch_import.read_state("gs://b/w/missing.safetensors")


def test_eval_finds_the_pretrain_run_beside_a_bucket_model(bucket):
  from kswap_jax import runner  # pylint: disable=g-import-not-at-top
  epath.Path("gs://b/run/pretrain/model").mkdir(parents=True)
  epath.Path("gs://b/run/pretrain/model/model.json").write_text("{}")
  config = ml_collections.ConfigDict(dict(init=dict(checkpoint="", pretrain=dict(seed=0))))
  assert runner._eval_init(config, "gs://b/run/task_0") == "gs://b/run/pretrain"  # pylint: disable=protected-access
  with pytest.raises(runner.UserError, match="no exported model and no checkpoint"):
    runner._model_params(None, {}, "gs://b/run/task_0")  # pylint: disable=protected-access
