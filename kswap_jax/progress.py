"""Progress lines (step, loss, steps/s, ETA; long loops), and summary tables."""
from __future__ import annotations

import math
import sys
import time

import jax
import numpy as np


class Progress:
  """Prints every `every` steps of a stage and sends the values to the run's metrics log."""

  def __init__(self, log, total_steps: int, every: int, stage: str = ""):
    self.log, self.total, self.every, self.stage = log, total_steps, max(1, every), stage
    self.t_last, self.n_last = time.perf_counter(), None
    self.main = jax.process_index() == 0

  def __call__(self, step: int, metrics: dict, force: bool = False) -> dict | None:
    """`step` is the number of updates done in the stage (1-based); metrics are device
    scalars. Returns the metrics as floats when this step is logged, else None."""
    if not (force or step % self.every == 0 or step == self.total):
      return None
    vals = {k: float(np.asarray(v)) for k, v in metrics.items()}
    now = time.perf_counter()
    rate = (step - self.n_last) / (now - self.t_last) if self.n_last is not None else math.nan
    self.t_last, self.n_last = now, step
    self.log.train(step, vals)
    if not self.main:
      return vals
    eta = (self.total - step) / rate if rate and rate == rate else math.nan
    shown = " ".join(f"{k} {v:.4g}" for k, v in vals.items() if k != "lr")
    speed = f"{rate:.1f} steps/s ETA {_fmt(eta)}" if rate == rate else "(includes compiling)"
    print(f"[{self.stage}] step {step}/{self.total} {shown} lr {vals.get('lr', 0):.2e} "
          f"| {speed}", flush=True)
    return vals


class Ticker:
  """Progress of a long loop (an evaluation, a scan): says `what i/total` every `every`
  seconds once `after` seconds have passed, so short loops print nothing."""

  def __init__(self, what: str, total: int, after: float = 5.0, every: float = 10.0):
    self.what, self.total, self.after, self.every = what, total, after, every
    self.t0 = time.perf_counter()
    self.next = self.t0 + after

  def __call__(self, done: int) -> None:
    now = time.perf_counter()
    if now >= self.next:
      self.next = now + self.every
      say(f"{self.what}: {done}/{self.total} ({_fmt(now - self.t0)} so far)")


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
