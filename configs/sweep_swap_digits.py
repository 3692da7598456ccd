"""A 16-member Knowledge Swapping study on the digits (configs/swap_digits.py), one program.

  kswap sweep --config configs/sweep_swap_digits.py --workdir runs/sweep_swap_digits
  kswap sweep --config configs/sweep_swap_digits.py:runlocal --workdir runs/sweep_local \
      --config.members_per_chunk=4

Arguments: order, seed (the base run's; data order stays the base seed's), runlocal.
Train / validation / test: train[:90%] / train[90%:] / test; the best member is chosen on
validation, and the pretrained model never sees the validation images.
Vmapped keys: seed, train.lr, train.weight_decay, weights.* (the swap recipe's `sweepable`);
other keys of the base config (e.g. lora.rank, order) make groups run one after another.
"""
import os

from kswap_jax import config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


JOB = "sweep"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "order": "lbf", "seed": 0}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  base = config_lib.load(os.path.join(HERE, "swap_digits.py"),
                         f"order={a.order},seed={a.seed}" + (",runlocal" if a.runlocal else ""))
  # Product of the value tuples: 2 x 4 x 2 = 16 members (`--config.grid.train.lr='(0.01,)'`);
  # explicit `members` too, e.g. ({"train.lr": 0.02, "seed": 1},).
  return config_lib.sweep("swap", base, dict(
      train=dict(lr=(3e-3, 1e-2)),
      weights=dict(forget=(0.1, 0.2, 0.5, 1.0), bound=(10.0, 15.0))), a.runlocal)
