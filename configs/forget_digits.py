"""Continual forgetting on the embedded digits: pretrain the tiny ViT (Mu/2) on all ten digits,
then forget two digits per task for four tasks (seeded class order), keeping the others.

  kswap forget --config configs/forget_digits.py --workdir runs/forget_digits
  kswap forget --config configs/forget_digits.py:method=gs_lora_pp,seed=1 --workdir runs/pp1

Arguments: method (gs_lora | gs_lora_pp | retrain | finetune | grad_ascent |
grad_ascent_bounded), seed, group (block | layer | matrix), runlocal.
Train / validation / test: train[:90%] / train[90%:] / test of sklearn_digits; the pretrained
model never sees the validation images.
"""
import os

import ml_collections

from kswap_jax import config_lib
from kswap_jax.methods import forget


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, method="gs_lora", seed=0, group="block")
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.method = a.method
  c.data = config_lib.digits_data()
  c.data.update(train_split="train[:90%]", val_split="train[90%:]", test_split="test")
  c.sets = ml_collections.ConfigDict(dict(
      retain=dict(fraction=0.1, per_class=0),   # per_class=k: k-shot retain data instead
      forget=dict(fraction=1.0, per_class=0)))
  c.tasks = ml_collections.ConfigDict(dict(forget=[], per_task=2, num_tasks=4,
                                           order_seed=forget.PROTOCOL_SEED))
  c.model = ml_collections.ConfigDict(dict(dropout=0.0, dtype="float32", attention="einsum"))
  c.init = ml_collections.ConfigDict(dict(checkpoint="", pretrain=_pretrain(a)))
  c.lora = config_lib.lora(rank=8, alpha=1.0, a_init="small")
  c.lora.a_init_first = "kaiming"
  c.head = ml_collections.ConfigDict(dict(kind="linear", scale=64.0, margin=0.35,
                                          margin_at_eval=False))
  c.group = a.group
  c.weights = ml_collections.ConfigDict(dict(
      beta=[0.2, 0.2, 0.2, 0.2], bound=10.0, alpha=1e-3, proto_bound=18.0, w_f=0.05, w_r=0.05))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=8, epochs=20, warmup_epochs=5, lr=forget.get_method(a.method).lr,
      lr_end=1e-5, weight_decay=0.05))
  c.select_best = True
  c.eval_every_epochs = 1
  if a.runlocal:
    c.sets.retain.per_class = 2
    c.tasks.num_tasks = 2
    c.train.update(batch_size=8, epochs=1, warmup_epochs=0)
  return config_lib.common(c, a.runlocal)


def _pretrain(a):
  """configs/pretrain_digits.py on all ten digits, holding out the validation images."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_digits.py")
  c = config_lib.load(
      path, f"classes=0-9,seed={a.seed}" + (",runlocal" if a.runlocal else ""))
  c.data.train_split = "train[:90%]"
  return c
