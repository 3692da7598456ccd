"""Host allocator setting for XLA:CPU steps: reuse freed memory instead of faulting it in again.

XLA:CPU allocates an execution's whole temp buffer (activations and gradients: 1.2 GiB for
the face GS-LoRA update) with one `malloc`. glibc serves a block that large with a fresh
`mmap` and unmaps it on `free`, so every step faults in, and the kernel zeroes, every page
of it again: about 300 000 page faults per step, and a face update 1.5-2x slower on 2 cores
(`benchmarks/step_speed.py --host_memory default` measures it). `retain_freed_memory` makes
glibc take every block from the main heap and never return freed memory to the system, so
after the first few steps a step reuses the same pages. The process keeps its peak footprint
until it exits, and in the first steps the heap can grow by another temp buffer or a few, when
small blocks land in a freed one, before it settles.

The price is one malloc arena shared by all threads: steps with small buffers, such as the
digits models', run slower (`step_speed.py --workloads digits` measures both). So `kswap` calls
it, before JAX starts its CPU backend, only for configs with `host_memory="retained"` (the
ViT-B and face configs). The speed benchmarks call it too (`step_speed.py` unless
`--host_memory default`, `dropout_masks.py`, `attention_cost.py`). From your own script, call it
first thing, or start Python with the environment equivalent
`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1` (glibc only).
"""
from __future__ import annotations

import ctypes
import sys

from kswap_jax.errors import UserError

SETTINGS = ("default", "retained")

# mallopt(3) parameters: one malloc arena for every thread, no mmap-backed blocks, and no
# trimming of the heap top (-1 disables it).
_MALLOPT = ((-8, 1), (-4, 0), (-1, -1))  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD


def retain_freed_memory() -> bool:
  """Sets glibc's malloc to serve all blocks from one reusable heap; True where it applied.

  Threads that already allocated keep their own arena, so call this before the first JAX
  computation (JAX creates its CPU worker threads then). Does nothing (False) off glibc.
  """
  if not sys.platform.startswith("linux"):
    return False
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  if mallopt is None:
    return False
  return all(mallopt(param, value) == 1 for param, value in _MALLOPT)


def configure(setting: str) -> None:
  """Applies a config's `host_memory` ("default": glibc's own, "retained"); call before JAX."""
  if setting not in SETTINGS:
    raise UserError(f"host_memory={setting!r} is not one of {SETTINGS}")
  if setting == "retained":
    retain_freed_memory()
