"""Forward + backward time and memory of one LoRA-adapted layer: merged kernel vs unmerged.

  merged    `lora.adapted_matmul`: x (W + A B), one matmul; A and B get rank-r gradients.
  folded    the same backward formulas with no optimization barriers: XLA folds the
            transposes into the rank-r products, which then contract the slow way on CPU.
  unmerged  x W + (x A) B as written, differentiated by JAX: also forms the (M, O) update.

Each takes the gradient with respect to x, A and B (W frozen, as in training). Shapes are the
GS-LoRA face update's MLP layers (M = 16 images x 197 tokens, rank 8) by default. Reported:
median and best time (they are timed in alternating rounds, so a slow spell of a shared
machine hits both) and XLA's temp bytes of the compiled computation.

  python benchmarks/lora_products.py [--tokens 3152] [--rank 8] [--rounds 5] [--out FILE]

Writes benchmarks/results/lora_products_<backend>.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

from kswap_jax import lora as lora_lib
from kswap_jax import workdir
from kswap_jax.progress import table

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LAYERS = {"Dense_0": (512, 2048), "Dense_1": (2048, 512)}  # (in, out) of the F6 MLP


def unmerged(x, kernel, a, b):
  return x @ kernel + (x @ a) @ b


@jax.custom_vjp
def folded(x, kernel, a, b):
  return x @ (kernel + a @ b)


def _folded_fwd(x, kernel, a, b):
  return folded(x, kernel, a, b), (x, kernel, a, b)


def _folded_bwd(res, dy):
  x, kernel, a, b = res
  return dy @ (kernel + a @ b).T, x.T @ dy, x.T @ (dy @ b.T), (x @ a).T @ dy


folded.defvjp(_folded_fwd, _folded_bwd)


def timed_grad(fn):
  """Jitted (x, kernel, a, b, dy) -> (output y, gradients of sum(y * dy) w.r.t. x, a, b)."""

  def loss(x, a, b, kernel, dy):
    y = fn(x, kernel, a, b)
    return jnp.sum(y * dy), y  # y is returned, so the forward product is not dropped

  return jax.jit(lambda x, kernel, a, b, dy: jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
      x, a, b, kernel, dy))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=3152)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="")
  args = p.parse_args()

  fns = {"merged": timed_grad(lora_lib.adapted_matmul), "folded": timed_grad(folded),
         "unmerged": timed_grad(unmerged)}
  rows = []
  for layer, (fan_in, fan_out) in LAYERS.items():
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (args.tokens, fan_in))
    kernel = jax.random.normal(keys[1], (fan_in, fan_out)) / fan_in**0.5
    a = jax.random.normal(keys[2], (fan_in, args.rank)) / fan_in**0.5
    b = jax.random.normal(keys[3], (args.rank, fan_out)) / 8
    dy = jax.random.normal(keys[4], (args.tokens, fan_out))
    operands = (x, kernel, a, b, dy)
    times = {name: [] for name in fns}
    for name, fn in fns.items():
      jax.block_until_ready(fn(*operands))
    for _ in range(args.rounds):
      for name, fn in fns.items():
        for _ in range(args.repeats):
          t = time.perf_counter()
          jax.block_until_ready(fn(*operands))
          times[name].append(1e3 * (time.perf_counter() - t))
    for name, ts in times.items():
      memory = fns[name].lower(*operands).compile().memory_analysis()
      rows.append({"layer": layer, "in": fan_in, "out": fan_out, "tokens": args.tokens,
                   "rank": args.rank, "impl": name, "ms": statistics.median(ts),
                   "ms_best": min(ts), "temp_MiB": memory.temp_size_in_bytes / 2**20,
                   "ms_all": ts})
  out = args.out or os.path.join(RESULTS, f"lora_products_{jax.default_backend()}.json")
  workdir.write_json(out, {"device": str(jax.devices()[0].device_kind),
                           "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                           "jax": jax.__version__, "config": vars(args), "rows": rows})
  print(table(rows, ["layer", "in", "out", "tokens", "rank", "impl", "ms", "ms_best",
                     "temp_MiB"]))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
