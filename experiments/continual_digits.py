"""Continual forgetting on the embedded digits: GS-LoRA, GS-LoRA++ and every baseline, each
tuned with the same budget on validation data.

  PYTHONPATH=. python experiments/continual_digits.py [--workdir /tmp/continual_digits]

Protocol: configs/forget_digits.py (Mu/2 pretrained on all ten digits; 4 tasks of 2 digits in
the authors' class order; 10% of each task's retain and forget images; model selection on
train[90%:]). One pretrained model (seed 0) is shared. Every method gets one 8-member study
(configs/sweep_forget_digits.py `fair`: 2 learning rates x 4 values of its main loss weight,
vmapped), scored by mean validation H; its best member is seed 0, and the same config runs
again with seeds 1 and 2 (retain subset, init, batch order). Methods run side by side in
`--jobs` worker processes (default: one per core), each with its own compilation cache.
Writes experiments/results/continual_digits.{md,json,png}: per task Acc_r, Acc_f, Acc_o and H
on the test split as mean ± std over the seeds, mean H, trainable share and wall time per task.
"""
from __future__ import annotations

import argparse
from concurrent import futures
import contextlib
import io
import multiprocessing
import os
import shutil
import time

import jax
import matplotlib
import numpy as np

from kswap_jax import config_lib, runner, sweep, workdir
from kswap_jax.methods import forget

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "experiments", "results", "continual_digits")
METHODS = tuple(forget.METHODS)
SEEDS = (0, 1, 2)
METRICS = (("acc_r", "Acc_r"), ("acc_f", "Acc_f"), ("acc_o", "Acc_o"), ("H", "H"))


def load(name: str, arg: str):
  return config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"), arg)


def quiet(fn, *args):
  """Runs fn(*args) with its progress lines and tables kept off stdout."""
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args)


def init_worker(cache_dir: str) -> None:
  """A worker process's persistent compilation cache (its own folder: no shared writes)."""
  jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir, str(os.getpid())))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def method_runs(method: str, pre_model: str, root: str) -> dict:
  """One method's study and seeds: {"best" (the best member's assignment), "val_H" (its mean
  validation H), "study_minutes", "runs" (results per seed), "seconds" (wall per seed run)}.

  Seed 0 is the study's best member itself (a study member equals its single run,
  tests/test_sweep.py); seeds 1 and 2 are single runs of that member's config.
  """
  c = load("sweep_forget_digits", f"method={method},fair")
  c.base.init.checkpoint = pre_model
  c.log_every = 10**6
  t0 = time.time()
  res = quiet(runner.sweep, c, os.path.join(root, f"study_{method}"))
  out = {"study_minutes": (time.time() - t0) / 60, "seconds": []}
  member = res["members"][res["best"]]
  out.update(best={k: member[k] for k in sweep.flatten(c.grid)}, val_H=member["val_H"],
             runs=[{"tasks": member["tasks"]}])
  for seed in SEEDS[1:]:
    cfg = sweep.member_config(load("forget_digits", f"method={method},seed={seed}"),
                              out["best"])
    cfg.init.checkpoint = pre_model
    cfg.log_every = 10**6
    t0 = time.time()
    out["runs"].append(quiet(runner.run, "forget", cfg, os.path.join(root, f"{method}_{seed}")))
    out["seconds"].append(time.time() - t0)
  return out


def run_all(root: str, methods, jobs: int) -> tuple[dict, dict]:
  """(pretrain results, {method: method_runs(...)}), the methods spread over `jobs` worker
  processes (a digits run keeps about one core busy)."""
  pre_cfg = load("forget_digits", "seed=0").init.pretrain
  pre_cfg.log_every = 10**6
  pre_dir = os.path.join(root, "pretrain")
  pre = quiet(runner.run, "pretrain", pre_cfg, pre_dir)
  print(f"pretrained Mu/2: test top-1 {pre['test_accuracy']:.2f}%", flush=True)
  out = {}
  pool = futures.ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"), init_worker,
                                     (os.path.join(root, "jax_cache"),))
  with pool:
    pending = {pool.submit(method_runs, m, os.path.join(pre_dir, "model"), root): m
               for m in methods}
    for done in futures.as_completed(pending):
      method, r = pending[done], done.result()
      out[method] = r
      print(f"{method:20s} study {r['study_minutes']:.1f} min, best {r['best']} "
            f"(val H {r['val_H']:.2f}); mean H per seed "
            + " ".join(f"{np.mean([t['H'] for t in run['tasks']]):.2f}" for run in r["runs"])
            + f"; seed runs {' '.join(f'{x:.0f}' for x in r['seconds'])} s", flush=True)
  return pre, {m: out[m] for m in methods}


