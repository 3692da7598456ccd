"""Knowledge Swapping for segmentation on digit scenes: forget 6-7, keep 0-5, learn 8-9.

  kswap swap --config configs/swap_seg_scenes.py --workdir runs/swap_seg_scenes
  kswap swap --config configs/swap_seg_scenes.py:order=fbl --workdir runs/swap_seg_fbl

Arguments: order (lbf | fbl | simultaneous | learn | forget), seed, runlocal. The segmentation
model is pretrained first (init.pretrain: configs/pretrain_scenes.py:task=segmentation).
"""
from kswap_jax import config_lib


JOB = "swap"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "order": "lbf", "seed": 0}


def get_config(arg=None):
  return config_lib.scenes_swap("segmentation", config_lib.parse_arg(arg, **ARGS))
