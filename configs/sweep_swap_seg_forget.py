"""The segmentation swap's third validation study (configs/swap_seg_scenes.py), run per seed:
the retain classes' weight in LBF's forget stage (weights.retain) x the forget loss's bound
(weights.bound), with every other value as the first two studies
(configs/sweep_swap_seg_scenes.py, sweep_swap_seg_retain.py) chose them. It chose the config's
bound (and kept its retain weight) by the mean score over seeds 0-2.

  kswap sweep --config configs/sweep_swap_seg_forget.py:seed=1 \
      --workdir runs/sweep_swap_seg_forget_seed1
  python experiments/sweep_swap_seg_seeds.py --study forget   # seeds 0-2, mean score

Arguments: order, seed, runlocal. Train / validation / test: train[:90%] / train[90%:] / test,
pretraining included; score as in the first study. All members are vmapped side by side.
"""
from kswap_jax import config_lib


JOB = "sweep"  # the kswap job this config is for
# Its arguments (`--config FILE:key=value,flag`) and their defaults.
ARGS = {"runlocal": False, "order": "lbf", "seed": 0}


def get_config(arg=None):
  return config_lib.scenes_study(
      "segmentation", config_lib.parse_arg(arg, **ARGS),
      dict(weights=dict(retain=(1.0, 2.0, 4.0, 8.0), bound=(4.0, 15.0))))
