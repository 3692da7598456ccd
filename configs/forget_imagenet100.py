"""GS-LoRA on ImageNet-100 with ViT-B/16: forget 20 classes per task for 4 tasks (100-20 x 4).

  kswap forget --config configs/forget_imagenet100.py:checkpoint=/ckpts/vit_b16_in100.npz \
      --workdir runs/forget_in100

init.checkpoint (`checkpoint=`): a ViT-B/16 whose head classifies the chosen classes, or the
1000 ImageNet classes (its rows of the chosen classes are kept): the authors' backbone is
torchvision's `vit_b_16` IMAGENET1K_V1 (`vit_b_16-c867db91.pth`; the `.npz` layouts of
vision_transformer / big_vision load too). `classes=`: default the ImageNet-100 list
(`config_lib.IMAGENET100`), in sorted WordNet-id order, which is the label order of the
authors' ImageFolder data (label k = k-th folder name) and of TFDS imagenet2012.
Splits: train[:98%] for training, train[98%:] for model selection (ours), validation for test.
Training sets: 5% of the retain and of the forget images of a task (the authors' data_ratio);
`shots=4`: 4 images per class instead.
`missing`: with a 1000-class checkpoint, also measure the other 900 classes' validation images
through its full head after each task (the authors' missing-class evaluation).

Arguments: checkpoint, classes, method (any of forget.METHODS), seed, group, per_task,
num_tasks, missing, shots, ema, carry, runlocal (see config_lib.gs_lora_paper).
"""
import ml_collections

from kswap_jax import config_lib
from kswap_jax.methods import forget, forget_baselines


JOB = "forget"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "checkpoint": "", "classes": "imagenet100", "method": "gs_lora",
        "seed": 0, "group": "block", "per_task": 20, "num_tasks": 4, "missing": False,
        **config_lib.GS_LORA_ARGS}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  c = ml_collections.ConfigDict()
  c.seed = a.seed
  c.method = a.method
  # Torch weights: torchvision's statistics, as the authors normalise (train_own_forget_cl.py,
  # IMAGENET_MEAN / IMAGENET_STD); a .npz (vision_transformer / big_vision): [-1, 1] inputs.
  stats = (0.5, 0.5) if a.checkpoint.endswith(".npz") else config_lib.TORCHVISION_STATS
  c.data = config_lib.imagenet_data(224, stats)
  c.data.update(train_split="train[:98%]", val_split="train[98%:]", test_split="validation")
  # Every image, training ones too: shorter side to 256, centre 224 x 224, no augmentation
  # (train_own_forget_cl.py, data_transform: Resize(256), CenterCrop(224)).
  c.data.update(resize=0 if a.runlocal else 256, train_crop="none", flip=False)
  c.tasks = ml_collections.ConfigDict(dict(forget=[], per_task=a.per_task,
                                           num_tasks=a.num_tasks,
                                           order_seed=forget.PROTOCOL_SEED))
  c.model = ml_collections.ConfigDict(dict(variant="B/16", dropout=0.0, dtype="float32",
                                           attention="einsum"))
  classes = (",".join(sorted(config_lib.IMAGENET100)) if a.classes == "imagenet100"
             else a.classes)
  c.init = ml_collections.ConfigDict(dict(checkpoint=a.checkpoint, dataset="imagenet2012",
                                          classes=classes))
  c.missing_classes = "rest" if a.missing else ""  # "rest": every class the protocol drops
  # torchvision's Linear head (ModifiedViT keeps vit_b_16's heads; modified_VIT.py).
  config_lib.gs_lora_paper(c, a, "imagenet")
  # The baselines' weights and settings, with their sources (forget_baselines).
  c.weights.update(forget_baselines.weights(a.method))
  c.baselines = forget_baselines.settings()
  return config_lib.common(c, a.runlocal, host_memory="retained")
