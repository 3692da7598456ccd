"""A stage's training batches through grain: made ahead of the step, resumable from a checkpoint.

The batch of stage step s is a deterministic function `batches(s)` (`pipeline.EpochSampler`
positions, augmentation seeded by the step), so the loader is a grain `MapDataset` of the step
indices mapped by it, and every worker count gives the same batches in the same order. The
iterator's state, {"next_index": s} after s batches, is saved with each checkpoint
(`checkpoints.Checkpoints`); the step gives it for a checkpoint that has none.

workers: grain threads that make the next batches while the device runs a step (0: each batch
is made when the step asks for it, in the calling thread); up to 2 * workers batches wait,
already placed on the devices. Threads, not processes: Pillow decodes and resizes with the GIL
released, and a batch holds device arrays (`pipeline.to_global`), which a worker process
cannot hand over.
"""
from __future__ import annotations

from typing import Any, Callable

import grain


def iterate(batches: Callable[[int], Any], num_steps: int, start: int = 0,
            workers: int = 0) -> grain.DatasetIterator:
  """Iterator over batches(start), ..., batches(num_steps - 1), made by `workers` threads;
  its state (`get_state`) is {"next_index": steps taken}. Close it when done with it."""
  read = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * workers)
  out = iter(grain.MapDataset.range(num_steps).map(batches).to_iter_dataset(read))
  out.set_state(state_at(start))
  return out


def state_at(step: int) -> dict:
  """The iterator state (`iterate`) after `step` batches of a stage."""
  return {"next_index": step}
