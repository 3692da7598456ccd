"""Pretrain the tiny ViT (Mu/2) on digit classes of the embedded sklearn_digits.

  kswap pretrain --config configs/pretrain_digits.py --workdir runs/pretrain
  kswap pretrain --config configs/pretrain_digits.py:classes=0-9 --workdir runs/pretrain10
"""
import ml_collections

from kswap_jax import config_lib


JOB = "pretrain"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "classes": "0-9", "seed": 0}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.data = config_lib.digits_data()
  c.data.classes = a.classes
  c.data.fraction = 1.0
  c.data.per_class = 0
  c.model = ml_collections.ConfigDict(dict(variant="Mu/2", dropout=0.0, dtype="float32",
                                           attention="einsum"))
  c.init = ml_collections.ConfigDict(dict(checkpoint=""))
  c.train = ml_collections.ConfigDict(dict(
      epochs=60, batch_size=64, lr=2e-3, lr_end=1e-5, weight_decay=0.05, warmup_steps=100))
  if a.runlocal:
    c.model.variant = "Nano/2"
    c.train.update(epochs=1, batch_size=16, warmup_steps=0)
  return config_lib.common(c, a.runlocal)
