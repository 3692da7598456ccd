"""Detection swap on a TFDS detection dataset by name (default coco/2017; voc/2007 alike).

  kswap swap --config configs/swap_det_coco.py --workdir runs/swap_det_coco \
      --config.data.data_dir=/data/tfds

Pretrains a ViT-B/16 DETR-style detector on the retain + forget classes first (init.pretrain;
give a backbone with --config.init.pretrain.init.checkpoint=ViT-B_16.npz, or an exported
detector with --config.init.checkpoint=DIR), then swaps. Ours: the learn classes are COCO
classes held out of pretraining (the paper learns CUB-200 / Stanford Dogs classes, whose
boxes TFDS stores in another layout); forget 15-19 (cat, dog, horse, sheep, cow), learn
14, 20-23 (bird, elephant, bear, zebra, giraffe), retain the other 70. coco/2017 needs
TensorFlow to build (`pip install -e '.[tf]'`, `tfds build coco/2017 --file_format
array_record`).
Arguments: dataset, retain, forget, learn (class ids or names), order, seed, runlocal.
"""
from kswap_jax import config_lib


JOB = "swap"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "order": "lbf", "seed": 0, "dataset": "coco/2017",
        "retain": "0-13,24-79", "forget": "15-19", "learn": "14,20-23"}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  data = config_lib.imagenet_data(224 if not a.runlocal else 32)
  data.update(dataset=a.dataset, label_key="objects/label", boxes_key="objects/bbox",
              classes_key="objects/label", max_objects=100)
  model = dict(variant="B/16" if not a.runlocal else "Nano/8",
               decoder_depth=6 if not a.runlocal else 1)
  return config_lib.tfds_swap("detection", a, data, model)
