"""Where one update's time goes on XLA:CPU: per-op times from a JAX profiler trace.

Compiles a `step_speed.py` workload's update, runs it --warmup times, then traces --steps calls
with `jax.profiler` (a Perfetto trace) and matches every executed op to its HLO instruction.
An op's time is from its start to its end event: XLA:CPU runs some ops (its Eigen dots)
asynchronously, beside the ops that follow, so their own trace event is shorter than they
take, and times of ops that overlap add up to more than the step. Reported per step:
  ops       the --top slowest ops: name, GFLOP/s of its dots, output shape, JAX op name;
  groups    ops summed over the blocks (`encoderblock_*`), by JAX op name and HLO op kind
            (`ynn` = an XNNPACK/YNNPACK fusion, `dot` = a dot XLA:CPU runs itself,
            `fusion` = an elementwise or reduction fusion).

  python benchmarks/step_profile.py [--workload face] [--rng_impl threefry2x32]
      [--steps 3] [--top 25] [--out FILE]

Writes benchmarks/results/step_profile_<workload>_<backend>.json and prints both tables.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import re
import tempfile
import time

import jax
import step_speed

from kswap_jax import host_memory, sharding, workdir
from kswap_jax.progress import table

_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\(")


def hlo_ops(hlo_text: str) -> dict[str, dict]:
  """{instruction name: {"shape", "kind", "op_name", "gflop"}} of every instruction in the HLO
  text; "gflop" counts the dots an instruction runs (its own, or those of the computation a
  fusion calls): 2 x output size x contracted size."""
  ops, dims, calls, own_flops = {}, {}, {}, {}
  computation_flops = collections.Counter()
  computation = ""
  for line in hlo_text.splitlines():
    header = re.match(r"(?:ENTRY )?%([\w.\-]+) \(", line)
    if header:
      computation = header.group(1)
      continue
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, opcode = m.group(1), m.group(2), m.group(3)
    dims[name] = [int(d) for d in re.findall(r"\d+", shape.split("{")[0].split("[", 1)[-1])]
    if opcode == "dot":
      lhs = re.search(r"dot\(([^,)]*)", line).group(1).split("%")[-1]
      axes = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line).group(1)
      contracted = math.prod(dims[lhs][int(a)] for a in axes.split(",") if a)
      own_flops[name] = 2 * math.prod(dims[name]) * contracted
      computation_flops[computation] += own_flops[name]
    called = re.search(r"calls=%([\w.\-]+)", line)
    calls[name] = called.group(1) if called else ""
    op_name = re.search(r'op_name="([^"]*)"', line)
    kind = ("ynn" if "__ynn_fusion" in line else "dot" if opcode == "dot"
            else "fusion" if opcode == "fusion" else opcode)
    ops[name] = {"shape": shape.split("{")[0], "kind": kind,
                 "op_name": op_name.group(1) if op_name else ""}
  for name, op in ops.items():
    op["gflop"] = own_flops.get(name, computation_flops[calls[name]]) / 1e9
  return ops


def op_times(events: list[dict], names: set[str], steps: int) -> dict[str, float]:
  """ms per step of each traced op in `names`, start to end event (`end: <name>`)."""
  starts, ends = collections.defaultdict(list), collections.defaultdict(list)
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e["name"]
    if name.startswith("end: ") and name[5:] in names:
      ends[name[5:]].append(e["ts"] + e["dur"])
    elif name in names:
      starts[name].append((e["ts"], e["ts"] + e["dur"]))
  out = {}
  for name, spans in starts.items():
    spans.sort()
    stops = sorted(ends.get(name, []))
    finish = stops if len(stops) == len(spans) else [stop for _, stop in spans]
    out[name] = sum(f - s for (s, _), f in zip(spans, finish)) / 1e3 / steps
  return out


def _group(op_name: str) -> str:
  return re.sub(r"encoderblock_\d+", "encoderblock_*", op_name.removeprefix("jit(step)/"))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workload", default="face", choices=sorted(step_speed.WORKLOADS))
  p.add_argument("--rng_impl", default="threefry2x32")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.steps < 1 or args.top < 1:
    raise SystemExit("error: --steps and --top must be >= 1")
  host_memory.retain_freed_memory()  # before JAX starts its CPU threads
  if jax.default_backend() != "cpu":
    raise SystemExit("error: step_profile.py reads XLA:CPU's trace events; on GPU or TPU open "
                     "a jax.profiler trace in XProf / TensorBoard instead")

  step, state, batches, _ = step_speed.setup(args.workload, args.rng_impl, "float32")
  mesh = sharding.make_mesh()
  state = jax.device_put(state, sharding.replicated(mesh))
  compiled = sharding.compile_step(step, mesh).lower(state, batches).compile()
  ops = hlo_ops(compiled.as_text())
  for _ in range(args.warmup):
    state, metrics = compiled(state, batches)
    jax.block_until_ready((state, metrics))
  t = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batches)
    jax.block_until_ready((state, metrics))
  untraced_ms = 1e3 * (time.perf_counter() - t) / args.steps
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, batches)
      jax.block_until_ready((state, metrics))
    step_ms = 1e3 * (time.perf_counter() - t) / args.steps
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(trace_dir, "plugins/profile/*/perfetto_trace.json.gz"))
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  times = op_times(events, set(ops), args.steps)
  rows = sorted(({"op": n, "ms": ms, **ops[n]} for n, ms in times.items()),
                key=lambda r: -r["ms"])
  groups = collections.defaultdict(lambda: {"ms": 0.0, "count": 0, "gflop": 0.0})
  for r in rows:
    g = groups[(_group(r["op_name"]), r["kind"])]
    g["ms"] += r["ms"]
    g["count"] += 1
    g["gflop"] += r["gflop"]
  group_rows = sorted(({"op_name": k[0], "kind": k[1], **v} for k, v in groups.items()),
                      key=lambda r: -r["ms"])
  for r in rows + group_rows:
    r["gflops"] = r["gflop"] / r["ms"] * 1e3 if r["gflop"] and r["ms"] else 0.0
  out = args.out or os.path.join(step_speed.RESULTS,
                                 f"step_profile_{args.workload}_{jax.default_backend()}.json")
  workdir.write_json(out, {"device": str(jax.devices()[0].device_kind),
                           "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
                           "jax": jax.__version__, "config": vars(args),
                           "step_ms": untraced_ms, "step_ms_traced": step_ms, "ops_ms_sum": sum(times.values()),
                           "groups": group_rows, "ops": rows})
  print(table(rows[: args.top], ["op", "ms", "gflops", "kind", "shape", "op_name"]))
  print()
  print(table(group_rows[: args.top], ["ms", "count", "gflops", "kind", "op_name"]))
  print(f"\nstep {untraced_ms:.0f} ms, {step_ms:.0f} ms traced; the ops' times add up to {sum(times.values()):.0f} ms "
        f"(async ops overlap others)\nwrote {out}")


if __name__ == "__main__":
  main()
