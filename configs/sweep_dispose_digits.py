"""A Gradient Collision study on the digits (configs/dispose_digits.py): 8 members, one program.

  kswap sweep --config configs/sweep_dispose_digits.py --workdir runs/sweep_dispose_digits

Arguments: method (gc | grad_ascent | random_label), seed (the base run's), runlocal.
Train / validation / test: train[:90%] / train[90%:] / test; the pretrained source model never
sees the validation images. All members share the transfer stage; they differ in the dispose
stage's learning rate and loss weights (kswap_jax.sweep.SWEEPABLE["dispose"]). The best member
maximises validation target accuracy - 100 x mean PL leakage (PL accuracy on the PL test split).
"""
import os

import ml_collections

from kswap_jax import config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, method="gc", seed=0)
  c = ml_collections.ConfigDict()
  c.method = "dispose"
  c.base = _base(a)
  # Product of the value tuples: 2 x 4 = 8 members, over the weight of the method's term.
  weight = {"gc": "gc", "grad_ascent": "ascent", "random_label": "random_label"}[a.method]
  c.grid = ml_collections.ConfigDict(dict(
      train=dict(lr=dict(dispose=(1e-3, 3e-3))), weights={weight: (0.1, 0.3, 1.0, 3.0)}))
  c.members = ()              # explicit members, e.g. ({"weights.gc": 0.5},)
  c.members_per_chunk = 0     # 0: all members in one program; -1: as many as fit memory
  c = config_lib.common(c, a.runlocal)
  c.mesh.sweep = 1            # devices the members are split over (the rest split the batch)
  return c


def _base(a):
  """configs/dispose_digits.py with a validation split held out of training and pretraining."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispose_digits.py")
  c = config_lib.load(
      path, f"method={a.method},seed={a.seed}" + (",runlocal" if a.runlocal else ""))
  c.data.update(train_split="train[:90%]", val_split="train[90%:]")
  c.init.pretrain.data.train_split = "train[:90%]"
  return c
