"""Speed of the attention core against the matmul peak: the (B*N)-batched products of
`fast_ops.einsum_attention`, alone and in one forward + backward pass.

Rows (GS-LoRA face shapes by default: 16 images x 8 heads, 197 tokens, head width 64):
  QK^T / PV at T tokens   one batched product "xth,xsh->xts" / "xts,xsh->xth", for T = 197 and
                          padded lengths, to show whether a rounder T helps;
  attention fwd+bwd       `einsum_attention` and its gradient w.r.t. q, k and v (one block);
  peak                    a jitted 2048 x 2048 float32 matmul.
Each row: best-of-`--repeats` time, FLOPs (XLA's cost analysis) and GFLOP/s.

  python benchmarks/attention_cost.py [--images 16] [--heads 8] [--tokens 197] [--out FILE]

Writes benchmarks/results/attention_cost_<backend>.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from kswap_jax import host_memory, workdir
from kswap_jax.models import fast_ops
from kswap_jax.progress import table

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def timed(name: str, fn, *args, repeats: int) -> dict:
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
  jax.block_until_ready(compiled(*args))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - t)
  return {"row": name, "ms": 1e3 * best, "GFLOP": flops / 1e9, "gflops": flops / best / 1e9}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=16)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--tokens", type=int, default=197)
  p.add_argument("--head_width", type=int, default=64)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--out", default="")
  args = p.parse_args()
  host_memory.retain_freed_memory()

  keys = jax.random.split(jax.random.key(0), 5)
  x, h = args.images * args.heads, args.head_width
  rows = []
  for t in (args.tokens, -(-args.tokens // 16) * 16, 256):
    a, b = (jax.random.normal(k, (x, t, h)) for k in keys[:2])
    w = jax.random.normal(keys[2], (x, t, t))
    rows.append(timed(f"QK^T at T={t}", lambda a, b: jnp.einsum("xth,xsh->xts", a, b), a, b,
                      repeats=args.repeats))
    rows.append(timed(f"PV at T={t}", lambda w, b: jnp.einsum("xts,xsh->xth", w, b), w, b,
                      repeats=args.repeats))
  q, k, v, dy = (jax.random.normal(key, (args.images, args.tokens, args.heads, h))
                 for key in keys[1:])
  grad = jax.grad(lambda q, k, v, dy: jnp.sum(fast_ops.einsum_attention(q, k, v) * dy), (0, 1, 2))
  rows.append(timed("attention fwd+bwd", grad, q, k, v, dy, repeats=args.repeats))
  m = jax.random.normal(keys[4], (2048, 2048))
  rows.append(timed("peak 2048^2 matmul", lambda a, b: a @ b, m, m, repeats=args.repeats))
  out = args.out or os.path.join(RESULTS, f"attention_cost_{jax.default_backend()}.json")
  workdir.write_json(out, {"device": str(jax.devices()[0].device_kind),
                           "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                           "jax": jax.__version__, "config": vars(args), "rows": rows})
  print(table(rows, ["row", "ms", "GFLOP", "gflops"]))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
