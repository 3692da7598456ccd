"""Command line: `kswap JOB --config configs/NAME.py[:ARGS] --workdir DIR [--config.x=y]`,
`kswap eval --model DIR --config CFG`, `kswap export --model DIR --format F --out PATH`;
`kswap --help` lists the jobs, `kswap JOB --help` a job's flags, configs and their arguments.
"""
from __future__ import annotations

import ast
import difflib
import glob
import importlib.util
import os
import sys
from typing import Iterator

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from kswap_jax import config_lib, host_memory, methods, paths
from kswap_jax.errors import UserError

TOOLS = {
    "sweep": "a study: many members of one method's config trained as one vmapped program",
    "eval": "evaluate an exported model (or a workdir's) on a config's sets: the job's table",
    "export": "write an exported model as a big_vision .npz or timm-named safetensors",
}
JOBS = (*methods.NAMES, *TOOLS)
_TRAIN_USAGE = "kswap {job} --config configs/FILE.py[:ARGS] --workdir DIR [--config.FIELD=VALUE]"
USAGE = {**{j: _TRAIN_USAGE.format(job=j) for j in (*methods.NAMES, "sweep")},
         "eval": "kswap eval --model DIR --config configs/FILE.py[:ARGS] [--workdir OUT]",
         "export": "kswap export --model DIR --format npz|safetensors --out PATH"}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (file.py[:args]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results: a "
                                "local folder or a bucket URL (gs://bucket/run).")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() (TPU pods, GPU clusters).")
_MODEL = flags.DEFINE_string("model", None, "eval, export: an exported model directory, or a "
                             "workdir (its model/, else its latest checkpoint).")
_FORMAT = flags.DEFINE_enum("format", None, ["npz", "safetensors"], "export: the file format.")
_OUT = flags.DEFINE_string("out", None, "export: the file to write.")
# Flags of each job, as `kswap JOB --help` lists them.
FLAGS_OF = {**{j: ("config", "workdir", "multihost") for j in (*methods.NAMES, "sweep")},
            "eval": ("model", "config", "workdir"), "export": ("model", "format", "out")}


def _run(job: str) -> None:
  if job == "export":
    if not (_MODEL.value and _FORMAT.value and _OUT.value):
      raise UserError("--model, --format and --out are required")
    from kswap_jax import export  # pylint: disable=g-import-not-at-top
    export.export(_MODEL.value, _FORMAT.value, _OUT.value)
    return
  if job == "eval" and (_CONFIG.value is None or not _MODEL.value):
    raise UserError("both --model and --config are required")
  if job != "eval" and (_CONFIG.value is None or not _WORKDIR.value):
    raise UserError("both --config and --workdir are required")
  host_memory.configure(_CONFIG.value.get("host_memory", "default"))  # before JAX starts
  if _MULTIHOST.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  from kswap_jax import runner  # pylint: disable=g-import-not-at-top
  if job == "eval":
    runner.evaluate(_config_job(), _CONFIG.value, _MODEL.value,
                    _WORKDIR.value and paths.absolute(_WORKDIR.value))
  elif job == "sweep":
    runner.sweep(_CONFIG.value, paths.absolute(_WORKDIR.value))
  else:
    runner.run(job, _CONFIG.value, paths.absolute(_WORKDIR.value))


def _config_job() -> str:
  """The training job the --config file declares (its `JOB`)."""
  path = flags.FLAGS["config"].config_filename.split(":", 1)[0]
  job = _module_doc(path)[1].get("JOB")
  if job not in methods.NAMES:
    raise UserError(f"config {path} declares JOB={job!r}; eval needs the config of a training "
                    f"job ({', '.join(methods.NAMES)}): a module-level JOB = \"swap\" or the like")
  return job


def _first_line(doc: str | None) -> str:
  """A docstring's first line, without a `job`: prefix and trailing commas."""
  line = (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""
  return line.split(": ", 1)[1] if line.startswith("`") and ": " in line else line.rstrip(",;")


def _module_doc(path: str) -> tuple[str | None, dict]:
  """(docstring, module-level constants) of a Python file, read without running it."""
  with open(path) as f:
    tree = ast.parse(f.read())
  consts = {}
  for node in tree.body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
        node.targets[0], ast.Name):
      try:
        consts[node.targets[0].id] = ast.literal_eval(node.value)
      except ValueError:
        pass
  return ast.get_docstring(tree), consts


