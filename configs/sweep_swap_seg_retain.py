"""The segmentation swap's second validation study (configs/swap_seg_scenes.py), run per seed:
the retain classes' loss weight in the learn stage (weights.retain_in_learn) x the learn
classes' weight, with learn_replay, lr and the sparse weight the first study
(configs/sweep_swap_seg_scenes.py) chose. It chose the config's retain_in_learn (and kept its
learn weight) by the mean score over seeds 0-2.

  kswap sweep --config configs/sweep_swap_seg_retain.py:seed=1 \
      --workdir runs/sweep_swap_seg_retain_seed1
  python experiments/sweep_swap_seg_seeds.py --study retain   # seeds 0-2, mean score

Arguments: order, seed, runlocal. Train / validation / test: train[:90%] / train[90%:] / test,
pretraining included; score as in the first study. All members are vmapped side by side.
"""
from kswap_jax import config_lib


JOB = "sweep"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "order": "lbf", "seed": 0}


def get_config(arg=None):
  # The forget bound this study ran with; the third study (configs/sweep_swap_seg_forget.py)
  # then chose the config's value.
  return config_lib.scenes_study(
      "segmentation", config_lib.parse_arg(arg, **ARGS),
      dict(weights=dict(retain_in_learn=(1.0, 2.0, 4.0, 8.0), learn=(0.5, 1.0))),
      pinned=dict(bound=15.0))
