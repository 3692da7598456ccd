"""The segmentation swap's first validation study, with each member's stages: runs
`kswap sweep --config configs/sweep_swap_seg_scenes.py` (a finished study in --workdir is
reported, not run again) and collects its sweep.json and every member's evaluations.

  python experiments/sweep_swap_seg_scenes.py [--workdir runs/sweep_swap_seg_scenes]
      [--out experiments/results]

Writes sweep_swap_seg_scenes.json (sweep.json and each member's results.json "evals") and
sweep_swap_seg_scenes.md (validation mIoU of R and L after the learn stage and of R, F, L after
the forget stage, and the score, per member).
"""
import argparse
import glob
import os
import subprocess
import sys

from kswap_jax import workdir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = "configs/sweep_swap_seg_scenes.py"


def run_study(config: str, run_dir: str) -> tuple[dict, dict]:
  """Runs (or reports) `kswap sweep --config config --workdir run_dir`: (its sweep.json,
  {member: that member's results.json "evals"})."""
  run_dir = os.path.abspath(run_dir)  # kswap runs from the repository root
  subprocess.run([sys.executable, "-m", "kswap_jax", "sweep", "--config", config,
                  "--workdir", run_dir], cwd=ROOT, check=True)
  evals = {}
  for path in glob.glob(os.path.join(run_dir, "**", "member_*", "results.json"),
                        recursive=True):  # [group_*/]chunk_*/member_*
    member = int(os.path.basename(os.path.dirname(path)).split("_")[1])
    evals[str(member)] = workdir.read_json(path)["evals"]
  return workdir.read_json(os.path.join(run_dir, "sweep.json")), dict(sorted(evals.items()))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "sweep_swap_seg_scenes"))
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args()
  study, evals = run_study(CONFIG, args.workdir)
  command = f"kswap sweep --config {CONFIG} --workdir runs/sweep_swap_seg_scenes"
  workdir.write_json(os.path.join(args.out, "sweep_swap_seg_scenes.json"),
                     {"command": command, **study, "evals": evals})
  lines = ["| member | learn_replay | lr | learn weight | sparse weight | val R / L after learn | "
           "val R / F / L after forget | score |", "|---|---|---|---|---|---|---|---|"]
  for m in study["members"]:
    stage = {r["after"]: r for r in evals[str(m["member"])]}
    learn, forget = stage["learn"], stage["forget"]
    best = " (best)" if m["member"] == study["best"] else ""
    lines.append(
        f"| {m['member']}{best} | {m['learn_replay']} | {m['train.lr']:g} | "
        f"{m['weights.learn']:g} | {m['weights.sparse']:g} | {learn['val_miou_r']:.1f} / "
        f"{learn['val_miou_l']:.1f} | {forget['val_miou_r']:.1f} / {forget['val_miou_f']:.1f} / "
        f"{forget['val_miou_l']:.1f} | {m['score']:.2f} |")
  pre = evals[str(study["members"][0]["member"])][0]
  lines += ["", f"Validation mIoU (%) of the retain (R), forget (F) and learn (L) sets, seed 0, "
            f"LBF; pretrained (train[:90%]) val R {pre['val_miou_r']:.1f}, F "
            f"{pre['val_miou_f']:.1f}, L {pre['val_miou_l']:.1f} (test R {pre['miou_r']:.1f}). Score: "
            f"{study['score']} (those: -300 - the shortfall). "
            f"Command: `python experiments/sweep_swap_seg_scenes.py` (`{command}`)."]
  with open(os.path.join(args.out, "sweep_swap_seg_scenes.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
