"""Run-to-run spread of `step_speed.py`: the same rows in --runs fresh processes, one after another.

On shared cores both the step time and the matmul peak move between runs, and so does the MFU.
Each run is a separate `python benchmarks/step_speed.py` process (its own compilation and host
memory); this script keeps each run's rows and, per row, the minimum, median and maximum over
the runs of the median step time, the matmul peak and the MFU at the median and best steps.

  python benchmarks/step_speed_runs.py [--runs 5] [--workloads face] [--rng_impls threefry2x32]
      [--out FILE]

Writes benchmarks/results/step_speed_runs_<backend>.json and prints a table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

from kswap_jax import workdir
from kswap_jax.progress import table

HERE = os.path.dirname(os.path.abspath(__file__))
FIELDS = ("step_ms", "peak_gflops", "mfu_%", "mfu_best_%")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=5)
  p.add_argument("--workloads", default="face")
  p.add_argument("--rng_impls", default="threefry2x32")
  p.add_argument("--out", default="")
  args = p.parse_args()
  if args.runs < 1:
    raise SystemExit("error: --runs must be at least 1")

  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.runs):
      out = os.path.join(tmp, f"run{i}.json")
      cmd = [sys.executable, os.path.join(HERE, "step_speed.py"), "--workloads", args.workloads,
             "--rng_impls", args.rng_impls, "--out", out]
      print(f"run {i + 1}/{args.runs}: {' '.join(cmd[1:])}", flush=True)
      proc = subprocess.run(cmd, capture_output=True, text=True)
      if proc.returncode:
        raise SystemExit(f"error: run {i + 1} failed:\n{proc.stderr[-2000:]}")
      runs.append(workdir.read_json(out))

  summary = []
  first = runs[0]
  for j, row in enumerate(first["rows"]):
    per_run = [run["rows"][j] for run in runs]
    s = {"workload": row["workload"], "rng_impl": row["rng_impl"], "dtype": row["dtype"]}
    for f in FIELDS:
      values = [r[f] for r in per_run]
      s.update({f"{f} min": min(values), f"{f} median": statistics.median(values),
                f"{f} max": max(values)})
    summary.append(s)
  out = args.out or os.path.join(HERE, "results", f"step_speed_runs_{first['backend']}.json")
  workdir.write_json(out, {**{k: first[k] for k in ("device", "backend", "cpu_count", "jax")},
                           "config": vars(args), "summary": summary,
                           "runs": [run["rows"] for run in runs]})
  print(table(summary, ["workload", "rng_impl", "dtype"] + [f"{f} {s}" for f in FIELDS
                                                             for s in ("min", "median", "max")]))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
