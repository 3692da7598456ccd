"""LBF vs FBL for detection and segmentation on the digit scenes, over seeds.

  python experiments/swap_dense_scenes.py [--seeds 0 1 2] [--tasks detection segmentation]
      [--out experiments/results]

Per seed and task: the LBF run is the command `kswap swap --config
configs/swap_<det|seg>_scenes.py:seed=S --workdir DIR`, which pretrains first (init.pretrain),
timed end to end (wall clock, and the CPU time of the process); the FBL run then swaps from
that run's pretrained model (DIR/pretrain), timed too. Writes swap_dense_scenes.json (every
run: the per-set metric pretrained and after each stage, times), swap_dense_scenes.md (mean
+- std over seeds, and the acceptance checks per run) and swap_dense_scenes.png; rows of tasks
not run keep what the file held.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import matplotlib
import numpy as np

from kswap_jax import config_lib, runner, workdir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ORDERS = ("lbf", "fbl")
METRIC = {"detection": "ap50", "segmentation": "miou"}
CONFIG = {"detection": "swap_det_scenes.py", "segmentation": "swap_seg_scenes.py"}


def _config(task, order, seed, pretrained=""):
  c = config_lib.load(os.path.join(HERE, "..", "configs", CONFIG[task]),
                      f"order={order},seed={seed}")
  c.init.checkpoint = pretrained
  c.log_every = 10_000
  return c


def checks(pre: dict, final: dict, m: str) -> dict:
  """The acceptance targets: forget <= 10% of pretrained, retain within 5 points of pretrained,
  learn >= 70% of retain (all after the swap)."""
  return {"forget_ok": final[f"{m}_f"] <= 0.1 * pre[f"{m}_f"],
          "retain_ok": final[f"{m}_r"] >= pre[f"{m}_r"] - 5,
          "learn_ok": final[f"{m}_l"] >= 0.7 * final[f"{m}_r"]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--tasks", nargs="+", default=list(METRIC))
  ap.add_argument("--out", default=os.path.join(HERE, "results"))
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "swap_dense_scenes.json")
  rows = []
  if os.path.exists(path):
    rows = [r for r in workdir.read_json(path)["runs"] if r["task"] not in args.tasks]
  kswap = os.path.join(os.path.dirname(sys.executable), "kswap")
  with tempfile.TemporaryDirectory() as tmp:
    for seed in args.seeds:
      for task in args.tasks:
        m, run_dir = METRIC[task], os.path.join(tmp, f"{task}{seed}")
        for order in ORDERS:
          cpu0, t0 = _cpu(), time.time()
          if order == "lbf":  # the command itself, pretraining included
            subprocess.run([kswap, "swap", "--config",
                            os.path.join(HERE, "..", "configs", f"{CONFIG[task]}:seed={seed}"),
                            "--workdir", os.path.join(run_dir, order)], check=True)
            res = workdir.read_json(os.path.join(run_dir, order, "results.json"))
          else:
            res = runner.run("swap", _config(task, order, seed,
                                             os.path.join(run_dir, "lbf", "pretrain")),
                             os.path.join(run_dir, order))
          evals = {r["after"]: r for r in res["evals"]}
          pre, final = evals["pretrained"], res["evals"][-1]
          rows.append({"task": task, "metric": m, "order": order, "seed": seed,
                       "wall_s": round(time.time() - t0, 1), "cpu_s": round(_cpu() - cpu0, 1),
                       "with_pretrain": order == "lbf",
                       **{f"{after}_{k}": evals[after][f"{m}_{k}"] for after in evals
                          for k in "rfl"},
                       **checks(pre, final, m)})
          print(rows[-1], flush=True)
          _write(rows, args)


def _cpu() -> float:
  """User + system CPU seconds of this process and its finished children."""
  return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF,
                                                             resource.RUSAGE_CHILDREN)
             for f in ("ru_utime", "ru_stime"))


def _write(rows, args):
  workdir.write_json(os.path.join(args.out, "swap_dense_scenes.json"),
                     {"runs": rows, "seeds": args.seeds})
  lines = ["| task | order | metric | stage | retain | forget | learn |", "|---" * 7 + "|"]
  for task in dict.fromkeys(r["task"] for r in rows):
    for order in ORDERS:
      sel = [r for r in rows if r["task"] == task and r["order"] == order]
      if not sel:
        continue
      stages = ("pretrained", *(("learn", "forget") if order == "lbf" else ("forget", "learn")))
      for st in stages:
        cells = [f"{np.mean([r[f'{st}_{k}'] for r in sel]):.1f} ± "
                 f"{np.std([r[f'{st}_{k}'] for r in sel]):.1f}" for k in "rfl"]
        lines.append(f"| {task} | {order} | {sel[0]['metric'].upper()} | after {st} | "
                     + " | ".join(cells) + " |")
  lines += ["", "Per run: the acceptance checks after the swap (forget <= 10% of pretrained, "
            "retain >= pretrained - 5, learn >= 70% of retain), wall-clock and CPU seconds on "
            "the shared 2-core CPU (LBF: the `kswap swap` command, pretraining included; FBL: "
            "the swap from the same pretrained model).", "",
            "| task | order | seed | forget ok | retain ok | learn ok | wall s | CPU s |",
            "|---" * 8 + "|"]
  lines += [f"| {r['task']} | {r['order']} | {r['seed']} | {r['forget_ok']} | {r['retain_ok']} "
            f"| {r['learn_ok']} | {r['wall_s']} | {r['cpu_s']} |" for r in rows]
  lines.append(f"\nSeeds {args.seeds}. Command: `python experiments/swap_dense_scenes.py`.")
  with open(os.path.join(args.out, "swap_dense_scenes.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    x = np.arange(3)
    sel = [r for r in rows if r["task"] == task]
    bars = [("pretrained", [r for r in sel if r["order"] == "lbf"], "pretrained_")]
    bars += [(o.upper(), [r for r in sel if r["order"] == o], None) for o in ORDERS]
    for i, (name, runs, prefix) in enumerate(bars):
      if not runs:
        continue
      final = prefix or ("forget_" if name == "LBF" else "learn_")
      vals = np.array([[r[f"{final}{k}"] for k in "rfl"] for r in runs])
      ax.bar(x + (i - 1) * 0.27, vals.mean(0), 0.27, yerr=vals.std(0), label=name)
    ax.set_xticks(x, ["retain", "forget", "learn"])
    ax.set_ylabel(f"test {sel[0]['metric'].upper()} (%)")
    ax.set_title(f"{task} (digit scenes, {len(set(r['seed'] for r in sel))} seeds)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "swap_dense_scenes.png"), dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
