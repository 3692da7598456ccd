"""Cost of one Gradient Collision disposal step relative to a plain target step.

Measures, for a ViT (default: the digits demo's Mu/2 on 8x8 grey images, full fine-tune):
  plain        one `train.make_step` update on a target batch (target CE only);
  gc, K=2,4,8  one disposal update: target CE + GC over K sub-batches of one source batch,
               i.e. K per-sub-batch gradients (vmap of grad) differentiated again.
For each: XLA compile time (lower + compile, once), the step's wall time (median of
--repeats calls after --warmup calls, state donated as in training), XLA `cost_analysis()`
flops and `memory_analysis()` temp bytes. Random weights and images: the cost does not depend
on their values. Writes benchmarks/results/gc_step_cost.json and prints a table.

  python benchmarks/gc_step_cost.py [--variant B/16 --image_size 224 --channels 3 ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections

from kswap_jax import dtl, sharding, train, workdir
from kswap_jax.models import vit
from kswap_jax.progress import table

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gc_step_cost.json")


def _batch(rng, n: int, shape, classes: int) -> dict:
  a, b = jax.random.split(rng)
  return {"images": jax.random.randint(a, (n, *shape), 0, 256).astype(jnp.uint8),
          "labels": jax.random.randint(b, (n,), 0, classes)}


def measure(step_fn, state, batches, mesh, warmup: int, repeats: int) -> dict:
  """Compile once, then time `repeats` donated-state calls; XLA flops and temp bytes."""
  t0 = time.perf_counter()
  compiled = sharding.compile_step(step_fn, mesh).lower(state, batches).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  memory = compiled.memory_analysis()
  state = jax.tree_util.tree_map(jnp.copy, state)  # the caller's state survives the donation
  times = []
  for i in range(warmup + repeats):
    t = time.perf_counter()
    state, metrics = compiled(state, batches)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t)
  return {"compile_s": compile_s, "step_ms": 1e3 * statistics.median(times),
          "step_ms_all": [1e3 * t for t in times], "flops": float(cost.get("flops", -1)),
          "temp_bytes": int(memory.temp_size_in_bytes) if memory else -1}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="Mu/2")
  p.add_argument("--image_size", type=int, default=8)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--batch_size", type=int, default=32, help="target batch")
  p.add_argument("--source_batch_size", type=int, default=64, help="split into K sub-batches")
  p.add_argument("--ks", default="2,4,8")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", default=OUT)
  args = p.parse_args()

  shape = (args.image_size, args.image_size, args.channels)
  cfg = ml_collections.ConfigDict(dict(variant=args.variant, num_classes=10, dropout=0.0,
                                       dtype="float32"))
  net = train.Network(vit.make_model(cfg))
  params = vit.init_params(net.model, jax.random.key(0), shape)
  source_head = dtl.reset_head(params, 5, jax.random.key(1))["head"]
  tx = train.make_optimizer()
  hparams = {"lr": 1e-3, "weight_decay": 0.05, **{k: 1.0 for k in dtl.HPARAMS}}
  mesh = sharding.make_mesh()
  state = jax.device_put(train.init_state(params, None, ".*", hparams, 0, tx),
                         sharding.replicated(mesh))
  rng = jax.random.split(jax.random.key(2))
  batches = {"target": _batch(rng[0], args.batch_size, shape, 10),
             "source": _batch(rng[1], args.source_batch_size, shape, 5)}

  def step(method, k=2):
    loss = dtl.disposal_loss(net, source_head, method, num_splits=k)
    return train.make_step(loss, tx, lambda s: 1.0)

  rows = [{"step": "plain", "K": "-",
           **measure(step("none"), state, {"target": batches["target"]}, mesh, args.warmup,
                     args.repeats)}]
  for k in map(int, args.ks.split(",")):
    rows.append({"step": "gc", "K": k,
                 **measure(step("gc", k), state, batches, mesh, args.warmup, args.repeats)})
  base = rows[0]
  for r in rows:
    r.update(time_ratio=r["step_ms"] / base["step_ms"], flops_ratio=r["flops"] / base["flops"],
             temp_ratio=r["temp_bytes"] / max(1, base["temp_bytes"]))
  result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "config": vars(args), "trainable_params": sum(
                x.size for x in jax.tree_util.tree_leaves(params)), "rows": rows}
  workdir.write_json(args.out, result)
  print(f"{args.variant} at {args.image_size}px on {result['device']} ({result['backend']}); "
        f"target batch {args.batch_size}, source batch {args.source_batch_size}")
  print(table([{**r, "temp MiB": r["temp_bytes"] / 2**20, "GFLOP": r["flops"] / 1e9}
               for r in rows],
              ["step", "K", "compile_s", "step_ms", "time_ratio", "GFLOP", "flops_ratio",
               "temp MiB", "temp_ratio"]))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
