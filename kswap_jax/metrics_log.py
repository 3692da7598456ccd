"""A run's metrics stream: workdir/metrics.jsonl, TensorBoard event files, optionally W&B.

Every record carries `step` (updates done, counted across stages), `stage` (the stage's name;
"start" before training), `time` (wall time, seconds since the epoch) and `kind`:

  train  the logged step's losses, `lr` and `stage_step`
  eval   one measured value: `name` (its path in results.json, rows named by their "task" /
         "block"), `value`, and `after` when its row has one

On resume from step S the records after S are dropped, and an evaluation already in the
stream is not written again, so an interrupted and resumed run has each record once.
TensorBoard tags are `train/<term>` and `eval/<name>` (`tensorboard --logdir WORKDIR`); W&B
gets the same scalars when `config.log.wandb_project` is set.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Iterator

import ml_collections

from kswap_jax import paths, workdir as workdir_lib
from kswap_jax.errors import UserError

_ROW_KEYS = ("after", "task", "block")  # a results row is named by the first it has


class MetricsLog:
  """The metrics stream of one workdir (writes on process 0 only); `rewind` before writing.

  The loop sets `step` and `stage` as training goes; `results` is called whenever a
  member's results.json is saved (`recipe.Member.log`)."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict | None = None):
    self.path = os.path.join(directory, "metrics.jsonl")
    self.directory, self.config = directory, config
    self.step, self.stage = 0, "start"
    self.main = workdir_lib.is_main()
    self.seen: dict[tuple[str, Any], float] = {}
    self.tb = self.wandb = None
    self.rewound: tuple[int | None] | None = None  # the last rewind's step

  def rewind(self, step: int | None) -> None:
    """Drops the records after `step` (None: all of them, a fresh start), and opens the
    writers (TensorBoard, which hides its events after `step` too; W&B) if not yet open.
    Rewinding to the step of the last rewind again does nothing."""
    if self.rewound == (step,):
      return
    self.step, self.rewound = step or 0, (step,)
    if not self.main:
      return
    kept = [r for r in _read(self.path) if step is not None and r["step"] <= step]
    with workdir_lib.atomic_file(self.path) as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)
    self.seen = {(r["name"], r.get("after")): r["value"] for r in kept if r["kind"] == "eval"}
    if self.tb is None:
      self._open(0 if step is None else step + 1)

  def _open(self, purge_step: int) -> None:
    self.tb = summary_writer_class()(self.directory, purge_step=purge_step)
    project = (self.config or {}).get("log", {}).get("wandb_project", "")
    if project:
      self.wandb = wandb_run(project, self.directory, self.config)

  def train(self, stage_step: int, values: dict[str, float]) -> None:
    """A train record at the current global step."""
    self._write({"kind": "train", "stage_step": stage_step, **values},
                {f"train/{k}": v for k, v in values.items()})

  def results(self, results: dict) -> None:
    """An eval record for each value of `results` (results.json) not yet in the stream."""
    for name, after, value in _values(results):
      old = self.seen.get((name, after))
      if old != value and not (old != old and value != value):  # NaN == NaN here
        self.seen[(name, after)] = value
        row = {"kind": "eval", "name": name, "value": value}
        self._write(row if after is None else {**row, "after": after}, {f"eval/{name}": value})

  def _write(self, record: dict, scalars: dict[str, float]) -> None:
    if not self.main:
      return
    record = {"step": self.step, "stage": self.stage, "time": time.time(), **record}
    workdir_lib.append_text(self.path, json.dumps(record) + "\n")
    scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}  # NaN: not measured
    for tag, v in scalars.items():
      self.tb.add_scalar(tag, v, self.step, walltime=record["time"])
    self.tb.flush()
    if self.wandb is not None:
      self.wandb.log(scalars, step=self.step)

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


def summary_writer_class():
  """tensorboardX's `SummaryWriter`, loaded without PyTorch unless PyTorch is already loaded.

  tensorboardX imports PyTorch whenever it is installed, only to accept torch tensors, which
  nothing here logs: on 2 CPU cores that cost 1.8 s and 190 MiB of RSS per process. While
  tensorboardX first loads (once per process, before any worker thread starts), `import torch`
  raises ImportError for the whole process, which tensorboardX handles.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


def wandb_run(project: str, directory: str, config: ml_collections.ConfigDict):
  """A W&B run of `project` for the workdir (resumed by a rerun), or UserError without wandb."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f"config.log.wandb_project={project!r} needs wandb: pip install wandb (or "
                    "pip install -e '.[wandb]'), or set --config.log.wandb_project=''") from None
  run_id = hashlib.sha1(paths.absolute(directory).encode()).hexdigest()[:16]
  return wandb.init(project=project, dir=directory, id=run_id, resume="allow",
                    config=config.to_dict())


def _read(path: str) -> list[dict]:
  """The records of a metrics.jsonl (none if absent); a torn last line is dropped."""
  target = paths.of(path)
  if not target.exists():
    return []
  out = []
  for line in target.read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return [r for r in out if "kind" in r]


def _values(node: Any, path: str = "", after: Any = None) -> Iterator[tuple[str, Any, float]]:
  """(name, row's "after" or None, number) of each number in dicts and lists of rows."""
  if isinstance(node, dict):
    for k, v in node.items():
      if k not in _ROW_KEYS:
        yield from _values(v, f"{path}{k}/", after)
  elif isinstance(node, list) and all(isinstance(r, dict) for r in node):
    for i, row in enumerate(node):
      if "after" in row:
        yield from _values(row, path, row["after"])
      else:
        name = next((row[k] for k in _ROW_KEYS if k in row), i)
        yield from _values(row, f"{path}{name}/", after)
  elif isinstance(node, (int, float)) and not isinstance(node, bool):
    yield path.rstrip("/"), after, float(node)
