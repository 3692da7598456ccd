"""Cost of one Gradient Collision disposal step relative to a plain target step.

Measures, for a ViT (default: the digits demo's Mu/2 on 8x8 grey images, full fine-tune):
  plain        one `train.make_step` update on a target batch (target CE only);
  gc           one disposal update: target CE + GC over K sub-batches of one source batch,
               for each K of --ks and each way of differentiating GC of --vjps ("hvp":
               Hessian-vector products one sub-batch at a time; "autodiff": vmap of grad,
               differentiated by reverse mode), GC measured on every trainable parameter;
  gc:<part>    the same at K = --part_k with the first of --vjps, GC measured on part of the
               network (--parts: the last block, the last half of the blocks, the first
               block, or a rank-8 LoRA on the MLPs, whose plain step is the LoRA's own).
For each: XLA compile time (lower + compile, once), XLA `cost_analysis()` flops (for "hvp"
rows counted with its loops unrolled) and `memory_analysis()` temp bytes, and unless
--memory_only the step's wall time (median of --repeats calls after --warmup calls, state
donated as in training); every ratio is against the plain step of the same run. Random weights
and images: the cost does not depend on their values. --leakage (digits model only) also runs
`configs/dispose_digits.py` once per part and seed of --seeds (GC on that part, everything else
the config's) and records the target accuracy and the mean PL leakage. Writes
benchmarks/results/gc_step_cost.json (or --out, relative to the repository) and prints a table.

  python benchmarks/gc_step_cost.py [--leakage --seeds 0]
  python benchmarks/gc_step_cost.py --variant B/16 --image_size 224 --channels 3 \
      --memory_only --out benchmarks/results/gc_step_cost_b16.json
"""
from __future__ import annotations

import argparse
import functools
import os
import time
from unittest import mock

import jax
import ml_collections
import numpy as np
import step_timing

from kswap_jax import config_lib, heads, runner, sharding, train, workdir
from kswap_jax import lora as lora_lib
from kswap_jax.methods import dispose
from kswap_jax.models import vit
from kswap_jax.progress import table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join("benchmarks", "results", "gc_step_cost.json")
PARTS = ("last_block", "last_half", "first_block", "lora")


