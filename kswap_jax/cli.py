"""Command line: `kswap JOB --config configs/NAME.py[:ARGS] --workdir DIR [--config.x=y]`."""
from __future__ import annotations

import difflib
import os
import sys
from typing import Iterator

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from kswap_jax import config_lib, host_memory, methods
from kswap_jax.errors import UserError

JOBS = (*methods.NAMES, "sweep")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (file.py[:args]).",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() (TPU pods, GPU clusters).")


def _run(job: str) -> None:
  if _CONFIG.value is None or not _WORKDIR.value:
    raise UserError("both --config and --workdir are required")
  host_memory.configure(_CONFIG.value.get("host_memory", "default"))  # before JAX starts
  if _MULTIHOST.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()
  from kswap_jax import runner  # pylint: disable=g-import-not-at-top
  if job == "sweep":
    runner.sweep(_CONFIG.value, os.path.abspath(_WORKDIR.value))
  else:
    runner.run(job, _CONFIG.value, os.path.abspath(_WORKDIR.value))


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
  if len(argv) < 2 or argv[1] not in JOBS:
    got = argv[1] if len(argv) > 1 else "nothing"
    print(f"kswap: error: first argument must be a job, one of {', '.join(JOBS)} (got {got}); "
          f"usage: kswap JOB --config configs/FILE.py --workdir DIR", file=sys.stderr)
    sys.exit(2)
  job = argv.pop(1)

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
