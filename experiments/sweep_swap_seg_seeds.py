"""The segmentation swap's validation studies over seeds: runs `kswap sweep --config
configs/sweep_swap_seg_<study>.py:seed=S` per seed (a finished study in its workdir is reported,
not run again) and ranks the members by their mean score over the seeds.

  python experiments/sweep_swap_seg_seeds.py --study retain|forget [--seeds 0 1 2]
      [--workdir runs/sweep_swap_seg_<study>] [--out experiments/results]

Studies (`STUDIES`): retain, the learn stage's retain weight x the learn weight; forget, LBF's
forget stage's retain weight x the forget loss's bound. Writes sweep_swap_seg_<study>.json
(per seed: sweep.json and each member's results.json "evals"; the mean scores and the best
member), sweep_swap_seg_<study>.md (per member and seed: validation mIoU of R, F and L after
the swap and the score; the mean score) and sweep_swap_seg_<study>.png (val R, F and L after
the swap against the study's first field, one line per value of its second, mean +- std over
seeds).
"""
import argparse
import os

import matplotlib
import numpy as np

from kswap_jax import workdir
from sweep_swap_seg_scenes import HERE, ROOT, run_study

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# study -> the two swept fields, the first on the plots' x axis
STUDIES = {"retain": ("weights.retain_in_learn", "weights.learn"),
           "forget": ("weights.retain", "weights.bound")}
SETS = (("val_miou_r", "retain (R)"), ("val_miou_f", "forget (F)"), ("val_miou_l", "learn (L)"))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--study", choices=sorted(STUDIES), required=True)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--workdir", default="", help="default: runs/sweep_swap_seg_<study>")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args()
  name, grid = f"sweep_swap_seg_{args.study}", STUDIES[args.study]
  config = f"configs/{name}.py"
  run_dir = args.workdir or os.path.join(ROOT, "runs", name)
  studies = {}
  for seed in args.seeds:
    study, evals = run_study(f"{config}:seed={seed}", f"{run_dir}_seed{seed}")
    studies[str(seed)] = {**study, "evals": evals}
  members = studies[str(args.seeds[0])]["members"]
  final = {s: {m["member"]: st["evals"][str(m["member"])][-1] for m in st["members"]}
           for s, st in studies.items()}
  scores = {s: {m["member"]: m["score"] for m in st["members"]} for s, st in studies.items()}
  mean = {m["member"]: float(np.mean([scores[s][m["member"]] for s in studies]))
          for m in members}
  best = max(mean, key=mean.get)
  command = f"kswap sweep --config {config}:seed=S --workdir runs/{name}_seedS"
  workdir.write_json(os.path.join(args.out, f"{name}.json"),
                     {"command": command, "seeds": args.seeds, "studies": studies,
                      "mean_score": {str(k): v for k, v in mean.items()}, "best": best})
  seeds = list(studies)
  short = [g.split(".")[-1] for g in grid]
  lines = [f"| member | {short[0]} | {short[1]} | " + " | ".join(
      f"seed {s}: val R / F / L, score" for s in seeds) + " | mean score |",
           "|---|---|---|" + "---|" * len(seeds) + "---|"]
  for m in members:
    k = m["member"]
    cells = [f"{final[s][k]['val_miou_r']:.1f} / {final[s][k]['val_miou_f']:.1f} / "
             f"{final[s][k]['val_miou_l']:.1f}, {scores[s][k]:.1f}" for s in seeds]
    lines.append(f"| {k}{' (best)' if k == best else ''} | {m[grid[0]]:g} | {m[grid[1]]:g} | "
                 + " | ".join(cells) + f" | {mean[k]:.1f} |")
  pre = {s: st["members"][0]["val_miou_r_pretrained"] for s, st in studies.items()}
  lines += ["", "Validation mIoU (%) of the retain (R), forget (F) and learn (L) sets after the "
            "LBF swap, per seed; pretrained (train[:90%]) val R " + ", ".join(
                f"{pre[s]:.1f} (seed {s})" for s in seeds) + f". Score per seed: "
            f"{studies[seeds[0]]['score']} (those: -300 - the shortfall); the best member has "
            "the highest mean score over the seeds. Command: "
            f"`python experiments/sweep_swap_seg_seeds.py --study {args.study}` (per seed "
            f"`{command}`)."]
  with open(os.path.join(args.out, f"{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  fig, axes = plt.subplots(1, len(SETS), figsize=(13, 3.5), sharex=True)
  xs = sorted({m[grid[0]] for m in members})
  for ax, (key, title) in zip(axes, SETS):
    for w in sorted({m[grid[1]] for m in members}):
      row = [m for m in members if m[grid[1]] == w]
      vals = np.array([[final[s][m["member"]][key] for m in row] for s in seeds])
      ax.errorbar([m[grid[0]] for m in row], vals.mean(0), yerr=vals.std(0), capsize=3,
                  marker="o", label=f"{short[1]} {w:g}")
    if key == "val_miou_r":
      ax.axhline(np.mean(list(pre.values())), color="grey", ls="--", label="pretrained")
    if key == "val_miou_f":  # near 0: keep the scale readable
      ax.set_ylim(-1, max(10, ax.get_ylim()[1]))
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set(xlabel=short[0], ylabel="val mIoU after the swap (%)", title=title)
    ax.legend(fontsize=8)
  fig.suptitle(f"segmentation LBF, seeds {', '.join(seeds)} (mean +- std)")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, f"{name}.png"), dpi=120)


if __name__ == "__main__":
  main()