def summarize(results: dict) -> dict:
  """{method: {"tasks": [{task, forget, metric: [mean, std]}], "mean_H": [mean, std],
  "trainable_%", "s_per_task", "best", "val_H"}} over the seeds."""
  out = {}
  for method, r in results.items():
    seeds = r["runs"]
    rows = []
    for t, first in enumerate(seeds[0]["tasks"]):
      row = {"task": t, "forget": first["forget"]}
      for key, _ in METRICS:
        vals = np.array([s["tasks"][t][key] for s in seeds], float)
        row[key] = [float(np.mean(vals)), float(np.std(vals))]
      rows.append(row)
    mean_h = [np.mean([x["H"] for x in s["tasks"]]) for s in seeds]
    out[method] = {"tasks": rows, "mean_H": [float(np.mean(mean_h)), float(np.std(mean_h))],
                   "trainable_%": seeds[0]["tasks"][0]["trainable_%"],
                   "s_per_task": float(np.mean(r["seconds"])) / len(rows),
                   "study_minutes": r["study_minutes"],
                   "best": r["best"], "val_H": r["val_H"]}
  return out


def _pm(v) -> str:
  return "n/a" if np.isnan(v[0]) else f"{v[0]:.2f} ± {v[1]:.2f}"


def markdown(pre: dict, summary: dict, minutes: float, config) -> str:
  ranked = sorted(summary, key=lambda m: -summary[m]["mean_H"][0])
  gs = summary.get("gs_lora")
  tr = config.train
  lines = [
      "# Continual forgetting on digits: GS-LoRA, GS-LoRA++ and the paper's baselines", "",
      f"Generated by `experiments/continual_digits.py` in {minutes:.1f} min on CPU.", "",
      f"- Model: ViT Mu/2 (4 blocks, width 64) pretrained on all ten digits of `sklearn_digits` "
      f"`train[:90%]`; test top-1 {pre['test_accuracy']:.2f}% on `test` (360 images).",
      "- Protocol: the authors' class order "
      "(`random.seed(1337); random.shuffle(list(range(10)))`); 4 tasks of 2 digits; task t "
      "forgets `order[8-2t:10-2t]`, retains `order[:8-2t]`; "
      "earlier-forgotten digits (Acc_o) get no signal. 10% of a task's retain and forget images.",
      f"- Training: {tr.epochs} epochs per task (SCRUB: {config.baselines.superepochs} "
      f"superepochs), batch {tr.batch_size} (R) + {tr.batch_size} (F), AdamW, per-epoch cosine "
      f"lr to {tr.lr_end:g}; each task's model chosen by validation H (`train[90%:]`) every "
      f"{config.eval_every_epochs} epoch(s). Methods: `kswap_jax/methods/forget.py` and "
      "`forget_baselines.py` (the authors' baselines, as their code does them).",
      "- Tuning, the same for every method: one 8-member study (2 learning rates x 4 values of "
      "the method's main loss weight; retrain / finetune: 4 learning rates x 2 weight decays; "
      "`configs/sweep_forget_digits.py` `fair`), best mean validation H; that member is seed 0 "
      f"and its config runs again on seeds {list(SEEDS[1:])}. Test data is only reported: "
      "mean ± std over seeds, top-1 %.",
      "- study min: the 8-member study's wall time; s/task: wall time of a seed-1/2 run "
      "(measuring included) over its 4 tasks; two methods at a time on a "
      "2-core CPU.", "",
      "## Ranking (mean H over tasks)", "",
      "| rank | method | mean H | best member (study) | val H | trainable % | study min | "
      "s/task |", "|---|---|---|---|---|---|---|---|"]
  for i, m in enumerate(ranked):
    s = summary[m]
    best = ", ".join(f"{k.split('.')[-1]}={v:g}" for k, v in s["best"].items())
    lines.append(f"| {i + 1} | {m} | {_pm(s['mean_H'])} | {best} | {s['val_H']:.2f} | "
                 f"{s['trainable_%']:.2f} | {s['study_minutes']:.1f} | {s['s_per_task']:.1f} |")
  lines += ["", "## Per task", "",
            "| method | task (forget) | Acc_r | Acc_f | Acc_o | H |", "|---|---|---|---|---|---|"]
  for m in ranked:
    for r in summary[m]["tasks"]:
      lines.append(f"| {m} | {r['task']} ({r['forget']}) | "
                   + " | ".join(_pm(r[k]) for k, _ in METRICS) + " |")
  if gs:
    beat = [m for m in ranked if summary[m]["mean_H"][0] > gs["mean_H"][0]]
    per_task = {m: [r["task"] for r, g in zip(summary[m]["tasks"], gs["tasks"])
                    if r["H"][0] > g["H"][0]] for m in ranked if m != "gs_lora"}
    lines += ["", "## Where GS-LoRA stands", "",
              f"- GS-LoRA ranks {ranked.index('gs_lora') + 1} of {len(ranked)} by mean H "
              f"({gs['mean_H'][0]:.2f})" + (f"; above it: {', '.join(beat)}." if beat else
                                            "; no method is above it."),
              "- Tasks where a method's mean H beats GS-LoRA's: " + ("; ".join(
                  f"{m} (task {', '.join(map(str, ts))})" for m, ts in per_task.items() if ts)
                  or "none") + "."]
  lines += ["", "Acc_o is n/a for task 0 (no earlier task). Plot: `continual_digits.png`.", ""]
  return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
  fig, axes = plt.subplots(1, 4, figsize=(16, 4))
  colours = plt.get_cmap("tab20")(np.linspace(0, 1, len(summary)))
  for ax, (key, name) in zip(axes, METRICS):
    for (method, s), colour in zip(summary.items(), colours):
      x = [r["task"] for r in s["tasks"]]
      ax.errorbar(x, [r[key][0] for r in s["tasks"]], yerr=[r[key][1] for r in s["tasks"]],
                  marker="o", capsize=3, label=method, color=colour,
                  lw=2.5 if method.startswith("gs_lora") else 1)
    ax.set_title(name)
    ax.set_xlabel("task")
    ax.set_xticks(range(len(x)))
    ax.set_ylim(-5, 105)
  axes[0].set_ylabel("test top-1 (%)")
  axes[-1].legend(fontsize=6, ncol=2)
  fig.suptitle("Continual forgetting on digits (Mu/2), each method tuned by an 8-member "
               "validation study: mean ± std over 3 seeds", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/continual_digits",
                      help="scratch directory for the runs (emptied first)")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help="comma-separated methods (default: every forget method)")
  parser.add_argument("--jobs", type=int, default=os.cpu_count(),
                      help="worker processes, each running one method at a time")
  args = parser.parse_args()
  shutil.rmtree(args.workdir, ignore_errors=True)
  os.makedirs(args.workdir)
  init_worker(os.path.join(args.workdir, "jax_cache"))
  t0 = time.time()
  pre, results = run_all(args.workdir, args.methods.split(","), args.jobs)
  summary = summarize(results)
  minutes = (time.time() - t0) / 60
  workdir.write_json(OUT + ".json", {
      "minutes": minutes, "seeds": SEEDS, "pretrained_test_accuracy": pre["test_accuracy"],
      "summary": summary,
      "runs": {m: [r["tasks"] for r in v["runs"]] for m, v in results.items()}})
  text = markdown(pre, summary, minutes, load("forget_digits", "seed=0"))
  with open(OUT + ".md", "w") as f:
    f.write(text)
  plot(summary, OUT + ".png")
  print(text)


if __name__ == "__main__":
  main()
