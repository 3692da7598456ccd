"""A GS-LoRA study on the digits (configs/forget_digits.py): every task of all members in one
vmapped program; with `fair` (or a baseline method) the 8-member study of its method.

  kswap sweep --config configs/sweep_forget_digits.py --workdir runs/sweep_forget_digits
  kswap sweep --config configs/sweep_forget_digits.py:method=gs_lora_pp --workdir runs/sweep_pp
  kswap sweep --config configs/sweep_forget_digits.py:method=ewc --workdir runs/sweep_ewc

Arguments: method (any of configs/forget_digits.py), seed (the base run's; data order stays
the base seed's), fair, runlocal.
Train / validation / test: train[:90%] / train[90%:] / test; each task's model is chosen on
validation H (select_best), the best member maximises the mean validation H over tasks, and
the pretrained model never sees the validation images.
Vmapped keys: seed, train.lr, train.weight_decay, weights.* (the forget recipe's `sweepable`);
other keys of the base config (e.g. lora.rank, method) make groups run one after another;
weights.beta takes one number for every task or a list with one value per task.
"""
import os

from kswap_jax import config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


JOB = "sweep"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "method": "gs_lora", "seed": 0, "fair": False}

# The same budget for every method (ours): 2 learning rates (its default and one 3x off) x 4
# values of its main loss weight around the default, 8 members (experiments/continual_digits.py).
FAIR = {
    "gs_lora": ((1e-2, 3e-3), "beta", (0.1, 0.2, 0.5, 1.0)),
    "gs_lora_pp": ((1e-2, 3e-3), "w_f", (0.01, 0.05, 0.1, 0.5)),
    "retrain": ((2e-3, 6e-3), "none", (0,)),
    "finetune": ((1e-4, 3e-4), "none", (0,)),
    "grad_ascent": ((1e-4, 3e-4), "beta", (0.02, 0.05, 0.1, 0.2)),
    "grad_ascent_bounded": ((1e-4, 3e-4), "beta", (0.1, 0.2, 0.5, 1.0)),
    "l2": ((1e-4, 3e-4), "l2_lambda", (0.01, 0.1, 1.0, 10.0)),
    "ewc": ((1e-4, 3e-4), "ewc_lambda", (1.0, 10.0, 100.0, 1000.0)),
    "mas": ((1e-4, 3e-4), "mas_lambda", (0.005, 0.05, 0.5, 5.0)),
    "lwf": ((1e-4, 3e-4), "lwf_remain", (1.0, 3.0, 10.0, 30.0)),
    "der": ((1e-3, 3e-4), "der", (0.001, 0.01, 0.1, 1.0)),
    "der_pp": ((1e-3, 3e-4), "der_plus", (0.005, 0.05, 0.5, 5.0)),
    "fdr": ((1e-3, 3e-4), "fdr", (5.0, 20.0, 50.0, 200.0)),
    "scrub": ((1e-4, 3e-4), "scrub_gamma", (0.5, 0.99, 2.0, 5.0)),
    "scrub_s": ((1e-4, 3e-4), "smoothing", (0.01, 0.05, 0.1, 0.5)),
    "lirf": ((1e-4, 3e-4), "lirf_alpha", (0.05, 0.1, 0.3, 0.5)),
}


def fair_grid(method: str) -> dict:
  """The 8-member grid of `method`: lr x main weight (retrain / finetune: lr x weight decay,
  their losses have no weight)."""
  lrs, weight, values = FAIR[method]
  if weight == "none":
    return dict(train=dict(lr=lrs + tuple(v / 2 for v in lrs), weight_decay=(0.0, 0.05)))
  return dict(train=dict(lr=lrs), weights={weight: values})


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  base = config_lib.load(os.path.join(HERE, "forget_digits.py"),
                         f"method={a.method},seed={a.seed}" + (",runlocal" if a.runlocal else ""))
  if a.fair or a.method not in ("gs_lora", "gs_lora_pp"):
    return config_lib.sweep("forget", base, fair_grid(a.method), a.runlocal)
  # Product of the value tuples: 4 x 2 x 2 = 16 members over the forgetting weight, the
  # bound BND and the group-sparse weight.
  return config_lib.sweep("forget", base, dict(
      weights=dict(beta=(0.05, 0.1, 0.2, 0.5), bound=(5.0, 10.0), alpha=(1e-4, 1e-3))),
                          a.runlocal)
