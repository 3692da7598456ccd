"""FLOPs and per-device memory of one swap update under two placements of the base params.

For ViT-B/16 and ViT-L/16 at 224 px (110 classes) and the LoRA update of a swap "learn" stage
(rank 8 on every MLP Dense, head trained, retain + learn batches of 80 + 80 and of 8 + 8), it
compiles `sharding.compile_step` on 8 devices for:
  replicated  mesh data=8: base params, LoRA and optimizer state on every device;
  fsdp8       mesh data=1, fsdp=8: base kernels (MLP, attention, patch embedding) split 8 ways
              by `FSDP_RULES`; LoRA, head and optimizer state replicated.
Batches are split over all 8 devices in both. Inputs are abstract (`jax.eval_shape` and
ShapeDtypeStructs carrying shardings), so nothing model-sized is allocated. Reports XLA
`cost_analysis()` flops and `memory_analysis()` bytes of the partitioned per-device program.
Writes benchmarks/results/sharding_cost.json and prints a markdown table.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/sharding_cost.py
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import ml_collections

from kswap_jax import lora as lora_lib
from kswap_jax import sharding, train, workdir
from kswap_jax.methods import swap
from kswap_jax.models import vit
from kswap_jax.progress import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join("benchmarks", "results", "sharding_cost.json")
FSDP_RULES = (
    (r".*/MlpBlock_0/Dense_0/kernel", (None, "fsdp")),
    (r".*/MlpBlock_0/Dense_1/kernel", ("fsdp", None)),
    (r".*/(query|key|value)/kernel", ("fsdp", None, None)),
    (r".*/out/kernel", (None, None, "fsdp")),
    (r"embedding/kernel", (None, None, None, "fsdp")),
)
PLACEMENTS = {"replicated": ({"data": -1}, ()), "fsdp8": ({"data": 1, "fsdp": -1}, FSDP_RULES)}
MIB = 2**20


def abstract_state(net: train.Network, image_size: int, rank: int):
  """ShapeDtypeStruct tree of the swap train state (LoRA on MLPs, head trainable)."""
  tx = train.make_optimizer()
  hparams = {"lr": 1e-3, "weight_decay": 1e-4, **{k: 1.0 for k in swap.HPARAMS}}

  def init():
    params = vit.init_params(net.model, jax.random.key(0), (image_size, image_size, 3))
    lora = lora_lib.init(jax.random.key(1), params, rank=rank)
    return train.init_state(params, lora, "head/.*", hparams, 0, tx)

  return jax.eval_shape(init), tx


def placed(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def measure(net, state, tx, batch: int, image_size: int, mesh_axes, rules) -> dict:
  """Compiles one "learn" stage update on the mesh; XLA flops and per-device bytes."""
  mesh = sharding.make_mesh(mesh_axes)
  shardings = sharding.state_shardings(state, mesh, rules)
  one = {"images": jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8,
                                        sharding=sharding.data_sharding(mesh)),
         "labels": jax.ShapeDtypeStruct((batch,), jnp.int32,
                                        sharding=sharding.data_sharding(mesh))}
  step_fn = train.make_step(swap.stage_loss(net, "learn", "block"), tx, lambda s: 1.0)
  compiled = sharding.compile_step(step_fn, mesh, shardings).lower(
      placed(state, shardings), {"retain": one, "learn": one}).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  return {"gflops_per_device": float(cost.get("flops", -1)) / 1e9,
          "argument_mib": mem.argument_size_in_bytes / MIB,
          "output_mib": mem.output_size_in_bytes / MIB,
          "alias_mib": mem.alias_size_in_bytes / MIB,
          "temp_mib": mem.temp_size_in_bytes / MIB,
          "peak_mib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                       - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / MIB}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variants", default="B/16,L/16")
  p.add_argument("--batches", default="80,8", help="per set; the step sees retain + learn")
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--rank", type=int, default=8)
  p.add_argument("--out", default=OUT, help="relative to the repository")
  args = p.parse_args()
  if jax.device_count() != 8:
    raise SystemExit(f"needs 8 devices, found {jax.device_count()}; set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count=8")

  rows = []
  for variant in args.variants.split(","):
    cfg = ml_collections.ConfigDict(dict(variant=variant, num_classes=110, dropout=0.0,
                                         dtype="float32"))
    net = train.Network(vit.make_model(cfg), lora_scale=2.0)
    state, tx = abstract_state(net, args.image_size, args.rank)
    for batch in map(int, args.batches.split(",")):
      for name, (axes, rules) in PLACEMENTS.items():
        r = measure(net, state, tx, 2 * batch, args.image_size, axes, rules)
        rows.append({"model": f"ViT-{variant}", "batch": f"{batch}+{batch}", "sharding": name,
                     **r})
        print(rows[-1], flush=True)
  result = {"backend": jax.default_backend(), "devices": jax.device_count(),
            "jax": jax.__version__, "config": vars(args), "rows": rows}
  workdir.write_json(os.path.join(REPO, args.out), result)
  print(table(rows, ["model", "batch", "sharding", "gflops_per_device", "argument_mib",
                     "temp_mib", "peak_mib"]))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
