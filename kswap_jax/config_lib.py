"""Building blocks for the files in configs/: argument parsing and shared sections.

A config file defines `get_config(arg)`; `arg` is the text after ':' in
`--config configs/file.py:key=value,flag`, parsed by `parse_arg`. `check` refuses numeric
fields out of range before a run starts.
"""
from __future__ import annotations

import importlib.util
import numbers
import os

import ml_collections

from kswap_jax.errors import UserError


# The standard 100-class ImageNet subset (ImageNet-100), as WordNet ids = imagenet2012 names.
IMAGENET100 = (
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 "
    "n01773797 n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 "
    "n03530642 n04435653 n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 "
    "n04493381 n02109047 n04111531 n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 "
    "n01692333 n07714571 n02974003 n02114855 n03785016 n03764736 n03775546 n02087046 n07836838 "
    "n04099969 n04592741 n03891251 n02701002 n03379051 n02259212 n07715103 n03947888 n04026417 "
    "n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 n02483362 n04127249 n02089973 "
    "n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 n02113978 n03787032 "
    "n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 n03837869 "
    "n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 "
    "n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 "
    "n02090622").split()


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
      try:
        out[key] = kind(value)
      except ValueError:
        raise UserError(f"config argument {key}={value!r} must be of type {kind.__name__}, like "
                        f"its default {defaults[key]!r}") from None
  return out


# Allowed values of numeric fields by name: (must be an int, range text, test). A rule of a node
# (`epochs`, `lr`, `weights`) covers every number under it; the outermost named node decides,
# so `weights.alpha` is a loss weight (>= 0) and `lora.alpha` a LoRA scale (> 0).
_INT_POSITIVE = (True, ">= 1", lambda x: x >= 1)
_INT_NONNEGATIVE = (True, ">= 0", lambda x: x >= 0)
_POSITIVE = (False, "> 0", lambda x: x > 0)
_NONNEGATIVE = (False, ">= 0", lambda x: x >= 0)
_RULES = {
    **dict.fromkeys(("batch_size", "eval_batch_size", "source_batch_size", "image_size",
                     "channels", "rank", "num_splits", "steps", "num_tasks", "per_task", "keep",
                     "log_every", "eval_every_epochs", "epochs"), _INT_POSITIVE),
    **dict.fromkeys(("every_steps", "warmup_steps", "warmup_epochs", "per_class", "seed",
                     "order_seed"), _INT_NONNEGATIVE),
    **dict.fromkeys(("lr", "alpha", "scale"), _POSITIVE),
    **dict.fromkeys(("lr_end", "weight_decay", "weights"), _NONNEGATIVE),
    "dropout": (False, "in [0, 1)", lambda x: 0 <= x < 1),
    "fraction": (False, "in (0, 1]", lambda x: 0 < x <= 1),
}
_UNCHECKED = ("grid", "members")  # a sweep's value lists; each member config is checked alone


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses a numeric field outside its range (`_RULES`): UserError naming field, value, range."""

  def walk(node: ml_collections.ConfigDict, prefix: str, rule: tuple | None) -> None:
    for key, value in node.items():
      if key in _UNCHECKED:
        continue
      path, field_rule = f"{prefix}{key}", rule or _RULES.get(key)
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f"{path}.", field_rule)
      elif field_rule:
        integer, allowed, ok = field_rule
        kind = numbers.Integral if integer else numbers.Real
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, kind) and not isinstance(v, bool) and ok(v) for v in values):
          every = "every entry " if values is value else ""
          raise UserError(f"config field {path}={value!r}: {every}must be "
                          f"{'an int' if integer else 'a number'} {allowed}")

  walk(config, "", None)


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path` (a config built on another one)."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"kswap_config_{name}", path)
  if spec is None or not os.path.exists(path):
    raise UserError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def digits_data(image_size: int = 8) -> ml_collections.ConfigDict:
  """The embedded handwritten digits (sklearn_digits), 8x8 grey images."""
  return ml_collections.ConfigDict(dict(
      dataset="sklearn_digits", train_split="train", test_split="test", data_dir="",
      image_size=image_size, channels=1, mean=0.5, std=0.5, eval_batch_size=512,
      image_key="image", label_key="label", cache_images=True))


def imagenet_data(image_size: int = 224) -> ml_collections.ConfigDict:
  """RGB images resized to `image_size`, normalised with mean = std = 0.5."""
  return ml_collections.ConfigDict(dict(
      dataset="imagenet2012", train_split="train", test_split="validation", data_dir="",
      image_size=image_size, channels=3, mean=0.5, std=0.5, eval_batch_size=256,
      image_key="image", label_key="label", cache_images=True))


def lora(rank: int = 8, alpha: float = 1.0, a_init: str = "small") -> ml_collections.ConfigDict:
  """LoRA on both MLP Dense layers of every block (the papers' setting)."""
  return ml_collections.ConfigDict(dict(
      rank=rank, alpha=alpha, a_init=a_init,
      targets=r"Transformer/encoderblock_\d+/MlpBlock_0/Dense_[01]"))


def gs_lora_paper(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict, beta: list[float],
                  head: str = "linear", margin_at_eval: bool = False,
                  runlocal_variant: str = "Nano/16") -> None:
  """The GS-LoRA papers' continual-forgetting settings (LoRA, head, weights, 100 epochs per
  task, validation every 5), shrunk for runlocal. `a` holds method, group, num_tasks, runlocal.
  """
  from kswap_jax.methods import forget  # pylint: disable=g-import-not-at-top
  c.lora = lora(rank=8, alpha=1.0, a_init="small")
  c.lora.a_init_first = "kaiming"
  c.head = ml_collections.ConfigDict(dict(kind=head, scale=64.0, margin=0.35,
                                          margin_at_eval=margin_at_eval))
  c.group = a.group
  c.weights = ml_collections.ConfigDict(dict(
      beta=beta, bound=105.0, alpha=1e-4, proto_bound=18.0, w_f=0.05, w_r=0.05))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=48, epochs=100, warmup_epochs=20, lr=forget.get_method(a.method).lr,
      lr_end=1e-5, weight_decay=0.05))
  c.select_best = True
  c.eval_every_epochs = 5
  if a.runlocal:
    c.data.update(image_size=32, eval_batch_size=16)
    c.model.variant = runlocal_variant
    c.sets.retain.per_class = 1
    c.tasks.num_tasks = min(a.num_tasks, 2)
    c.train.update(batch_size=4, epochs=1, warmup_epochs=0)
    c.eval_every_epochs = 1


