"""Shared by the step benchmarks: random batches, and the compile / time / XLA-cost measurement.

Scripts in this folder import it as `step_timing` (`python benchmarks/<script>.py` puts the
folder on the path).
"""
from __future__ import annotations

import resource
import statistics
import time

import jax
import jax.numpy as jnp

from kswap_jax import sharding


def random_batch(rng: jax.Array, n: int, shape: tuple[int, ...], classes: int) -> dict:
  """{"images": uint8 (n, *shape), "labels": int32 (n,) in [0, classes)}."""
  a, b = jax.random.split(rng)
  return {"images": jax.random.randint(a, (n, *shape), 0, 256).astype(jnp.uint8),
          "labels": jax.random.randint(b, (n,), 0, classes)}


def compile_replicated(step_fn, state, batches, mesh):
  """(compiled step, a replicated copy of `state` for it to donate, compile seconds)."""
  state = jax.device_put(state, sharding.replicated(mesh), may_alias=False)
  t0 = time.perf_counter()
  compiled = sharding.compile_step(step_fn, mesh).lower(state, batches).compile()
  return compiled, state, time.perf_counter() - t0


def step_flops(compiled) -> float:
  """FLOPs of one call of a compiled program, from XLA's cost analysis (-1 if unknown)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", -1))


def measure(step_fn, state, batches, mesh, warmup: int, repeats: int) -> dict:
  """Compiles `step_fn` once (state donated, as in training), then times `repeats` calls after
  `warmup`; adds XLA's flops and memory analysis, the device's peak bytes (-1 where it does
  not report them), the process's median minor page faults per timed step and the last loss.
  The caller's `state` stays valid."""
  compiled, state, compile_s = compile_replicated(step_fn, state, batches, mesh)
  memory = compiled.memory_analysis()
  times, faults = [], []
  for i in range(warmup + repeats):
    f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    state, metrics = compiled(state, batches)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
  stats = jax.devices()[0].memory_stats() or {}
  return {"compile_s": compile_s, "step_ms": 1e3 * statistics.median(times),
          "step_ms_all": [1e3 * t for t in times], "flops": step_flops(compiled),
          "temp_bytes": int(memory.temp_size_in_bytes) if memory else -1,
          "argument_bytes": int(memory.argument_size_in_bytes) if memory else -1,
          "peak_bytes": int(stats.get("peak_bytes_in_use", -1)),
          "page_faults_per_step": int(statistics.median(faults)),
          "loss": float(metrics["loss"])}
