"""Disposable transfer on the embedded digits: source = digits 0-4, target = digits 5-9.

The tiny ViT (Mu/2) is pretrained on 0-4 exactly as `configs/pretrain_digits.py` does, then
transferred to 5-9 (new head, full fine-tune), then the source is disposed of. The PL attack
re-learns 0-4 from 10 images per class.

  kswap dispose --config configs/dispose_digits.py --workdir runs/dispose_digits
  kswap dispose --config configs/dispose_digits.py:method=random_label,seed=1 --workdir runs/rl

Arguments: method (gc | none | grad_ascent | random_label), finetune (full | lora), seed,
runlocal.
"""
import os

import ml_collections

from kswap_jax import config_lib


JOB = "dispose"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "method": "gc", "finetune": "full", "seed": 0}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.method = a.method
  c.finetune = a.finetune
  c.data = config_lib.digits_data()
  digits = lambda classes, per_class=0: ml_collections.ConfigDict(dict(  # noqa: E731
      dataset="sklearn_digits", classes=classes, fraction=1.0, per_class=per_class, seed=1337,
      test_split=""))
  c.source = digits("0-4")   # the source data the disposer holds (labels of the pretrained head)
  c.target = digits("5-9")
  c.model = ml_collections.ConfigDict(dict(dropout=0.0, dtype="float32", attention="einsum"))
  c.init = ml_collections.ConfigDict(dict(checkpoint="", pretrain=_pretrain(a)))
  c.lora = config_lib.lora(rank=8, alpha=1.0, a_init="small")  # used when finetune=lora
  c.train = ml_collections.ConfigDict(dict(
      batch_size=32, weight_decay=0.05, lr_end=1e-5,
      lr=ml_collections.ConfigDict(dict(transfer=1e-3, dispose=3e-3)),
      epochs=ml_collections.ConfigDict(dict(transfer=10, dispose=10))))
  c.dispose = ml_collections.ConfigDict(dict(
      num_splits=4,             # K source sub-batches per step
      source_batch_size=64,     # split into K sub-batches of 64 / K
      similarity="cosine",      # cosine | dot
      gc_params=".*",           # regex over trainable paths "params/..." / "lora/..."
      gc_vjp="hvp"))            # hvp (Hessian-vector products, less memory) | autodiff
  # gc = 0.3 with dispose lr 3e-3, K = 4 of 16 images: picked from a small sweep on seeds 0-1
  # (gc 0.2-10, lr 1e-3-5e-3, K 4/8, source batch 64/128, GC on all / lower blocks only); a
  # larger gc or lr disposes more of the source and costs more target accuracy.
  c.weights = ml_collections.ConfigDict(dict(
      target=1.0, gc=0.3, ascent=1.0, bound=10.0, random_label=1.0))
  c.pl = ml_collections.ConfigDict(dict(
      data=digits("0-4", per_class=10),  # another dataset / classes: "new downstream data"
      attacks=("linear", "full"),
      models=("scrubbed", "unscrubbed", "random"),  # leakage needs all three
      batch_size=32, weight_decay=0.0,
      linear=ml_collections.ConfigDict(dict(steps=200, lr=1e-2)),
      full=ml_collections.ConfigDict(dict(steps=200, lr=1e-3))))
  if a.runlocal:
    c.init.pretrain.data.fraction = c.source.fraction = c.target.fraction = 0.1
    c.train.epochs.update(transfer=1, dispose=1)
    c.train.batch_size = 16
    c.dispose.source_batch_size = 16
    c.pl.linear.steps = c.pl.full.steps = 2
  return config_lib.common(c, a.runlocal)


def _pretrain(a):
  """configs/pretrain_digits.py on the source classes 0-4."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrain_digits.py")
  return config_lib.load(
      path, f"classes=0-4,seed={a.seed}" + (",runlocal" if a.runlocal else ""))
