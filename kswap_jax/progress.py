"""Progress lines (step, loss, steps/s, ETA), metrics as JSON lines, and summary tables."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np


class Progress:
  """Logs every `every` steps to stdout and `workdir/metrics.jsonl` (process 0 only)."""

  def __init__(self, workdir: str, total_steps: int, every: int, prefix: str = ""):
    self.total, self.every, self.prefix = total_steps, max(1, every), prefix
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.t0 = self.t_last = time.perf_counter()
    self.n_last = None
    self.main = jax.process_index() == 0

  def __call__(self, step: int, metrics: dict, force: bool = False) -> dict | None:
    """`step` is the number of updates done so far (1-based); metrics are device scalars.
    Returns the metrics as floats when this step is logged, else None."""
    if not (force or step % self.every == 0 or step == self.total):
      return None
    vals = {k: float(np.asarray(v)) for k, v in metrics.items()}
    now = time.perf_counter()
    rate = (step - self.n_last) / (now - self.t_last) if self.n_last is not None else math.nan
    self.t_last, self.n_last = now, step
    if not self.main:
      return vals
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "stage": self.prefix, **vals}) + "\n")
    eta = (self.total - step) / rate if rate and rate == rate else math.nan
    shown = " ".join(f"{k} {v:.4g}" for k, v in vals.items() if k != "lr")
    print(f"{self.prefix}step {step}/{self.total} {shown} lr {vals.get('lr', 0):.2e} "
          f"| {rate:.1f} steps/s ETA {_fmt(eta)}", flush=True)
    return vals


def _fmt(seconds: float) -> str:
  if seconds != seconds:
    return "-"
  m, s = divmod(int(seconds), 60)
  return f"{m}:{s:02d}"


def table(rows: list[dict], columns: list[str], floatfmt: str = "{:.2f}") -> str:
  """Plain-text table of `rows` (dicts) with the given column order."""
  cells = [[floatfmt.format(r.get(c)) if isinstance(r.get(c), float) else str(r.get(c, ""))
            for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
  return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def say(*args) -> None:
  """print() on process 0 only."""
  if jax.process_index() == 0:
    print(*args, flush=True)
    sys.stdout.flush()
