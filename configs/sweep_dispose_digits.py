"""A Gradient Collision study on the digits (configs/dispose_digits.py): 8 members, one program.

  kswap sweep --config configs/sweep_dispose_digits.py --workdir runs/sweep_dispose_digits

Arguments: method (gc | grad_ascent | random_label), seed (the base run's), runlocal.
Train / validation / test: train[:90%] / train[90%:] / test; the pretrained source model never
sees the validation images. All members share the transfer stage;
they differ in the dispose stage's learning rate and loss weights (the dispose recipe's
`sweepable`, kswap_jax.methods.dispose); other keys (e.g. seed, weights.target, finetune)
make groups, each with its own transfer stage, run one after another. The best member
maximises validation target accuracy - 100 x mean PL leakage clipped at 0 (PL accuracy on the
PL test split).
"""
import os

from kswap_jax import config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


JOB = "sweep"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "method": "gc", "seed": 0}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  base = config_lib.load(os.path.join(HERE, "dispose_digits.py"),
                         f"method={a.method},seed={a.seed}" + (",runlocal" if a.runlocal else ""))
  # Product of the value tuples: 2 x 4 = 8 members, over the weight of the method's term.
  weight = {"gc": "gc", "grad_ascent": "ascent", "random_label": "random_label"}[a.method]
  return config_lib.sweep("dispose", base, dict(
      train=dict(lr=dict(dispose=(1e-3, 3e-3))), weights={weight: (0.1, 0.3, 1.0, 3.0)}),
                          a.runlocal)
