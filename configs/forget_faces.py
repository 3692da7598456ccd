"""GS-LoRA on face identities: a 6-block, width-512 ViT (F6/8, 112 px) with a CosFace head,
forgetting 20 identities per task for 4 tasks (CASIA-Face100 setting).

  kswap forget --config configs/forget_faces.py:data=/data/casia100 --workdir runs/faces
  kswap forget --config configs/forget_faces.py:data=/data/casia100,checkpoint=runs/face_pretrain \
      --workdir runs/faces

data=: a folder with train/, val/ and test/ subfolders, each holding one folder per identity
(`folder:` datasets of kswap_jax.data.sources); val/ is used for model selection.
checkpoint=: an exported face model (a pretrain workdir or its model/ folder) or the authors'
released `.pth`; without it the pretrain job first trains F6/8 on the identities (CosFace head,
as the authors do). The CosFace head reads the head kernel's columns as class centres.
`margin_at_eval` applies the margin at evaluation with the true labels, as GS-LoRA's released
code does (quirk; off by default).

Training sets: 10% of the retain and of the forget images of a task (the authors' data_ratio);
`shots=4`: the authors' few-shot recipe (4 images per class, batch 4, their per-task weights;
config_lib.GS_LORA_SETTINGS["faces_few_shot"]). `ema`: their weight averaging; `carry=last`:
the next task starts from a task's last LoRA, as their code does.

Arguments: data, checkpoint, classes, method (any of forget.METHODS), seed, group, per_task,
num_tasks, margin_at_eval, shots, ema, carry, runlocal (see config_lib.gs_lora_paper).
"""
import ml_collections

from kswap_jax import config_lib
from kswap_jax.errors import UserError
from kswap_jax.methods import forget, forget_baselines


JOB = "forget"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "data": "", "checkpoint": "", "classes": "0-99",
        "method": "gs_lora", "seed": 0, "group": "block", "per_task": 20, "num_tasks": 4,
        "margin_at_eval": False, **config_lib.GS_LORA_ARGS}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  if not a.data:
    raise UserError("forget_faces.py needs data=/path/to/folder (train/, val/, test/ with one "
                    "subfolder per identity); got no data argument")
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.method = a.method
  c.data = ml_collections.ConfigDict(dict(
      dataset=f"folder:{a.data}", train_split="train", val_split="val", test_split="test",
      data_dir="", image_size=112, channels=3, eval_batch_size=256,
      # Inputs in [0, 1]: transforms.ToTensor() alone (GS-LoRA train/train_own.py line 287,
      # train/train_own_forget_cl.py line 133); our pipeline computes (x / 255 - mean) / std.
      mean=0.0, std=1.0,
      image_key="image", label_key="label",
      # Aligned 112 x 112 faces used as they are, no augmentation (train_own.py,
      # data_transform: ToTensor() only): the reading defaults.
      **config_lib.READ_DEFAULTS))
  c.tasks = ml_collections.ConfigDict(dict(forget=[], per_task=a.per_task,
                                           num_tasks=a.num_tasks,
                                           order_seed=forget.PROTOCOL_SEED))
  # The authors' ViT_face (GS-LoRA vit_pytorch_face/vit_face.py; built in train/train_own.py
  # lines 322-335: dim=512, heads=8, mlp_dim=2048, patch_size=8, depth 6 for their released
  # model "...-depth6new"), which a .pth of theirs also implies (torch_import.MODEL_DEFAULTS).
  c.model = ml_collections.ConfigDict(dict(
      variant="F6/8", dtype="float32", attention="einsum",
      dropout=0.1,                # dropout=0.1, emb_dropout=0.1 (train/train_own.py 332-333)
      gelu="exact",               # nn.GELU() (vit_face.py line 331)
      attention_scale="width",    # self.scale = dim ** -0.5 (vit_face.py line 346)
      qkv_bias=False,             # to_qkv ... bias=False (vit_face.py line 354)
      layernorm_eps=1e-5,         # nn.LayerNorm(dim), torch's default eps (vit_face.py 319, 499)
      class_posemb=True))         # pos_embedding (1, num_patches + 1, dim) (vit_face.py 486)
  c.init = ml_collections.ConfigDict(dict(checkpoint=a.checkpoint, pretrain=_pretrain(a, c)))
  config_lib.gs_lora_paper(c, a, "faces", head="cosface",
                           margin_at_eval=a.margin_at_eval, runlocal_variant="Nano/8")
  # The baselines' weights and settings, with their sources (forget_baselines).
  c.weights.update(forget_baselines.weights(a.method))
  c.baselines = forget_baselines.settings()
  return config_lib.common(c, a.runlocal, host_memory="retained")


def _pretrain(a, forget_config):
  """Trains the face ViT on all identities of the train folder (when checkpoint is empty),
  with the CosFace head (s=64, m=0.35: CosFace in vit_face.py; `-head CosFace` in
  scripts/run_sub.sh line 4)."""
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.data = ml_collections.ConfigDict(forget_config.data)
  c.data.update(classes=a.classes, fraction=1.0, per_class=0)
  c.model = ml_collections.ConfigDict(forget_config.model)
  # train/train_own.py evaluates with BACKBONE(images, labels) (line 501): the margin at
  # evaluation, as the forget config's margin_at_eval.
  c.head = ml_collections.ConfigDict(dict(kind="cosface", scale=64.0, margin=0.35,
                                          margin_at_eval=a.margin_at_eval))
  c.init = ml_collections.ConfigDict(dict(checkpoint=""))
  # Schedule ours (shorter); the authors' (scripts/run_sub.sh line 3-5): 1200 epochs, batch
  # 480, lr 3e-4, 10 warm-up epochs, decay every 150 epochs.
  c.train = ml_collections.ConfigDict(dict(epochs=100, batch_size=256, lr=1e-3, lr_end=1e-5,
                                           weight_decay=0.05, warmup_steps=500))
  if a.runlocal:
    c.data.update(image_size=32, eval_batch_size=16)
    c.model.variant = "Nano/8"
    c.train.update(epochs=1, batch_size=4, warmup_steps=0)
  return config_lib.common(c, a.runlocal)
