"""A stage's training batches through grain: made ahead of the step, resumable from a checkpoint.

The batch of stage step s is a deterministic function `batches(s)` (`pipeline.EpochSampler`
positions, augmentation seeded by the step), so the loader is a grain `MapDataset` of the step
indices mapped by it, and every worker count gives the same batches in the same order. The
iterator's state, {"next_index": s} after s batches, is saved with each checkpoint
(`checkpoints.Checkpoints`); the step gives it for a checkpoint that has none.

`Ahead(workers, prefetch)`: grain threads that make the next batches while the device runs a
step (workers 0: each batch is made when the step asks for it, in the calling thread), and how
many batches may wait, already placed on the devices (prefetch 0: 2 * workers). A waiting batch
holds device memory: lower prefetch when batches are large. Threads, not processes: Pillow
decodes and resizes with the GIL released, and a batch holds device arrays
(`pipeline.to_global`), which a worker process cannot hand over.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import grain

from kswap_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Ahead:
  """How batches are made ahead of the step: `workers` threads, up to `prefetch` batches
  waiting (0: 2 * workers; config fields data.workers, data.prefetch)."""
  workers: int = 0
  prefetch: int = 0

  def __post_init__(self):
    if self.prefetch and not self.workers:
      raise UserError(f"data.prefetch={self.prefetch} needs data.workers >= 1 (with no "
                      "workers each batch is made when the step asks for it)")


def iterate(batches: Callable[[int], Any], num_steps: int, start: int = 0,
            ahead: Ahead = Ahead()) -> grain.DatasetIterator:
  """Iterator over batches(start), ..., batches(num_steps - 1), made as `ahead` says; its
  state (`get_state`) is {"next_index": steps taken}. Close it when done with it."""
  read = grain.ReadOptions(num_threads=ahead.workers,
                           prefetch_buffer_size=ahead.prefetch or 2 * ahead.workers)
  out = iter(grain.MapDataset.range(num_steps).map(batches).to_iter_dataset(read))
  out.set_state(state_at(start))
  return out


def state_at(step: int) -> dict:
  """The iterator state (`iterate`) after `step` batches of a stage."""
  return {"next_index": step}
