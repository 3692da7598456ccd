"""A 16-member Knowledge Swapping study on the digits (configs/swap_digits.py), one program.

  kswap sweep --config configs/sweep_swap_digits.py --workdir runs/sweep_swap_digits
  kswap sweep --config configs/sweep_swap_digits.py:runlocal --workdir runs/sweep_local \
      --config.members_per_chunk=4

Arguments: order, seed (the base run's; data order stays the base seed's), runlocal.
Train / validation / test: train[:90%] / train[90%:] / test; the best member is chosen on
validation, and the pretrained model never sees the validation images.
Sweepable keys: seed, train.lr, train.weight_decay, weights.* (kswap_jax.sweep.SWEEPABLE).
"""
import os

import ml_collections

from kswap_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, order="lbf", seed=0)
  c = ml_collections.ConfigDict()
  c.method = "swap"
  c.base = _base(a)
  # Product of the value tuples: 2 x 4 x 2 = 16 members (`--config.grid.train.lr='(0.01,)'`).
  c.grid = ml_collections.ConfigDict(dict(
      train=dict(lr=(3e-3, 1e-2)),
      weights=dict(forget=(0.1, 0.2, 0.5, 1.0), bound=(10.0, 15.0))))
  c.members = ()              # explicit members, e.g. ({"train.lr": 0.02, "seed": 1},)
  c.members_per_chunk = 0     # 0: all members in one program; -1: as many as fit memory
  c = config_lib.common(c, a.runlocal)
  c.mesh.sweep = 1            # devices the members are split over (the rest split the batch)
  return c


def _base(a):
  """configs/swap_digits.py with a validation split held out of training and pretraining."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "swap_digits.py")
  c = config_lib.load(
      path, f"order={a.order},seed={a.seed}" + (",runlocal" if a.runlocal else ""))
  c.data.update(train_split="train[:90%]", val_split="train[90%:]")
  c.init.pretrain.data.train_split = "train[:90%]"
  return c
