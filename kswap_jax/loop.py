"""The training loop: a sequence of stages, checkpointed and resumable at any step."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from kswap_jax.progress import Progress
from kswap_jax.workdir import Checkpoints

State = dict[str, Any]


@dataclasses.dataclass
class Stage:
  """`num_steps` updates of `step(state, batches(stage_step))`.

  begin(state) -> state runs when the stage starts fresh (not when resumed inside it);
  end(state) runs when it finishes (evaluation, exports) and may run again on resume.
  """
  name: str
  num_steps: int
  step: Callable[[State, Any], tuple[State, dict]]
  batches: Callable[[int], Any]
  begin: Callable[[State], State] = lambda s: s
  end: Callable[[State], None] = lambda s: None


def run(state: State, stages: list[Stage], ckpts: Checkpoints, workdir: str,
        log_every: int) -> State:
  """Runs the stages from the latest checkpoint (or from the start) and returns the state."""
  try:
    restored = ckpts.restore(state)
    if restored is not None:
      state = restored
    done = int(state["step"])
    offset = 0
    for st in stages:
      end = offset + st.num_steps
      if done > end:  # finished, and its end() ran before a later stage began
        offset = end
        continue
      if done <= offset:
        # zeros_like keeps the committed sharding: a fresh array would recompile the step
        state = st.begin({**state, "stage_step": jnp.zeros_like(state["stage_step"])})
      if done < end:
        progress = Progress(workdir, st.num_steps, log_every, prefix=f"[{st.name}] ")
        for g in range(max(done, offset), end):
          state, metrics = st.step(state, st.batches(g - offset))
          progress(g - offset + 1, metrics)
          ckpts.maybe_save(g + 1, state)
        ckpts.maybe_save(end, state, force=True)
        done = end
      st.end(state)
      offset = end
  finally:  # an interrupted run still completes its last checkpoint save
    ckpts.close()
  return state
