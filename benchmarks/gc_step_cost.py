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

import jax
import ml_collections
import step_timing

from kswap_jax import heads, sharding, train, workdir
from kswap_jax.methods import dispose
from kswap_jax.models import vit
from kswap_jax.progress import table

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gc_step_cost.json")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="Mu/2")
  p.add_argument("--image_size", type=int, default=8)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--batch_size", type=int, default=32, help="target batch")
  p.add_argument("--source_batch_size", type=int, default=64, help="split into K sub-batches")
  p.add_argument("--ks", default="2,4,8")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=31)
  p.add_argument("--out", default=OUT)
  args = p.parse_args()

  shape = (args.image_size, args.image_size, args.channels)
  cfg = ml_collections.ConfigDict(dict(variant=args.variant, num_classes=10, dropout=0.0,
                                       dtype="float32"))
  net = train.Network(vit.make_model(cfg))
  params = vit.init_params(net.model, jax.random.key(0), shape)
  source_head = heads.reset_head(params, 5, jax.random.key(1))["head"]
  tx = train.make_optimizer()
  hparams = {"lr": 1e-3, "weight_decay": 0.05, **{k: 1.0 for k in dispose.HPARAMS}}
  mesh = sharding.make_mesh()
  state = train.init_state(params, None, ".*", hparams, 0, tx)
  rng = jax.random.split(jax.random.key(2))
  batches = {"target": step_timing.random_batch(rng[0], args.batch_size, shape, 10),
             "source": step_timing.random_batch(rng[1], args.source_batch_size, shape, 5)}

  def step(method, k=2):
    loss = dispose.disposal_loss(net, source_head, method, num_splits=k)
    return train.make_step(loss, tx, lambda s: 1.0)

  rows = [{"step": "plain", "K": "-",
           **step_timing.measure(step("none"), state, {"target": batches["target"]}, mesh, args.warmup,
                     args.repeats)}]
  for k in map(int, args.ks.split(",")):
    rows.append({"step": "gc", "K": k,
                 **step_timing.measure(step("gc", k), state, batches, mesh, args.warmup, args.repeats)})
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
