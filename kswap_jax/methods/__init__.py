"""The methods, one recipe module each: `pretrain`, `swap`, `forget` and `dispose`.

A module defines one `kswap_jax.recipe.Recipe` subclass named `Recipe`; `get(name)` returns
it. A new method is a new module here plus its tests: the runner trains, resumes, shards and
sweeps it without further code.
"""
from __future__ import annotations

import importlib

from kswap_jax.errors import UserError

NAMES = ("pretrain", "swap", "forget", "dispose")


def get(name: str):
  """The Recipe class of method `name`."""
  if name not in NAMES:
    raise UserError(f"method {name!r} is not allowed; use one of {NAMES}")
  return importlib.import_module(f"kswap_jax.methods.{name}").Recipe
