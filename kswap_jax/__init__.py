"""kswap_jax: forget, retain and learn classes in pretrained vision transformers with JAX.

The stable entry points (docs/API.md), imported on first use:

  losses, lora, metrics, mia, train         modules: loss terms, LoRA pytrees, accuracy / H,
                                            membership inference, train state and steps
  matching, dense_metrics                   detection matching and losses; box AP and IoU
  ViT, make_model, init_params              the Flax ViT (kswap_jax.models.vit)
  export_model, load_model                  exported models (kswap_jax.checkpoints)
  load_pretrained, save_npz                 big_vision / vision_transformer .npz (kswap_jax.npz)
  export_file, timm_state_dict              .npz / timm safetensors files (kswap_jax.export)
  run, sweep, evaluate                      the runner (kswap_jax.runner)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {
    "losses": "kswap_jax.losses", "lora": "kswap_jax.lora", "metrics": "kswap_jax.metrics",
    "mia": "kswap_jax.mia", "train": "kswap_jax.train", "matching": "kswap_jax.matching",
    "dense_metrics": "kswap_jax.dense_metrics",
    "ViT": "kswap_jax.models.vit:ViT", "make_model": "kswap_jax.models.vit:make_model",
    "init_params": "kswap_jax.models.vit:init_params",
    "export_model": "kswap_jax.checkpoints:export_model",
    "load_model": "kswap_jax.checkpoints:load_model",
    "load_pretrained": "kswap_jax.npz:load_pretrained", "save_npz": "kswap_jax.npz:save_npz",
    "export_file": "kswap_jax.export:export",
    "timm_state_dict": "kswap_jax.export:timm_state_dict",
    "run": "kswap_jax.runner:run", "sweep": "kswap_jax.runner:sweep",
    "evaluate": "kswap_jax.runner:evaluate",
}  # name -> "module" or "module:attribute"
__all__ = list(_WHERE)


def __getattr__(name: str):
  if name not in _WHERE:
    raise AttributeError(f"module 'kswap_jax' has no attribute {name!r}")
  module, _, attr = _WHERE[name].partition(":")
  module = importlib.import_module(module)
  return getattr(module, attr) if attr else module