def sweep(method: str, base: ml_collections.ConfigDict, grid: dict,
          runlocal: bool) -> ml_collections.ConfigDict:
  """A `sweep` job config over `base`, a config of job `method` whose train split is held
  apart from a validation split `train[90%:]` (pretraining included), so the best member is
  chosen on validation. grid: config paths -> value tuples (their product is the members)."""
  base.data.update(train_split="train[:90%]", val_split="train[90%:]")
  if "pretrain" in base.init:
    base.init.pretrain.data.train_split = "train[:90%]"
  c = ml_collections.ConfigDict(dict(method=method, base=base,
                                     grid=ml_collections.ConfigDict(grid)))
  c.members = ()              # explicit members, e.g. ({"train.lr": 0.02},)
  c.members_per_chunk = 0     # 0: all members in one program; -1: as many as fit memory
  c = common(c, runlocal)
  c.mesh.sweep = 1            # devices the members are split over (the rest split the batch)
  return c


def common(config: ml_collections.ConfigDict, runlocal: bool,
           host_memory: str = "default") -> ml_collections.ConfigDict:
  """Mesh, checkpointing, logging and host-allocator fields every job has."""
  # data=-1: all devices data-parallel; fsdp > 1 shards params by `rules` (kswap_jax.sharding).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=()))
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=200 if not runlocal else 2,
                                                     keep=2))
  config.log_every = 50 if not runlocal else 1
  config.rng_impl = "threefry2x32"
  # "retained": glibc reuses freed host memory (faster XLA:CPU steps with large buffers).
  config.host_memory = host_memory
  return config
