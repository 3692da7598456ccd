"""Building blocks for the files in configs/: argument parsing and shared sections.

A config file defines `get_config(arg)`; `arg` is the text after ':' in
`--config configs/file.py:key=value,flag`, parsed by `parse_arg`.
"""
from __future__ import annotations

import ml_collections

from kswap_jax.errors import UserError


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"runlocal,seed=3" -> ConfigDict(runlocal=True, seed=3) over typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise UserError(f"unknown config argument {key!r}; allowed: {sorted(defaults)}")
    kind = type(defaults[key])
    if not eq:
      out[key] = True
    elif kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = kind(value)
  return out


def digits_data(image_size: int = 8) -> ml_collections.ConfigDict:
  """The embedded handwritten digits (sklearn_digits), 8x8 grey images."""
  return ml_collections.ConfigDict(dict(
      dataset="sklearn_digits", train_split="train", test_split="test", data_dir="",
      image_size=image_size, channels=1, mean=0.5, std=0.5, eval_batch_size=512,
      image_key="image", label_key="label"))


def imagenet_data(image_size: int = 224) -> ml_collections.ConfigDict:
  """RGB images resized to `image_size`, normalised with mean = std = 0.5."""
  return ml_collections.ConfigDict(dict(
      dataset="imagenet2012", train_split="train", test_split="validation", data_dir="",
      image_size=image_size, channels=3, mean=0.5, std=0.5, eval_batch_size=256,
      image_key="image", label_key="label"))


def lora(rank: int = 8, alpha: float = 1.0, a_init: str = "small") -> ml_collections.ConfigDict:
  """LoRA on both MLP Dense layers of every block (the papers' setting)."""
  return ml_collections.ConfigDict(dict(
      rank=rank, alpha=alpha, a_init=a_init,
      targets=r"Transformer/encoderblock_\d+/MlpBlock_0/Dense_[01]"))


def common(config: ml_collections.ConfigDict, runlocal: bool) -> ml_collections.ConfigDict:
  """Mesh, checkpointing and logging fields every job has."""
  config.mesh = ml_collections.ConfigDict(dict(data=-1))
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=200 if not runlocal else 2,
                                                     keep=2))
  config.log_every = 50 if not runlocal else 1
  config.rng_impl = "threefry2x32"
  return config
