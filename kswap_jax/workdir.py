"""A job's working directory: the config check, atomic JSON and file writes, the environment.

  workdir/config.json        the run's config (a rerun with a different config is refused)
  workdir/environment.json   per start of the run: package versions, processor, devices
  workdir/checkpoints/<step> orbax train-state checkpoints (`kswap_jax.checkpoints`)
  workdir/metrics.jsonl      one JSON line per logged step
  workdir/results.json       evaluation results, written atomically
  workdir/model/             exported model (`kswap_jax.checkpoints.export_model`)
  workdir/finished.json      written when the run has finished: a rerun only reports it

A workdir is a local folder or a bucket URL (`gs://bucket/run`; `kswap_jax.paths`). One
process writes a local workdir at a time (`lock`, an flock on the folder; a bucket has no
locks, so a bucket workdir is not locked). Only process 0 writes the JSON files.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.metadata
import io
import json
import os
import platform
import re
import uuid
from typing import IO, Any, Collection, Iterator

from absl import logging
import jax
from flax import traverse_util
import ml_collections
import numpy as np

from kswap_jax import config_lib, paths
from kswap_jax.errors import UserError

# Fields (and sections) that may differ between a run and its continuation: they do not change
# what the run computes. They hold in a sweep's base config and a pretrain config too.
RESUMABLE_FIELDS = ("checkpoint", "log_every", "host_memory", "data.eval_batch_size",
                    "data.cache_images", "data.cache_budget_gb", "data.workers", "data.prefetch")
_NESTED_RUN = re.compile(r"^(?:base\.|init\.pretrain\.)+")


def is_main() -> bool:
  return jax.process_index() == 0


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
  """Yields a file whose content replaces `path` when the block succeeds; on an error nothing
  changes, and an existing `path` is never touched. Parent folders are created.

  A local `path`: a temp file beside it, renamed onto it (the permissions of any new file,
  umask). A URL: the content is buffered and uploaded in one write, which a bucket applies
  whole."""
  target = paths.of(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if paths.is_url(path):
    buf = io.BytesIO() if "b" in mode else io.StringIO()
    yield buf
    (target.write_bytes if "b" in mode else target.write_text)(buf.getvalue())
    return
  tmp = target.parent / f".tmp-{uuid.uuid4().hex}{target.suffix}"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, target)
  except BaseException:
    os.remove(tmp)
    raise


def append_text(path: str, text: str) -> None:
  """Appends `text` to a file (created if absent); a URL's file is read and written back
  whole, as buckets do not append."""
  target = paths.of(path)
  if not paths.is_url(path):
    with open(target, "a") as f:
      f.write(text)
    return
  target.write_text((target.read_text() if target.exists() else "") + text)


def save_figure(fig, path: str, dpi: int = 120) -> None:
  """Writes a matplotlib figure as a PNG (a local path or a URL), atomically."""
  with atomic_file(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (`atomic_file`); only process 0 writes."""
  if not is_main():
    return
  with atomic_file(path) as f:
    json.dump(obj, f, indent=1, default=_jsonable)


def _jsonable(x):
  if isinstance(x, (np.generic, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def read_json(path: str, default=None):
  """The JSON content of a file (local or URL), or `default` if it does not exist."""
  target = paths.of(path)
  if not target.exists():
    return default
  return json.loads(target.read_text())


def check_config(workdir: str, config: ml_collections.ConfigDict, record: bool = True,
                 unused: Collection[str] = ()) -> None:
  """Refuses a workdir that holds a run of a different config, but for fields in `unused`
  (dotted keys whose value changes no result, e.g. a study's base value of a field every
  member sets); with `record`, saves config.json and appends this start's `environment()` to
  environment.json."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  old = read_json(path)
  if old is not None:
    old_flat, new_flat = (traverse_util.flatten_dict(c, sep=".", keep_empty_nodes=True)
                          for c in (old, new))
    diff = sorted(k for k in set(old_flat) | set(new_flat)
                  if not _resumable(k) and k not in unused
                  and _value(old_flat, k) != _value(new_flat, k))
    if diff:
      raise UserError(f"workdir {workdir} holds a run with a different config (fields {diff}); "
                      f"use a new --workdir or the same config to resume")
  if not record:
    return
  write_json(path, new)
  env_path = os.path.join(workdir, "environment.json")
  starts = read_json(env_path, [])
  write_json(env_path, (starts if isinstance(starts, list) else []) + [environment()])


def open_dir(path: str) -> str:
  """Creates the folder `path` (local or URL) if needed and checks that this process can
  write there."""
  target = paths.of(path)
  if target.exists() and not target.is_dir():
    raise UserError(f"workdir {path} is a file; give a folder (new or a run's) as --workdir")
  test = os.path.join(path, ".write_test")
  try:
    with atomic_file(test):
      pass
    paths.of(test).unlink()
  except OSError as e:
    raise UserError(f"workdir {path} cannot be written ({e.strerror or e}); give a folder this "
                    "user can create and write") from None
  return path


@contextlib.contextmanager
def lock(path: str):
  """Holds an exclusive lock on the local folder `path` (process 0) while the block runs; a
  second process that asks for it is refused at once. A bucket URL is not locked (buckets
  have no locks): two runs in one bucket workdir are not prevented, and a note says so."""
  if not is_main():
    yield
    return
  if paths.is_url(path):
    logging.warning("workdir %s is a bucket path: it is not locked; run one job in it at a "
                    "time", path)
    yield
    return
  fd = os.open(path, os.O_RDONLY)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise UserError(f"workdir {path} is in use by another kswap process; wait for it to end "
                      "or give another --workdir") from None
    yield
  finally:
    os.close(fd)


FINISHED = "finished.json"


def finished(path: str) -> bool:
  """Whether the run in `path` has finished (`mark_finished`)."""
  return paths.of(os.path.join(path, FINISHED)).exists()


def mark_finished(path: str) -> None:
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  write_json(os.path.join(path, FINISHED), {"finished": now})


def _value(flat: dict, key: str) -> Any:
  """A flattened config's value at dotted `key`. A `data` section's reading field that it lacks
  (a run started before the field existed) has its default (`config_lib.READ_DEFAULTS`), as
  `builders.read_options` reads it."""
  if key in flat:
    return flat[key]
  section, field = ["", *key.split(".")][-2:]
  if section == "data" and field in config_lib.READ_DEFAULTS:
    return config_lib.READ_DEFAULTS[field]
  return "<unset>"


def _resumable(key: str) -> bool:
  """Whether a dotted config key is, or lies in, one of RESUMABLE_FIELDS (also under `base.`
  or `init.pretrain.`); `init.checkpoint`, the model a run starts from, is not."""
  key = _NESTED_RUN.sub("", key)
  return any(key == f or key.startswith(f + ".") for f in RESUMABLE_FIELDS)


# Packages whose versions can change a run's numbers.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
            "tensorflow-datasets", "scikit-learn", "ml-collections", "kswap-jax")


def environment() -> dict:
  """What a run's numbers depend on besides its config: package versions, the processor and
  the devices. XLA picks kernels by processor, and their rounding differs, so a run can end
  with other figures on another machine."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "python": platform.python_version(), "packages": versions,
          "processor": _processor(), "cpu_count": os.cpu_count(),
          "backend": jax.default_backend(), "process_count": jax.process_count(),
          "devices": sorted({d.device_kind for d in jax.devices()}),
          "device_count": jax.device_count()}


def _processor() -> str:
  """The CPU model name (Linux /proc/cpuinfo; elsewhere the platform's processor string)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()
