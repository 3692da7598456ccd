"""The segmentation swap's second validation study over seeds: runs `kswap sweep --config
configs/sweep_swap_seg_retain.py:seed=S` per seed (a finished study in its workdir is reported,
not run again) and ranks the members by their mean score over the seeds.

  python experiments/sweep_swap_seg_retain.py [--seeds 0 1 2]
      [--workdir runs/sweep_swap_seg_retain] [--out experiments/results]

Writes sweep_swap_seg_retain.json (per seed: sweep.json and each member's results.json
"evals"; the mean scores and the best member), sweep_swap_seg_retain.md (per member and seed:
validation mIoU of R, F and L after the swap and the score; the mean score) and
sweep_swap_seg_retain.png (val R and L after the swap against retain_in_learn, mean +- std
over seeds).
"""
import argparse
import os

import matplotlib
import numpy as np

from kswap_jax import workdir
from sweep_swap_seg_scenes import HERE, ROOT, run_study

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIG = "configs/sweep_swap_seg_retain.py"
GRID = ("weights.retain_in_learn", "weights.learn")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "sweep_swap_seg_retain"))
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args()
  studies = {}
  for seed in args.seeds:
    study, evals = run_study(f"{CONFIG}:seed={seed}", f"{args.workdir}_seed{seed}")
    studies[str(seed)] = {**study, "evals": evals}
  members = studies[str(args.seeds[0])]["members"]
  final = {s: {m["member"]: st["evals"][str(m["member"])][-1] for m in st["members"]}
           for s, st in studies.items()}
  scores = {s: {m["member"]: m["score"] for m in st["members"]} for s, st in studies.items()}
  mean = {m["member"]: float(np.mean([scores[s][m["member"]] for s in studies]))
          for m in members}
  best = max(mean, key=mean.get)
  command = f"kswap sweep --config {CONFIG}:seed=S --workdir runs/sweep_swap_seg_retain_seedS"
  workdir.write_json(os.path.join(args.out, "sweep_swap_seg_retain.json"),
                     {"command": command, "seeds": args.seeds, "studies": studies,
                      "mean_score": {str(k): v for k, v in mean.items()}, "best": best})
  seeds = list(studies)
  lines = ["| member | retain_in_learn | learn weight | " + " | ".join(
      f"seed {s}: val R / F / L, score" for s in seeds) + " | mean score |",
           "|---|---|---|" + "---|" * len(seeds) + "---|"]
  for m in members:
    k = m["member"]
    cells = [f"{final[s][k]['val_miou_r']:.1f} / {final[s][k]['val_miou_f']:.1f} / "
             f"{final[s][k]['val_miou_l']:.1f}, {scores[s][k]:.1f}" for s in seeds]
    lines.append(f"| {k}{' (best)' if k == best else ''} | {m[GRID[0]]:g} | {m[GRID[1]]:g} | "
                 + " | ".join(cells) + f" | {mean[k]:.1f} |")
  pre = {s: st["members"][0]["val_miou_r_pretrained"] for s, st in studies.items()}
  lines += ["", "Validation mIoU (%) of the retain (R), forget (F) and learn (L) sets after the "
            "LBF swap, per seed; pretrained (train[:90%]) val R " + ", ".join(
                f"{pre[s]:.1f} (seed {s})" for s in seeds) + f". Score per seed: "
            f"{studies[seeds[0]]['score']} (those: -300 - the shortfall); the best member has "
            "the highest mean score over the seeds. Command: "
            f"`python experiments/sweep_swap_seg_retain.py` (per seed `{command}`)."]
  with open(os.path.join(args.out, "sweep_swap_seg_retain.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharex=True)
  for ax, (key, title) in zip(axes, (("val_miou_r", "retain (R)"), ("val_miou_l", "learn (L)"))):
    for w in sorted({m[GRID[1]] for m in members}):
      row = [m for m in members if m[GRID[1]] == w]
      vals = np.array([[final[s][m["member"]][key] for m in row] for s in seeds])
      ax.errorbar([m[GRID[0]] for m in row], vals.mean(0), yerr=vals.std(0), capsize=3,
                  marker="o", label=f"learn weight {w:g}")
    if key == "val_miou_r":
      ax.axhline(np.mean(list(pre.values())), color="grey", ls="--", label="pretrained")
    weights = sorted({m[GRID[0]] for m in members})
    ax.set_xscale("log", base=2)
    ax.set_xticks(weights, [f"{w:g}" for w in weights])
    ax.minorticks_off()
    ax.set(xlabel="retain_in_learn", ylabel="val mIoU after the swap (%)", title=title)
    ax.legend(fontsize=8)
  fig.suptitle(f"segmentation LBF, seeds {', '.join(seeds)} (mean +- std)")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "sweep_swap_seg_retain.png"), dpi=120)


if __name__ == "__main__":
  main()
