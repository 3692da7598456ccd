"""GS-LoRA on ImageNet-100 with ViT-B/16: forget 20 classes per task for 4 tasks (100-20 x 4).

  kswap forget --config configs/forget_imagenet100.py:ckpt=/ckpts/vit_b16_in100.npz \
      --workdir runs/forget_in100

init.checkpoint (`ckpt=`): a ViT-B/16 `.npz` (vision_transformer or big_vision layout) whose
head already classifies the 100 classes (`classes=`, default ImageNet ids 0-99). A checkpoint
with another head keeps a zero head: fine-tune it on the 100 classes with `kswap pretrain` first
and pass its exported model directory instead.
Splits: train[:98%] for training, train[98%:] for model selection, validation for test.
Retain data: 5% of each retained class (`sets.retain.per_class=4` for the 4-shot setting).

Arguments: ckpt, classes, method, seed, group, per_task, num_tasks, runlocal.
"""
import ml_collections

from kswap_jax import config_lib
from kswap_jax.methods import forget


def get_config(arg=None):
  a = config_lib.parse_arg(arg, runlocal=False, ckpt="", classes="0-99", method="gs_lora",
                           seed=0, group="block", per_task=20, num_tasks=4)
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.method = a.method
  c.data = config_lib.imagenet_data(224)
  c.data.update(train_split="train[:98%]", val_split="train[98%:]", test_split="validation")
  c.sets = ml_collections.ConfigDict(dict(retain=dict(fraction=0.05, per_class=0),
                                          forget=dict(fraction=1.0, per_class=0)))
  c.tasks = ml_collections.ConfigDict(dict(forget=[], per_task=a.per_task,
                                           num_tasks=a.num_tasks,
                                           order_seed=forget.PROTOCOL_SEED))
  c.model = ml_collections.ConfigDict(dict(variant="B/16", dropout=0.0, dtype="float32",
                                           attention="einsum"))
  c.init = ml_collections.ConfigDict(dict(checkpoint=a.ckpt, dataset="imagenet2012",
                                          classes=a.classes))
  config_lib.gs_lora_paper(c, a, beta=[0.2, 0.25, 0.25, 0.25])
  return config_lib.common(c, a.runlocal, host_memory="retained")
