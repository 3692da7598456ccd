"""Pytrees addressed by "a/b/leaf" paths, and regexes that pick leaves by path.

The one place where the library flattens a tree and matches regexes on its paths: trainable
params, LoRA targets, the params Gradient Collision is measured on, sharding rules and the
`.npz` names to keep are all regexes that fully match such paths.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

from flax import traverse_util

from kswap_jax.errors import UserError


def flatten(tree: Any) -> dict[str, Any]:
  """{"a": {"b": x}} -> {"a/b": x} (nested dicts; empty dicts vanish)."""
  return traverse_util.flatten_dict(tree, sep="/") if tree else {}


def unflatten(flat: dict[str, Any]) -> dict:
  """Inverse of `flatten`."""
  return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def compile_patterns(patterns: Iterable[str], what: str) -> list[re.Pattern]:
  """Compiled regexes; an invalid one is a UserError naming the config field `what`."""
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise UserError(f"{what} regex {p!r} is invalid ({e}); give Python regexes that match "
                      "whole 'a/b/leaf' paths, e.g. 'head/.*'") from None
  return out


def first_match(paths: Iterable[str], patterns: Sequence[str],
                what: str = "regex") -> dict[str, int]:
  """{path: index of the first pattern that fully matches it, or -1}."""
  compiled = compile_patterns(patterns, what)
  return {p: next((i for i, c in enumerate(compiled) if c.fullmatch(p)), -1) for p in paths}


def matching(paths: Iterable[str], regex: str, what: str = "regex") -> list[str]:
  """The paths that `regex` fully matches, in order ("" matches none)."""
  if not regex:
    return []
  return [p for p, i in first_match(paths, [regex], what).items() if i == 0]


def partition(tree: Any, regex: str) -> tuple[dict, dict]:
  """(leaves not matched, leaves matched) by a regex over "a/b/leaf" paths, as two trees."""
  flat = flatten(tree)
  hit = set(matching(flat, regex))
  return (unflatten({k: v for k, v in flat.items() if k not in hit}),
          unflatten({k: v for k, v in flat.items() if k in hit}))


def combine(tree: Any, other: Any) -> dict:
  """Inverse of `partition`: the leaves of both trees in one tree (`other` wins)."""
  if not other:
    return tree
  return unflatten({**flatten(tree), **flatten(other)})
