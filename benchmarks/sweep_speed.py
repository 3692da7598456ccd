"""A 16-member Knowledge Swapping sweep as one vmapped program vs the same 16 runs in a row.

Both sides train the same configurations (configs/sweep_swap_digits.py: the Mu/2 ViT on the
digits, 2 lr x 4 forget weights x 2 bounds) for the same steps on the same data, from one
pretrained model made once beforehand (not timed). Epochs are cut (--epochs per stage,
--pretrain_epochs) so the whole benchmark fits in minutes. For each side: wall time, XLA
compile time (sum of backend compile events), member-updates and updates/s (member-updates
per second of wall time without compiling). The single runs also evaluate before training
and after every stage and export each model; the sweep evaluates once (test and validation)
and exports the best. Writes benchmarks/results/sweep_speed.json and prints a table.

  python benchmarks/sweep_speed.py [--epochs 2 --pretrain_epochs 3 --runlocal]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import jax
from ml_collections import config_flags

from kswap_jax import sweep, workdir
from kswap_jax import methods, runner, sharding
from kswap_jax.progress import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "sweep_speed.json")


@contextlib.contextmanager
def compile_seconds():
  """Yields a list whose sum is the XLA backend compile time spent inside the block."""
  spent, on = [], [True]

  def listener(event: str, duration: float, **_):
    if on[0] and event == "/jax/core/compile/backend_compile_duration":
      spent.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield spent
  finally:
    on[0] = False


def timed(fn) -> dict:
  """Wall and compile seconds of fn()."""
  with compile_seconds() as spent:
    t = time.perf_counter()
    fn()
    wall = time.perf_counter() - t
  return {"wall_s": wall, "compile_s": sum(spent)}


def updates(config, n_members: int) -> int:
  """Member-updates of the sweep: steps of every stage x members."""
  base = config.base
  rec = methods.get("swap")(base, "", base.init.checkpoint, sharding.make_mesh(base.mesh))
  return n_members * sum(st.num_steps for st in rec.stages())


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=2, help="epochs of each swap stage")
  p.add_argument("--pretrain_epochs", type=int, default=3)
  p.add_argument("--runlocal", action="store_true", help="Nano/2 and 1 epoch: a smoke test")
  args = p.parse_args()
  config = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      "sweep_swap_digits", os.path.join(ROOT, "configs", "sweep_swap_digits.py")
  ).get_config("runlocal" if args.runlocal else "")
  base = config.base
  if not args.runlocal:
    base.train.epochs.update(learn=args.epochs, forget=args.epochs, swap=args.epochs)
    base.init.pretrain.train.update(epochs=args.pretrain_epochs, warmup_steps=0)
  config.checkpoint.every_steps = 0  # final save of each stage only, on both sides
  base.checkpoint.every_steps = 0
  config.log_every = base.log_every = 10**6
  assignments = sweep.expand(config.grid, config.members)
  with tempfile.TemporaryDirectory() as tmp:
    runner.run("pretrain", base.init.pretrain, os.path.join(tmp, "pretrain"))
    base.init.checkpoint = os.path.join(tmp, "pretrain")
    n_updates = updates(config, len(assignments))
    rows = [{"mode": "vmapped sweep", **timed(lambda: runner.sweep(config, f"{tmp}/sweep"))}]
    rows.append({"mode": "sequential runs", **timed(lambda: [
        runner.run("swap", sweep.member_config(base, a), f"{tmp}/single_{i}")
        for i, a in enumerate(assignments)])})
  for r in rows:
    r["member_updates"] = n_updates
    r["updates_per_s"] = n_updates / max(1e-9, r["wall_s"] - r["compile_s"])
  speedup = rows[1]["wall_s"] / rows[0]["wall_s"]
  result = {"members": len(assignments), "epochs_per_stage": base.train.epochs.to_dict(),
            "order": base.order, "variant": base.init.pretrain.model.variant,
            "device": str(jax.devices()[0].device_kind), "rows": rows,
            "wall_speedup": speedup}
  workdir.write_json(OUT, result)
  print(table(rows, ["mode", "wall_s", "compile_s", "member_updates", "updates_per_s"]))
  print(f"{len(assignments)} members on {result['device']}: the sweep is {speedup:.2f}x faster "
        f"in wall time; written to {OUT}")


if __name__ == "__main__":
  main()
