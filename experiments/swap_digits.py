"""The README's main job, measured: `kswap swap --config configs/swap_digits.py` in a fresh
workdir, its wall time and the accuracy table it prints.

  python experiments/swap_digits.py [--out experiments/results]

Writes swap_digits.json (the command, wall seconds, the run's results.json evaluations and its
environment.json: packages, processor, devices) and swap_digits.md (the table).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

from kswap_jax import workdir

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COMMAND = ("kswap", "swap", "--config", "configs/swap_digits.py")
COLUMNS = (("acc_r", "Acc_R"), ("acc_f", "Acc_F"), ("acc_l", "Acc_L"))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    work = os.path.join(tmp, "swap_digits")
    cli = [sys.executable, "-m", "kswap_jax", *COMMAND[1:], "--workdir", work]
    start = time.perf_counter()
    subprocess.run(cli, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    evals = workdir.read_json(os.path.join(work, "results.json"))["evals"]
    environment = workdir.read_json(os.path.join(work, "environment.json"))
  command = " ".join(COMMAND) + " --workdir runs/swap_digits"
  workdir.write_json(os.path.join(args.out, "swap_digits.json"),
                     {"command": command, "wall_s": round(wall, 1), "evals": evals,
                      "environment": environment})
  lines = ["| after | " + " | ".join(name for _, name in COLUMNS) + " |",
           "|---|" + "---:|" * len(COLUMNS)]
  lines += [f"| {r['after']} | " + " | ".join(f"{r[k]:.2f}" for k, _ in COLUMNS) + " |"
            for r in evals]
  lines += ["", f"`{command}`: {wall:.0f} s wall, pretraining included. "
            "Measured by `python experiments/swap_digits.py`."]
  with open(os.path.join(args.out, "swap_digits.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
