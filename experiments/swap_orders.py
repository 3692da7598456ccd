"""LBF vs FBL vs simultaneous on the digits, over seeds; plus the learn-only / forget-only
per-block LoRA norm study, in two settings: the paper's (LoRA on the MLP layers only, head
frozen: the authors' mark_only_lora_as_trainable) and the digits config's (ours: LoRA on MLP and
attention, head trained).

  python experiments/swap_orders.py [--seeds 0 1 2] [--out experiments/results]

Writes swap_orders.md (mean +- std of Acc_R, Acc_F, Acc_L), swap_orders.json, swap_orders.png
and swap_layers.png. Each seed pretrains once (configs/swap_digits.py) and every order starts
from that model.
"""
import argparse
import json
import os
import tempfile

import matplotlib
import numpy as np

from kswap_jax import config_lib, runner

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDERS = ("lbf", "fbl", "simultaneous")
HERE = os.path.dirname(os.path.abspath(__file__))


SETTINGS = ("paper", "digits")  # layer-study settings (module docstring)


def _config(order, seed, pretrained, setting="digits"):
  c = config_lib.load(os.path.join(HERE, "..", "configs", "swap_digits.py"),
                      f"order={order},seed={seed}")
  c.init.checkpoint = pretrained
  c.log_every = 10_000
  if setting == "paper":
    c.head = "frozen"
    c.lora.targets = config_lib.lora().targets
  return c


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--out", default=os.path.join(HERE, "results"))
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  rows, blocks = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    for seed in args.seeds:
      first = _config("lbf", seed, "")
      pre_dir = os.path.join(tmp, f"seed{seed}")
      runner.run("pretrain", first.init.pretrain, os.path.join(pre_dir, "pretrain"))
      pretrained = os.path.join(pre_dir, "pretrain")
      for order in ORDERS:
        res = runner.run("swap", _config(order, seed, pretrained),
                         os.path.join(tmp, f"{order}{seed}"))
        final = res["evals"][-1]
        rows.append({"order": order, "seed": seed, **{k: final[k] for k in
                                                      ("acc_r", "acc_f", "acc_l")},
                     "pretrained_acc_r": res["evals"][0]["acc_r"]})
      for setting in SETTINGS:
        for order in ("learn", "forget"):
          res = runner.run("swap", _config(order, seed, pretrained, setting),
                           os.path.join(tmp, f"{setting}_{order}{seed}"))
          final = res["evals"][-1]
          blocks.setdefault(f"{order} ({setting})", []).append(
              {"blocks": res["blocks"][order],
               **{k: final.get(k) for k in ("acc_r", "acc_f", "acc_l")}})
  summary = {}
  for order in ORDERS:
    sel = [r for r in rows if r["order"] == order]
    summary[order] = {k: (float(np.mean([r[k] for r in sel])), float(np.std([r[k] for r in sel])))
                      for k in ("acc_r", "acc_f", "acc_l", "pretrained_acc_r")}
  with open(os.path.join(args.out, "swap_orders.json"), "w") as f:
    json.dump({"runs": rows, "summary": summary, "blocks": blocks}, f, indent=1)
  lines = ["| order | Acc_R (%) | Acc_F (%) | Acc_L (%) |", "|---|---|---|---|"]
  for order, s in summary.items():
    lines.append(f"| {order} | " + " | ".join(f"{s[k][0]:.2f} ± {s[k][1]:.2f}"
                                              for k in ("acc_r", "acc_f", "acc_l")) + " |")
  pre = np.mean([r["pretrained_acc_r"] for r in rows])
  lines.append(f"\nPretrained model: Acc_R {pre:.2f}. Seeds: {args.seeds}. "
               "Command: `python experiments/swap_orders.py`.")
  lines += ["", "Learn-only / forget-only runs: |scale * A B| per block (mean over seeds) and "
            "the run's final test accuracies.", "",
            "| run | " + " | ".join(f"block {b}" for b in range(len(
                next(iter(blocks.values()))[0]["blocks"]))) + " | Acc_R | Acc_F | Acc_L |",
            "|---" * (4 + len(next(iter(blocks.values()))[0]["blocks"])) + "|"]
  for name, runs in blocks.items():
    delta = np.mean([[b["delta_norm"] for b in r["blocks"]] for r in runs], 0)
    accs = [np.mean([r[k] for r in runs]) if runs[0][k] is not None else float("nan")
            for k in ("acc_r", "acc_f", "acc_l")]
    lines.append(f"| {name} | " + " | ".join(f"{d:.2f}" for d in delta) + " | "
                 + " | ".join("n/a" if np.isnan(a) else f"{a:.2f}" for a in accs) + " |")
  with open(os.path.join(args.out, "swap_orders.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  fig, ax = plt.subplots(figsize=(5, 3.2))
  x = np.arange(3)
  for i, order in enumerate(ORDERS):
    s = summary[order]
    ax.bar(x + (i - 1) * 0.27, [s[k][0] for k in ("acc_r", "acc_f", "acc_l")], 0.27,
           yerr=[s[k][1] for k in ("acc_r", "acc_f", "acc_l")], label=order)
  ax.set_xticks(x, ["retain", "forget", "learn"])
  ax.set_ylabel("test top-1 (%)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "swap_orders.png"), dpi=120)
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
  for name, runs in blocks.items():
    b = [r["block"] for r in runs[0]["blocks"]]
    for ax, key in zip(axes, ("lora_norm", "delta_norm")):
      vals = np.array([[r[key] for r in run["blocks"]] for run in runs])
      ax.errorbar(b, vals.mean(0), vals.std(0), marker="o",
                  linestyle="-" if "paper" in name else "--", label=name)
  axes[0].set_title("sum of |A|, |B| per block")
  axes[1].set_title("|scale * A B| per block")
  for ax in axes:
    ax.set_xlabel("transformer block")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "swap_layers.png"), dpi=120)


if __name__ == "__main__":
  main()
