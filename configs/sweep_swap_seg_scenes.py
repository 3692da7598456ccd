"""A 24-member validation study of the segmentation swap (configs/swap_seg_scenes.py): how LBF's
forget stage replays the learn classes (learn_replay) x lr x the learn classes' loss weight x
the group-sparse weight. It chose the config's learn_replay, lr, learn and sparse weights.

  kswap sweep --config configs/sweep_swap_seg_scenes.py --workdir runs/sweep_swap_seg_scenes

Arguments: order, seed, runlocal. Train / validation / test: train[:90%] / train[90%:] / test,
pretraining included; the best member by val mIoU_R + mIoU_L - mIoU_F among those whose val
mIoU_R stays within select_retain_drop (5) points of the pretrained model's. The lr and weight
members are vmapped side by side; the two learn_replay groups run one after the other.
"""
from kswap_jax import config_lib


JOB = "sweep"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "order": "lbf", "seed": 0}


def get_config(arg=None):
  # The learn stage's retain weight and the forget bound this study ran with; the second and
  # third studies (configs/sweep_swap_seg_retain.py, sweep_swap_seg_forget.py) then chose the
  # config's values.
  return config_lib.scenes_study(
      "segmentation", config_lib.parse_arg(arg, **ARGS),
      dict(learn_replay=("joined", "paired"), train=dict(lr=(3e-3, 6e-3)),
           weights=dict(learn=(0.35, 0.5, 1.0), sparse=(0.0, 0.005))),
      pinned=dict(retain_in_learn=1.0, bound=15.0))
