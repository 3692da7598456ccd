"""A 16-member GS-LoRA study on the digits (configs/forget_digits.py): every task of all
members in one vmapped program.

  kswap sweep --config configs/sweep_forget_digits.py --workdir runs/sweep_forget_digits
  kswap sweep --config configs/sweep_forget_digits.py:method=gs_lora_pp --workdir runs/sweep_pp

Arguments: method (any of configs/forget_digits.py), seed (the base run's; data order stays
the base seed's), runlocal.
Train / validation / test: train[:90%] / train[90%:] / test; each task's LoRA is chosen on
validation H (select_best), the best member maximises the mean validation H over tasks, and
the pretrained model never sees the validation images.
Vmapped keys: seed, train.lr, train.weight_decay, weights.* (the forget recipe's `sweepable`);
other keys of the base config (e.g. lora.rank, method) make groups run one after another;
weights.beta takes one number for every task or a list with one value per task.
"""
import os

from kswap_jax import config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, method="gs_lora", seed=0)
  base = config_lib.load(os.path.join(HERE, "forget_digits.py"),
                         f"method={a.method},seed={a.seed}" + (",runlocal" if a.runlocal else ""))
  # Product of the value tuples: 4 x 2 x 2 = 16 members over the forgetting weight, the
  # bound BND and the group-sparse weight.
  return config_lib.sweep("forget", base, dict(
      weights=dict(beta=(0.05, 0.1, 0.2, 0.5), bound=(5.0, 10.0), alpha=(1e-4, 1e-3))),
                          a.runlocal)
