"""config_lib.check: every digits config passes; a numeric field out of range is refused."""
import copy
import functools
import os
import re

import ml_collections
import pytest

from kswap_jax import config_lib
from kswap_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("pretrain_digits.py", "swap_digits.py", "forget_digits.py", "dispose_digits.py",
           "sweep_swap_digits.py")
MUTATIONS = (("train.lr", -1.0), ("train.lr", 0.0), ("train.batch_size", -4),
             ("train.batch_size", 0), ("train.epochs", 0), ("data.image_size", 0),
             ("lora.rank", 0), ("data.eval_batch_size", 0), ("seed", "abc"),
             ("model.dropout", 1.0), ("weights.forget", -1.0), ("sets.retain.fraction", 0.0))


@functools.cache
def _fresh(name):
  return config_lib.load(os.path.join(ROOT, "configs", name), "runlocal")


def _config(name):
  return copy.deepcopy(_fresh(name))


def _numeric_leaf(config, path):
  """The dotted path of the first number at or under `path` (under `base` in a sweep), or None:
  train.epochs -> train.epochs.learn in swap_digits."""
  parts = (["base"] if "base" in config else []) + path.split(".")
  node = config
  for p in parts:
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      return None
    node = node[p]
  while isinstance(node, ml_collections.ConfigDict):
    parts.append(next(iter(node.keys())))
    node = node[parts[-1]]
  return ".".join(parts)


def _set(config, path, value):
  *parents, leaf = path.split(".")
  node = functools.reduce(lambda n, p: n[p], parents, config)
  with node.ignore_type():
    node[leaf] = value


CASES = [pytest.param(name, leaf, value, id=f"{name[:-3]}-{leaf}={value}")
         for name in CONFIGS for path, value in MUTATIONS
         if (leaf := _numeric_leaf(_fresh(name), path))]


@pytest.mark.parametrize("name", CONFIGS)
def test_default_configs_pass(name):
  config_lib.check(_config(name))
  config_lib.check(config_lib.load(os.path.join(ROOT, "configs", name)))


@pytest.mark.parametrize("name, leaf, value", CASES)
def test_out_of_range_field_is_refused(name, leaf, value):
  c = _config(name)
  _set(c, leaf, value)
  with pytest.raises(UserError, match=re.escape(f"config field {leaf}={value!r}: must be")):
    config_lib.check(c)


def test_node_rules_lists_and_sweep_grid():
  c = _config("forget_digits.py")
  c.weights.alpha = 0.0  # a loss weight: >= 0
  config_lib.check(c)
  c.lora.alpha = 0.0     # the LoRA scale: > 0
  with pytest.raises(UserError, match=r"lora.alpha=0.0: must be a number > 0"):
    config_lib.check(c)
  c = _config("forget_digits.py")
  c.weights.beta = [0.2, -0.1]
  with pytest.raises(UserError, match=r"weights.beta=\[0.2, -0.1\]: every entry must be"):
    config_lib.check(c)
  c = _config("dispose_digits.py")
  c.train.lr.transfer = 0.0
  with pytest.raises(UserError, match=r"train.lr.transfer=0.0: must be a number > 0"):
    config_lib.check(c)
  c = _config("sweep_swap_digits.py")
  c.grid.train.lr = (-1.0, 0.0)  # value lists: each member's config is checked on its own
  c.members = ({"train.lr": "abc"},)
  config_lib.check(c)


def test_config_argument_of_wrong_type_is_refused():
  with pytest.raises(UserError, match=r"config argument seed='abc' must be of type int"):
    config_lib.parse_arg("seed=abc", seed=0)
