"""How the scenes segmenter pretrains: 40 or 60 epochs, with or without the random affine warp
of its training scenes (data.affine), on all training scenes (what a swap starts from) or on
train[:90%] (what a validation study starts from).

  python experiments/pretrain_epochs_scenes.py [--seed 0] [--out experiments/results]

Each run is `kswap pretrain --config configs/pretrain_scenes.py:task=segmentation` with
train.epochs, data.train_split and data.affine set (off: all zero). Writes
pretrain_epochs_scenes.json (per run: test mIoU per class, the retain classes' mean, the
training loss every 50 steps) and
pretrain_epochs_scenes.md (the table).
"""
import argparse
import json
import os
import tempfile

import numpy as np

from kswap_jax import config_lib, runner, workdir

HERE = os.path.dirname(os.path.abspath(__file__))
RETAIN = range(6)          # config_lib.SCENES_SETS["retain"]: 0-5
SPLITS = ("train", "train[:90%]")
EPOCHS = (40, 60)
NO_AFFINE = dict(rotate=0.0, zoom=0.0, shear=0.0)


def run(split: str, epochs: int, affine: bool, seed: int, work: str) -> dict:
  c = config_lib.load(os.path.join(HERE, "..", "configs", "pretrain_scenes.py"),
                      f"task=segmentation,seed={seed}")
  c.data.train_split, c.train.epochs = split, epochs
  if not affine:
    c.data.affine = NO_AFFINE
  res = runner.run("pretrain", c, work)
  steps_per_epoch = res["steps"] / epochs
  with open(os.path.join(work, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  loss = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
  below = next((s for s, v in loss if v < 0.1), None)
  return {"train_split": split, "epochs": epochs, "affine": c.data.affine.to_dict(),
          "seed": seed, "steps": res["steps"],
          "per_class": res["per_class"], "test_miou": res["test_miou"],
          "retain_miou": float(np.mean([res["per_class"][str(c)] for c in RETAIN])),
          "loss": loss,
          "epoch_loss_below_0.1": None if below is None else round(below / steps_per_epoch, 1)}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=os.path.join(HERE, "results"))
  args = ap.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for affine in (False, True):
      for split in SPLITS:
        for epochs in EPOCHS:
          rows.append(run(split, epochs, affine, args.seed, os.path.join(tmp, f"{len(rows)}")))
  workdir.write_json(os.path.join(args.out, "pretrain_epochs_scenes.json"), {"runs": rows})
  lines = ["| affine warp | train split | epochs | test mIoU, retain classes 0-5 | "
           "test mIoU, 0-7 | epoch the training loss first falls below 0.1 |",
           "|---|---|---|---|---|---|"]
  lines += [f"| {'on' if r['affine'] != NO_AFFINE else 'off'} | {r['train_split']} | "
            f"{r['epochs']} | {r['retain_miou']:.1f} | "
            f"{r['test_miou']:.1f} | {r['epoch_loss_below_0.1']} |" for r in rows]
  on = next(r["affine"] for r in rows if r["affine"] != NO_AFFINE)
  lines += ["", f"Segmentation pretraining on the digit scenes, seed {args.seed}; affine warp "
            f"on: {on}; each class's IoU over all test scenes of classes 0-7; 'None': the "
            "loss never fell below 0.1. Command: "
            "`python experiments/pretrain_epochs_scenes.py`."]
  with open(os.path.join(args.out, "pretrain_epochs_scenes.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