def part_regex(part: str, depth: int) -> str:
  """GC's `dispose.gc_params` regex for a part of a ViT with `depth` blocks."""
  block = lambda i: f"params/Transformer/encoderblock_{i}/.*"  # noqa: E731
  return {"all": ".*", "last_block": block(depth - 1), "first_block": block(0),
          "last_half": "params/Transformer/encoderblock_(" + "|".join(
              str(i) for i in range(depth // 2, depth)) + ")/.*",
          "lora": "lora/.*"}[part]


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", -1))


def analyse(step_fn, state, batches, mesh) -> dict:
  """Compile time, XLA flops and temp / argument bytes of the donated-state step, not run."""
  t0 = time.perf_counter()
  compiled = sharding.compile_step(step_fn, mesh).lower(state, batches).compile()
  memory = compiled.memory_analysis()
  return {"compile_s": time.perf_counter() - t0, "flops": _flops(compiled),
          "temp_bytes": int(memory.temp_size_in_bytes),
          "argument_bytes": int(memory.argument_size_in_bytes)}


def unrolled_flops(step_fn, state, batches, mesh) -> float:
  """XLA flops of the step with every `lax.scan` unrolled: XLA's cost analysis counts a loop
  body once, whatever its trip count (the "hvp" GC loops over the K sub-batches)."""
  fresh = lambda s, b: step_fn(s, b)  # noqa: E731  (not jit's cached trace of step_fn)
  with mock.patch.object(jax.lax, "scan", functools.partial(jax.lax.scan, unroll=True)):
    return _flops(sharding.compile_step(fresh, mesh).lower(state, batches).compile())


def leakage_runs(parts: list[str], seeds: list[int], runs_dir: str) -> dict:
  """{part: {"target_acc", "leakage", "runs"}}: configs/dispose_digits.py with GC on `part`,
  means over `seeds` (run directories under `runs_dir`, reused when finished)."""
  out = {}
  for part in ["all", *parts]:
    accs, leaks = [], []
    for seed in seeds:
      config = config_lib.load(os.path.join(REPO, "configs", "dispose_digits.py"),
                               f"seed={seed}" + (",finetune=lora" if part == "lora" else ""))
      config.dispose.gc_params = part_regex(part, 4)
      results = runner.run("dispose", config, os.path.join(runs_dir, f"{part}_seed{seed}"))
      accs.append(results["evals"][-1]["target_acc"])
      leaks.append(np.mean([r["leakage"] for r in results["pl"].values()]))
    out[part] = {"target_acc": float(np.mean(accs)), "leakage": float(np.mean(leaks)),
                 "runs": len(seeds)}
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variant", default="Mu/2")
  p.add_argument("--image_size", type=int, default=8)
  p.add_argument("--channels", type=int, default=1)
  p.add_argument("--batch_size", type=int, default=32, help="target batch")
  p.add_argument("--source_batch_size", type=int, default=64, help="split into K sub-batches")
  p.add_argument("--ks", default="2,4,8")
  p.add_argument("--vjps", default="hvp,autodiff")
  p.add_argument("--parts", default=",".join(PARTS))
  p.add_argument("--part_k", type=int, default=4)
  p.add_argument("--memory_only", action="store_true", help="compile and analyse, no timing")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=31)
  p.add_argument("--leakage", action="store_true", help="dispose runs on the digits per part")
  p.add_argument("--seeds", default="0")
  p.add_argument("--runs_dir", default=os.path.join("runs", "gc_step_cost"))
  p.add_argument("--out", default=OUT, help="relative to the repository")
  args = p.parse_args()
  parts = [x for x in args.parts.split(",") if x]
  if set(parts) - set(PARTS):
    raise SystemExit(f"error: --parts has {sorted(set(parts) - set(PARTS))}; use some of {PARTS}")
  if args.leakage and (args.variant, args.image_size, args.channels) != ("Mu/2", 8, 1):
    raise SystemExit("error: --leakage runs the digits config; drop --variant / --image_size")

  shape = (args.image_size, args.image_size, args.channels)
  cfg = ml_collections.ConfigDict(dict(variant=args.variant, num_classes=10, dropout=0.0,
                                       dtype="float32"))
  net = train.Network(vit.make_model(cfg), lora_scale=1.0 / 8)
  depth = vit.get_variant(args.variant)["depth"]
  params = vit.init_params(net.model, jax.random.key(0), shape)
  source_head = heads.reset_head(params, 5, jax.random.key(1))["head"]
  tx = train.make_optimizer()
  hparams = {"lr": 1e-3, "weight_decay": 0.05, **{k: 1.0 for k in dispose.HPARAMS}}
  mesh = sharding.make_mesh()
  lora = lora_lib.init(jax.random.key(3), params, rank=8)
  states = {"full": train.init_state(params, None, ".*", hparams, 0, tx),
            "lora": train.init_state(params, lora, "head/.*", hparams, 0, tx)}
  rng = jax.random.split(jax.random.key(2))
  batches = {"target": step_timing.random_batch(rng[0], args.batch_size, shape, 10),
             "source": step_timing.random_batch(rng[1], args.source_batch_size, shape, 5)}

  def row(name, k, vjp, part, method):
    finetune = "lora" if part == "lora" else "full"
    loss = dispose.disposal_loss(net, source_head, method, num_splits=k,
                                 gc_params=part_regex(part, depth), gc_vjp=vjp)
    step = train.make_step(loss, tx, lambda s: 1.0)
    b = batches if method == "gc" else {"target": batches["target"]}
    if args.memory_only:
      r = analyse(step, states[finetune], b, mesh)
    else:
      r = step_timing.measure(step, states[finetune], b, mesh, args.warmup, args.repeats)
    if method == "gc" and vjp == "hvp":
      r["flops"] = unrolled_flops(step, states[finetune], b, mesh)
    r = {"step": name, "finetune": finetune, "K": k if method == "gc" else "-",
         "vjp": vjp if method == "gc" else "-",
         "gc_params": part_regex(part, depth) if method == "gc" else "-", **r}
    print(f"  {name} ({finetune}) K={r['K']} {r['vjp']}: {r['temp_bytes'] / 2**20:.1f} MiB "
          f"temp, {r['flops'] / 1e9:.2f} GFLOP", flush=True)
    return r

  rows = [row("plain", 2, "hvp", "all", "none")]
  if "lora" in parts:
    rows.append(row("plain", 2, "hvp", "lora", "none"))
  vjps = args.vjps.split(",")
  rows += [row("gc", k, vjp, "all", "gc") for vjp in vjps for k in map(int, args.ks.split(","))]
  rows += [row(f"gc:{part}", args.part_k, vjps[0], part, "gc") for part in parts]
  base = {r["finetune"]: r for r in rows if r["step"] == "plain"}
  for r in rows:
    b = base[r["finetune"]]
    r.update(flops_ratio=r["flops"] / b["flops"],
             temp_ratio=r["temp_bytes"] / max(1, b["temp_bytes"]))
    if not args.memory_only:
      r["time_ratio"] = r["step_ms"] / b["step_ms"]
  leak = {}
  if args.leakage:
    leak = leakage_runs(parts, [int(s) for s in args.seeds.split(",")],
                        os.path.join(REPO, args.runs_dir))
    for r in rows:
      part = r["step"].partition(":")[2] or ("all" if r["step"] == "gc" else "")
      if part in leak and (part != "all" or r["K"] == args.part_k and r["vjp"] == vjps[0]):
        r.update(leak[part])
  out = os.path.join(REPO, args.out)
  result = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "config": vars(args), "trainable_params": sum(
                x.size for x in jax.tree_util.tree_leaves(params)), "rows": rows,
            "leakage": leak}
  workdir.write_json(out, result)
  print(f"{args.variant} at {args.image_size}px on {result['device']} ({result['backend']}); "
        f"target batch {args.batch_size}, source batch {args.source_batch_size}")
  columns = ["step", "finetune", "K", "vjp", "compile_s", "GFLOP", "flops_ratio", "temp MiB",
             "temp_ratio"]
  columns += [] if args.memory_only else ["step_ms", "time_ratio"]
  columns += ["target_acc", "leakage"] if leak else []
  print(table([{**r, "temp MiB": r["temp_bytes"] / 2**20, "GFLOP": r["flops"] / 1e9}
               for r in rows], columns))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
