"""The training loop: a sequence of stages, checkpointed and resumable at any step.

A stage's batches come through a grain iterator (`kswap_jax.data.loader`), made ahead of the
step by `data.workers` threads (`loader.Ahead`); its state is saved with each checkpoint and
restored on resume.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kswap_jax.checkpoints import Checkpoints
from kswap_jax.data import loader
from kswap_jax.errors import UserError
from kswap_jax.metrics_log import MetricsLog
from kswap_jax.progress import Progress, say

State = dict[str, Any]


@dataclasses.dataclass
class Stage:
  """`num_steps` updates of `step(state, batches(stage_step))`.

  begin(state) -> state runs when the stage starts fresh (not when resumed inside it);
  after(state, stage_step) -> state runs after each update (model selection);
  end(state) runs when it finishes (evaluation, exports) and may run again on resume.
  """
  name: str
  num_steps: int
  step: Callable[[State, Any], tuple[State, dict]]
  batches: Callable[[int], Any]
  begin: Callable[[State], State] = lambda s: s
  after: Callable[[State, int], State] = lambda s, i: s
  end: Callable[[State], None] = lambda s: None


def run(state: State, stages: list[Stage], ckpts: Checkpoints, workdir: str,
        log_every: int, stop_nonfinite: bool = True, log: MetricsLog | None = None,
        ahead: loader.Ahead = loader.Ahead()) -> State:
  """Runs the stages from the latest checkpoint (or from the start) and returns the state.

  stop_nonfinite: stop with a `Diverged` error when a logged loss is not finite, and never
  save a checkpoint whose trainable params are not (so the last checkpoint stays good); a
  study, whose members may diverge alone, passes False.
  log: the run's metrics stream (default: a new one of `workdir`), rewound to the restored
  step, its step (counted across stages) and stage kept current; closed at the end.
  ahead: threads making each stage's batches ahead of its step and how many may wait
  (`loader.iterate`); the batches, and so the result, are the same for any numbers.
  """
  log = log or MetricsLog(workdir)
  try:
    restored = ckpts.restore(state)
    if restored is not None:
      state = restored
    done = int(state["step"])
    log.rewind(done if restored is not None else None)
    offset = 0
    if restored is not None:
      _say_resume(stages, done)
    for st in stages:
      end = offset + st.num_steps
      if done > end:  # finished, and its end() ran before a later stage began
        offset = end
        continue
      log.stage, log.step = st.name, max(done, offset)
      if done <= offset:
        # zeros_like keeps the committed sharding: a fresh array would recompile the step
        state = st.begin({**state, "stage_step": jnp.zeros_like(state["stage_step"])})
      if done < end:
        progress = Progress(log, st.num_steps, log_every, stage=st.name)
        batches = _batches(st, ckpts, max(done, offset) - offset, done, ahead)
        try:
          for g in range(max(done, offset), end):
            state, metrics = st.step(state, next(batches))
            state = st.after(state, g - offset)
            log.step = g + 1
            logged = progress(g - offset + 1, metrics)
            if stop_nonfinite and logged is not None and not math.isfinite(logged["loss"]):
              raise Diverged(st.name, g - offset + 1, st.num_steps, logged, ckpts.latest_step())
            _save(ckpts, g + 1, state, g + 1 == end, stop_nonfinite, st, g - offset + 1,
                  batches)
        finally:
          batches.close()
        done = end
      log.step = end
      st.end(state)
      offset = end
  finally:  # an interrupted run still completes its last checkpoint save
    ckpts.close()
    log.close()
  return state


class Diverged(UserError):
  """Training produced a non-finite loss or params; the run stops, its checkpoints kept."""

  def __init__(self, stage: str, step: int, total: int, metrics: dict | None, kept: int | None):
    terms = ", ".join(f"{k} {v:.4g}" for k, v in (metrics or {}).items()
                      if k not in ("lr", "loss"))
    what = f"loss {metrics['loss']:.4g} ({terms})" if metrics else "params are not finite"
    keep = (f"the last checkpoint (step {kept}) is kept" if kept is not None
            else "no checkpoint was saved")
    super().__init__(f"training diverged at step {step} of {total} in stage {stage}: {what}; "
                     f"{keep}; lower train.lr or the loss weights and start again in a new "
                     "--workdir")


@jax.jit
def all_finite(tree) -> jax.Array:
  """bool (): every entry of every leaf is finite."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _batches(st: Stage, ckpts: Checkpoints, start: int, done: int, ahead: loader.Ahead):
  """The grain iterator of `st`'s batches from stage step `start`; resumed inside the stage
  (start > 0), it takes the input state of checkpoint `done` where that has one, which must
  be the step's."""
  batches = loader.iterate(st.batches, st.num_steps, start, ahead)
  if start and ckpts.restore_input(done, batches) and batches.get_state() != loader.state_at(
      start):
    batches.close()
    raise UserError(f"checkpoint {done} holds input state {batches.get_state()} for stage "
                    f"{st.name}, but its train state is at step {start} of it; the checkpoint "
                    "is not from this run: use a new --workdir")
  return batches


def _save(ckpts: Checkpoints, step: int, state: State, force: bool, stop_nonfinite: bool,
          st: Stage, stage_step: int, batches) -> None:
  """A due checkpoint save, with the input iterator `batches`; with stop_nonfinite, refuses
  to save non-finite params."""
  if not ckpts.due(step, force):
    return
  if stop_nonfinite and not bool(all_finite(state["trainable"])):
    raise Diverged(st.name, stage_step, st.num_steps, None, ckpts.latest_step())
  ckpts.maybe_save(step, state, force, batches)


def _say_resume(stages: list[Stage], done: int) -> None:
  offset = 0
  for st in stages:
    if done < offset + st.num_steps or st is stages[-1]:
      say(f"resuming from step {done}: stage {st.name}, step {done - offset} of "
          f"{st.num_steps}")
      return
    offset += st.num_steps
