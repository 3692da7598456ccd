"""A job's working directory: orbax checkpoints, the config, results and exported models.

  workdir/config.json        the run's config (a rerun with a different config is refused)
  workdir/environment.json   per start of the run: package versions, processor, devices
  workdir/checkpoints/<step> orbax train-state checkpoints (last K kept)
  workdir/metrics.jsonl      one JSON line per logged step
  workdir/results.json       evaluation results, written atomically
  workdir/model/             exported model: params (orbax) + model.json (config, classes)

Only process 0 writes the JSON files; orbax saves and restores collectively.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import uuid
from typing import Any

import jax
from flax import traverse_util
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from kswap_jax.errors import UserError

# Fields (and sections) that may differ between a run and its continuation: they do not change
# what the run computes. They hold in a sweep's base config and a pretrain config too.
RESUMABLE_FIELDS = ("checkpoint", "log_every", "host_memory", "data.eval_batch_size",
                    "data.cache_images")
_NESTED_RUN = re.compile(r"^(?:base\.|init\.pretrain\.)+")


def is_main() -> bool:
  return jax.process_index() == 0


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w"):
  """Opens a temp file beside `path` and renames it to `path` when the block succeeds; on an
  error it is removed. A crash or an interrupt never leaves a half-written `path`, and never
  touches an existing one. The file gets the permissions of any new file (umask)."""
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  tmp = os.path.join(d, f".tmp-{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise


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
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Saves config.json, or refuses a workdir that holds a run of a different config; appends
  this start's `environment()` to environment.json."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json_best_effort())
  old = read_json(path)
  if old is not None:
    old_flat, new_flat = (traverse_util.flatten_dict(c, sep=".", keep_empty_nodes=True)
                          for c in (old, new))
    diff = sorted(k for k in set(old_flat) | set(new_flat)
                  if not _resumable(k)
                  and old_flat.get(k, "<unset>") != new_flat.get(k, "<unset>"))
    if diff:
      raise UserError(f"workdir {workdir} holds a run with a different config (fields {diff}); "
                      f"use a new --workdir or the same config to resume")
  write_json(path, new)
  env_path = os.path.join(workdir, "environment.json")
  starts = read_json(env_path, [])
  write_json(env_path, (starts if isinstance(starts, list) else []) + [environment()])


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


class Checkpoints:
  """orbax CheckpointManager for the train state: save every N steps, keep K, resume."""

  def __init__(self, directory: str, every_steps: int, keep: int):
    self.every = every_steps
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, state):
    """Latest checkpoint restored onto the shardings and shapes of `state`, or None."""
    step = self.manager.latest_step()
    if step is None:
      return None
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError) as e:
      raise UserError(f"checkpoint {self.manager.directory}/{step} does not fit this run's "
                      f"state ({str(e).splitlines()[0][:200]}); use a new --workdir") from None

  def maybe_save(self, step: int, state, force: bool = False) -> None:
    if force or (self.every and step % self.every == 0):
      if self.manager.latest_step() != step:
        self.manager.save(step, args=ocp.args.StandardSave(state))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def export_model(directory: str, params, model_config: ml_collections.ConfigDict,
                 label_space: list, extra: dict | None = None) -> None:
  """Writes params (orbax) and model.json; a failed export leaves an older one intact."""
  directory = os.path.abspath(directory)
  tmp = directory + ".tmp"
  ckptr = ocp.StandardCheckpointer()
  if os.path.exists(tmp) and is_main():
    shutil.rmtree(tmp)
  ckptr.save(os.path.join(tmp, "params"), params)
  ckptr.wait_until_finished()
  write_json(os.path.join(tmp, "model.json"),
             {"model": model_config.to_dict(), "classes": label_space, **(extra or {})})
  if is_main():
    if os.path.exists(directory):
      old = directory + ".old"
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old)
    else:
      os.replace(tmp, directory)


def load_model(directory: str) -> tuple[dict, dict]:
  """(params, model.json dict) of an exported model; a run's workdir also works."""
  for d in (directory, os.path.join(directory, "model")):
    if os.path.exists(os.path.join(d, "model.json")):
      meta = read_json(os.path.join(d, "model.json"))
      params = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(d, "params")))
      return params, meta
  raise UserError(f"no exported model at {directory!r} (expected model.json there or in "
                  f"its model/ folder); run a pretrain job first or give a .npz file")