def config_args(path: str) -> dict:
  """The `ARGS` (argument defaults) a config file declares; it is imported to read them."""
  spec = importlib.util.spec_from_file_location(
      f"kswap_config_{os.path.splitext(os.path.basename(path))[0]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return dict(getattr(module, "ARGS", {}))


def job_summary(job: str) -> str:
  """One line on what `job` does: its recipe module's docstring, or the tool's text."""
  if job in TOOLS:
    return TOOLS[job]
  return _first_line(_module_doc(importlib.util.find_spec(f"kswap_jax.methods.{job}").origin)[0])


def config_files() -> list[str]:
  """The config files of ./configs, else of the repository's configs/ folder."""
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  found = sorted(glob.glob(os.path.join("configs", "*.py")))
  return found or sorted(glob.glob(os.path.join(here, "*.py")))


def configs_of(job: str) -> list[tuple[str, str, dict]]:
  """(path, first docstring line, ARGS defaults) of the config files whose `JOB` is `job`
  (eval: every training job's)."""
  out = []
  for path in config_files():
    doc, consts = _module_doc(path)
    if consts.get("JOB") == job or (job == "eval" and consts.get("JOB") in methods.NAMES):
      out.append((path, _first_line(doc), config_args(path)))
  return out


def main_help() -> str:
  """`kswap --help`: usage and one line per job."""
  width = max(map(len, JOBS))
  lines = ["usage: kswap JOB [flags]; kswap JOB --help lists a job's flags and configs", "",
           "jobs:"] + [f"  {j.ljust(width)}  {job_summary(j)}" for j in JOBS]
  return "\n".join(lines)


def job_help(job: str) -> str:
  """`kswap JOB --help`: usage, flags, and the configs that serve the job with their
  arguments and defaults."""
  lines = [f"usage: {USAGE[job]}", "", job_summary(job), "", "flags:"]
  for name in FLAGS_OF[job]:
    lines.append(f"  --{name}: {flags.FLAGS[name].help}")
  if "config" in FLAGS_OF[job]:
    lines.append("  --config.FIELD=VALUE: override any field of the config (e.g. "
                 "--config.train.lr=3e-3)")
    lines += ["", "configs (arguments after ':', comma-separated; a bare name sets a flag):"]
    for path, doc, args in configs_of(job):
      lines.append(f"  {path}: {doc}")
      lines.append("      " + (", ".join(f"{k}={v!r}" for k, v in args.items()) or "(none)"))
  return "\n".join(lines)


def _flag_value(args: list[str], name: str) -> str | None:
  """The value of `--name=V` or `--name V` in `args`."""
  for i, a in enumerate(args):
    key, eq, value = a.lstrip("-").partition("=")
    if a.startswith("-") and key == name:
      return value if eq else (args[i + 1] if i + 1 < len(args) else None)
  return None


def _field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
  """Dotted paths of every field and section of `config`."""
  for key, value in config.items():
    yield prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _field_paths(value, f"{prefix}{key}.")


def _refuse_unknown_field(spec: str, args: list[str]) -> None:
  """UserError for the first `--config.FIELD` override that names no field of the config."""
  fields = list(_field_paths(config_lib.load(*spec.split(":", 1))))
  for a in args:
    key = a.lstrip("-").partition("=")[0]
    if a.startswith("-") and key.startswith("config."):
      field = key[len("config."):]
      if field not in fields and "[" not in field:
        parent = field.rpartition(".")[0]
        near = difflib.get_close_matches(field, fields, n=3) or sorted(
            f for f in fields if f.rpartition(".")[0] == (parent if parent in fields else ""))
        raise UserError(f"unknown config field {field!r} (--config.{field}); did you mean one "
                        f"of: {', '.join(near)}?")


def _parse(args: list[str]) -> list[str]:
  """absl's flag parsing, with a missing or failing config file or an unknown field override
  raised as UserError."""
  spec = _flag_value(args, "config")
  path = spec.split(":", 1)[0] if spec else ""
  if spec and not os.path.isfile(path):
    raise UserError(f"config file {path!r} not found (relative to {os.getcwd()})")
  try:
    rest = flags.FLAGS(args)
    if _CONFIG.value is not None:
      _CONFIG.value.get("host_memory")  # a config file that failed to load raises OSError here
  except (AttributeError, KeyError, IndexError):  # ml_collections: an override names no field
    if spec:
      _refuse_unknown_field(spec, args)
    raise
  except OSError as e:
    raise UserError(f"config file {path!r} failed to load: "
                    f"{' '.join(str(e.__cause__ or e).split())}") from None
  return rest


def _flag_error_text(e: flags.Error) -> str:
  """One line for a flag error: the UserError or last traceback line of a failing config file."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  user = next((line.split("UserError: ", 1)[1] for line in reversed(lines)
               if "UserError: " in line), None)
  if user is not None:
    return user
  if any(line.startswith("Traceback") for line in lines):
    return f"{lines[0]} {lines[-1]}"
  return " ".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help"):
    print(main_help(), file=sys.stdout if len(argv) > 1 else sys.stderr)
    sys.exit(0 if len(argv) > 1 else 2)
  if argv[1] not in JOBS:
    got = argv[1] if len(argv) > 1 else "nothing"
    print(f"kswap: error: first argument must be a job, one of {', '.join(JOBS)} (got {got}); "
          f"usage: kswap JOB --config configs/FILE.py --workdir DIR", file=sys.stderr)
    sys.exit(2)
  job = argv.pop(1)
  if any(a in ("-h", "--help", "-help") for a in argv[1:]):
    print(job_help(job))
    sys.exit(0)

  def app_main(_):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
      _run(job)
    except UserError as e:
      print(f"kswap {job}: error: {e}", file=sys.stderr)
      sys.exit(2)

  def parse_flags(args):
    try:
      return _parse(args)
    except UserError as e:
      msg = str(e)
    except flags.Error as e:  # bad flag, or an error raised inside get_config(arg)
      msg = _flag_error_text(e)
    print(f"kswap {job}: error: {msg}", file=sys.stderr)
    sys.exit(2)

  app.run(app_main, argv=argv, flags_parser=parse_flags)
