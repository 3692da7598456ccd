"""Segmentation swap on ADE20K through TFDS (scene_parse150: its 150 classes, 0 ignored).

  kswap swap --config configs/swap_seg_ade20k.py --workdir runs/swap_seg_ade20k \
      --config.data.data_dir=/data/tfds

Pretrains a ViT-B/16 per-pixel segmenter on the retain + forget classes first (init.pretrain;
a backbone with --config.init.pretrain.init.checkpoint=ViT-B_16.npz, or an exported
segmenter with --config.init.checkpoint=DIR), then swaps. Class i is the mask value i + 1.
Ours: the learn classes are ADE20K classes held out of pretraining (the paper learns classes
of VOC, COCO, Oxford Pet and DeepGlobe); forget 140-144, learn 145-149, retain 0-139.
Arguments: dataset, retain, forget, learn (class ids), order, seed, runlocal.
"""
from kswap_jax import config_lib


JOB = "swap"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "order": "lbf", "seed": 0, "dataset": "scene_parse150",
        "retain": "0-139", "forget": "140-144", "learn": "145-149"}


def get_config(arg=None):
  a = config_lib.parse_arg(arg, **ARGS)
  data = config_lib.imagenet_data(224 if not a.runlocal else 32)
  data.update(dataset=a.dataset, test_split="test", label_key="annotation",
              mask_key="annotation", mask_zero="ignore",
              # the scenes' random affine warp (dense.affine_of), off here; on with e.g.
              # --config.data.affine.rotate=15 --config.init.pretrain.data.affine.rotate=15
              affine=dict(rotate=0.0, zoom=0.0, shear=0.0))
  model = dict(variant="B/16" if not a.runlocal else "Nano/8", pixel_dim=32, decoder_depth=1)
  return config_lib.tfds_swap("segmentation", a, data, model)
