"""Speed of one unlearning update against the machine's matmul peak (model FLOP utilisation).

Workloads (one update = a retain batch and a forget batch through the model in training mode,
loss `CE(R) + 0.2 * relu(105 - CE(F)) + 1e-4 * S`, AdamW on a rank-8 LoRA on both MLP layers):
  face     GS-LoRA face setting: ViT F6/8 (6 blocks, width 512, 8 heads, MLP 2048) at 112 px,
           RGB, 100 classes, CosFace head, dropout 0.1, batch 8 + 8;
  vit_b16  ViT-B/16 at 224 px, RGB, 100 classes, linear head, dropout 0.1, batch 2 + 2;
  digits   the digits default: Mu/2 at 8 px, grey, 10 classes, dropout 0.1, batch 32 + 32.

For each: XLA compile time, median (and best) step time over --repeats donated-state calls
after --warmup, the step's FLOPs from XLA's `cost_analysis()`, achieved GFLOP/s, and MFU =
achieved GFLOP/s / the matmul peak in the step's dtype (a jitted N x N matmul, best of the runs
just before and just after the step is timed, so a slow or fast spell of a shared machine
shows in both), plus the compiled step's temp and argument bytes (and the device's peak bytes
where it reports them) and the host's minor page faults per step. Random weights and images:
the cost does not depend on their values. --dtypes sets `model.dtype`: bfloat16 computes
activations and matmuls in bfloat16 around float32 parameters (on 2 CPU cores it was faster
for face and vit_b16 and slower for digits); `time_vs_float32` is a row's median step time
over the float32 row of the same workload and run.

Host memory is set up as `kswap` sets it (`host_memory.retain_freed_memory`); `--host_memory
default` keeps glibc's defaults, under which every step faults its temp buffer in again.

  python benchmarks/step_speed.py [--workloads face,vit_b16,digits]
      [--rng_impls threefry2x32,rbg] [--dtypes float32,bfloat16] [--host_memory retained|default]
      [--out FILE]

Writes benchmarks/results/step_speed_<backend>.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import step_timing

from kswap_jax import heads, host_memory, lora as lora_lib, sharding, train, workdir
from kswap_jax.methods import forget
from kswap_jax.models import vit
from kswap_jax.progress import table

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# name: (variant, image size, channels, classes, head, batch per side)
WORKLOADS = {
    "face": ("F6/8", 112, 3, 100, "cosface", 8),
    "vit_b16": ("B/16", 224, 3, 100, "linear", 2),
    "digits": ("Mu/2", 8, 1, 10, "linear", 32),
}
WEIGHTS = {"beta": 0.2, "bound": 105.0, "alpha": 1e-4, "proto_bound": 0.0, "w_f": 0.0,
           "w_r": 0.0}


def matmul_peak(n: int, dtype, repeats: int) -> float:
  """Best-of-`repeats` GFLOP/s of a jitted (n, n) @ (n, n) matmul in `dtype`."""
  a, b = (jax.random.normal(k, (n, n), dtype) for k in jax.random.split(jax.random.key(0)))
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, b))
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(a, b))
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best / 1e9


def setup(workload: str | tuple, rng_impl: str, dtype: str, dropout: float = 0.1, **model):
  """(step, state, batches, loss_fn) of one GS-LoRA update for `workload` (a name in
  WORKLOADS, or an entry like theirs); model: other `config.model` settings (e.g. a checkpoint
  layout's `torch_import.MODEL_DEFAULTS`). loss_fn(trainable, frozen, hparams, batches, rng)
  -> (loss, terms) is the step's loss."""
  variant, size, channels, classes, head, n = (
      WORKLOADS[workload] if isinstance(workload, str) else workload)
  cfg = ml_collections.ConfigDict(dict(variant=variant, num_classes=classes, dropout=dropout,
                                       dtype=dtype, **model))
  base = train.Network(vit.make_model(cfg), lora_scale=1.0 / 8, rng_impl=rng_impl)
  net = heads.HeadNetwork(base, head)
  shape = (size, size, channels)
  params = vit.init_params(base.model, jax.random.key(0), shape)
  lora = lora_lib.init(jax.random.key(1), params, rank=8)
  tx = train.make_optimizer()
  state = train.init_state(params, lora, "", {"lr": 1e-2, "weight_decay": 0.05, **WEIGHTS}, 0,
                           tx, rng_impl)
  loss = forget.make_loss(forget.get_method("gs_lora"), net, "block")
  step = train.make_step(loss, tx, lambda s: 1.0, rng_impl)

  r, f = jax.random.split(jax.random.key(2))
  batches = {"retain": step_timing.random_batch(r, n, shape, classes),
             "forget": step_timing.random_batch(f, n, shape, classes),
             "ctx": {"stage_step": jnp.zeros((), jnp.int32),
                     "stage": {"alpha_warmup": jnp.zeros((), jnp.int32)}}}
  return step, state, batches, loss


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workloads", default="face,vit_b16,digits")
  p.add_argument("--rng_impls", default="threefry2x32,rbg")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--host_memory", default="retained", choices=("retained", "default"))
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.host_memory == "retained" and not host_memory.retain_freed_memory():
    raise SystemExit("error: --host_memory retained needs glibc (Linux); use --host_memory default")

  mesh = sharding.make_mesh()
  peak = lambda d: matmul_peak(args.matmul_n, jnp.dtype(d), 5)
  rows = []
  for name in args.workloads.split(","):
    if name not in WORKLOADS:
      raise SystemExit(f"error: unknown workload {name!r}; use some of {sorted(WORKLOADS)}")
    for dtype in args.dtypes.split(","):
      for impl in args.rng_impls.split(","):
        before = peak(dtype)
        r = step_timing.measure(*setup(name, impl, dtype)[:3], mesh, args.warmup, args.repeats)
        r.update(workload=name, variant=WORKLOADS[name][0], dtype=dtype, rng_impl=impl,
                 gflops=r["flops"] / r["step_ms"] / 1e6,
                 peak_gflops=max(before, peak(dtype)), step_ms_best=min(r["step_ms_all"]))
        r["mfu_%"] = 100 * r["gflops"] / r["peak_gflops"]
        r["mfu_best_%"] = 100 * r["flops"] / r["step_ms_best"] / 1e6 / r["peak_gflops"]
        ref = [x for x in rows if (x["workload"], x["rng_impl"], x["dtype"]) == (
            name, impl, "float32")]
        if ref:  # this run's float32 row of the same workload
          r["time_vs_float32"] = r["step_ms"] / ref[0]["step_ms"]
        rows.append(r)
        print(table([_show(r)], COLUMNS), flush=True)
  out = args.out or os.path.join(RESULTS, f"step_speed_{jax.default_backend()}.json")
  result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "config": vars(args),
            "rows": rows}
  workdir.write_json(out, result)
  print(f"\n{result['device']} ({result['backend']}), peak: {args.matmul_n}^2 matmul per row")
  print(table([_show(r) for r in rows], COLUMNS))
  print(f"wrote {out}")


COLUMNS = ["workload", "variant", "dtype", "rng_impl", "compile_s", "step_ms", "step_ms_best",
           "time_vs_float32", "GFLOP", "gflops", "peak_gflops", "mfu_%", "mfu_best_%",
           "temp MiB", "peak MiB", "faults/step"]


def _show(r: dict) -> dict:
  return {**r, "GFLOP": r["flops"] / 1e9, "temp MiB": r["temp_bytes"] / 2**20,
          "faults/step": r["page_faults_per_step"],
          "peak MiB": r["peak_bytes"] / 2**20 if r["peak_bytes"] >= 0 else "-"}


if __name__ == "__main__":
  main()
