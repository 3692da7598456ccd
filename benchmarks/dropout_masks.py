"""Time of one training-mode dropout (mask draw + select) on an activation, three ways.

  nn.Dropout        flax's: one float uniform per entry from `jax.random.bernoulli`;
  random.bits16     16-bit draws, two per 32-bit word of `jax.random.bits` (JAX's threefry,
                    which XLA:CPU runs as a loop writing its state to memory);
  fast_ops.Dropout  the library's: 16-bit draws from `fast_ops.threefry2x32` written out round
                    by round, hashed in one fused pass.

All three draw with the same key implementation (threefry2x32) and rate. Shapes default to the
GS-LoRA face update's activations (16 images x 197 tokens, widths 512 and 2048). Timed in
alternating rounds, so a slow spell of a shared machine hits every implementation.

  python benchmarks/dropout_masks.py [--rate 0.1] [--rounds 5] [--out FILE]

Writes benchmarks/results/dropout_masks_<backend>.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kswap_jax import host_memory, workdir
from kswap_jax.models import fast_ops
from kswap_jax.progress import table

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = ((3152, 512), (3152, 2048))


def random_bits16(x, key, rate):
  words = jax.random.bits(key, (-(-x.size // 2),), jnp.uint32)
  draws = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[: x.size]
  keep = draws.reshape(x.shape) >= np.uint16(round(rate * 65536))
  return jnp.where(keep, x / (1 - rate), 0)


def module_dropout(module):
  return lambda x, key, rate: module(rate).apply({}, x, deterministic=False,
                                                  rngs={"dropout": key})


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rate", type=float, default=0.1)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="")
  args = p.parse_args()
  host_memory.retain_freed_memory()

  impls = {"nn.Dropout": module_dropout(nn.Dropout), "random.bits16": random_bits16,
           "fast_ops.Dropout": module_dropout(fast_ops.Dropout)}
  fns = {name: jax.jit(fn, static_argnums=2) for name, fn in impls.items()}
  key = jax.random.key(0)
  rows = []
  for shape in SHAPES:
    x = jax.random.normal(jax.random.key(1), shape)
    times = {name: [] for name in fns}
    dropped = {name: float(jnp.mean(fn(x, key, args.rate) == 0)) for name, fn in fns.items()}
    for _ in range(args.rounds):
      for name, fn in fns.items():
        for _ in range(args.repeats):
          t = time.perf_counter()
          jax.block_until_ready(fn(x, key, args.rate))
          times[name].append(1e3 * (time.perf_counter() - t))
    for name, ts in times.items():
      rows.append({"shape": "x".join(map(str, shape)), "impl": name, "ms": statistics.median(ts),
                   "ms_best": min(ts), "dropped": dropped[name], "ms_all": ts})
  out = args.out or os.path.join(RESULTS, f"dropout_masks_{jax.default_backend()}.json")
  workdir.write_json(out, {"device": str(jax.devices()[0].device_kind),
                           "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                           "jax": jax.__version__, "config": vars(args), "rows": rows})
  print(table(rows, ["shape", "impl", "ms", "ms_best", "dropped"]))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
