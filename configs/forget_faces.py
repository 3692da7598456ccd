"""GS-LoRA on face identities: a 6-block, width-512 ViT (F6/8, 112 px) with a CosFace head,
forgetting 20 identities per task for 4 tasks (CASIA-Face100 setting).

  kswap forget --config configs/forget_faces.py:data=/data/casia100 --workdir runs/faces
  kswap forget --config configs/forget_faces.py:data=/data/casia100,ckpt=runs/face_pretrain \
      --workdir runs/faces

data=: a folder with train/, val/ and test/ subfolders, each holding one folder per identity
(`folder:` datasets of kswap_jax.data.sources); val/ is used for model selection.
ckpt=: an exported face model (a pretrain workdir or its model/ folder); without it the
pretrain job first trains F6/8 on the identities (softmax head). The CosFace head reads the
head kernel's columns as class centres. `margin_at_eval` applies the margin at evaluation with
the true labels, as GS-LoRA's released code does (quirk; off by default).

Arguments: data, ckpt, classes, method, seed, group, per_task, num_tasks, margin_at_eval,
runlocal.
"""
import ml_collections

from kswap_jax import config_lib
from kswap_jax.errors import UserError
from kswap_jax.methods import forget


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, data="", ckpt="", classes="0-99",
                           method="gs_lora", seed=0, group="block", per_task=20, num_tasks=4,
                           margin_at_eval=False)
  if not a.data:
    raise UserError("forget_faces.py needs data=/path/to/folder (train/, val/, test/ with one "
                    "subfolder per identity); got no data argument")
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.method = a.method
  c.data = ml_collections.ConfigDict(dict(
      dataset=f"folder:{a.data}", train_split="train", val_split="val", test_split="test",
      data_dir="", image_size=112, channels=3, mean=0.5, std=0.5, eval_batch_size=256,
      image_key="image", label_key="label", cache_images=True))
  c.sets = ml_collections.ConfigDict(dict(retain=dict(fraction=0.1, per_class=0),
                                          forget=dict(fraction=1.0, per_class=0)))
  c.tasks = ml_collections.ConfigDict(dict(forget=[], per_task=a.per_task,
                                           num_tasks=a.num_tasks,
                                           order_seed=forget.PROTOCOL_SEED))
  c.model = ml_collections.ConfigDict(dict(variant="F6/8", dropout=0.1, dtype="float32",
                                           attention="einsum"))
  c.init = ml_collections.ConfigDict(dict(checkpoint=a.ckpt, pretrain=_pretrain(a, c)))
  config_lib.gs_lora_paper(c, a, beta=[0.2, 0.25, 0.25, 0.2], head="cosface",
                           margin_at_eval=a.margin_at_eval, runlocal_variant="Nano/8")
  return config_lib.common(c, a.runlocal, host_memory="retained")


def _pretrain(a, forget_config):
  """Trains the face ViT on all identities of the train folder (used when ckpt is empty)."""
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.data = ml_collections.ConfigDict(forget_config.data)
  c.data.update(classes=a.classes, fraction=1.0, per_class=0)
  c.model = ml_collections.ConfigDict(dict(variant="F6/8", dropout=0.1, dtype="float32",
                                           attention="einsum"))
  c.init = ml_collections.ConfigDict(dict(checkpoint=""))
  c.train = ml_collections.ConfigDict(dict(epochs=100, batch_size=256, lr=1e-3, lr_end=1e-5,
                                           weight_decay=0.05, warmup_steps=500))
  if a.runlocal:
    c.data.update(image_size=32, eval_batch_size=16)
    c.model.variant = "Nano/8"
    c.train.update(epochs=1, batch_size=4, warmup_steps=0)
  return config_lib.common(c, a.runlocal)
