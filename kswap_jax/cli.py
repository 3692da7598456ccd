"""Command line: `kswap JOB --config configs/NAME.py[:ARGS] --workdir DIR [--config.x=y]`."""
from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kswap_jax import host_memory
from kswap_jax.errors import UserError

JOBS = ("pretrain", "swap", "forget", "dispose", "sweep")

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
  module = importlib.import_module(f"kswap_jax.jobs.{job}")
  module.run(_CONFIG.value, os.path.abspath(_WORKDIR.value))


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
      return flags.FLAGS(args)
    except flags.Error as e:  # bad flag, or a UserError raised inside get_config(arg)
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      msg = next((line.split("UserError: ", 1)[1] for line in reversed(lines)
                  if "UserError: " in line), " ".join(lines))
      print(f"kswap {job}: error: {msg}", file=sys.stderr)
      sys.exit(2)

  app.run(app_main, argv=argv, flags_parser=parse_flags)
