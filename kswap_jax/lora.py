"""LoRA as its own pytree beside frozen base params.

A LoRA tree mirrors the paths of the layers it adapts::

  {"Transformer": {"encoderblock_0": {"MlpBlock_0": {"Dense_0": {"A": (in, r), "B": (r, out)}}}}}

`apply` runs a Flax model with `y = layer(x) + scale * (x A) B` added to each targeted
`nn.Dense` / `nn.DenseGeneral` (intercepted by path, so base weights are never copied), and
`merge` folds `scale * A B` into the kernels.
"""
from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from kswap_jax.errors import UserError

MLP_TARGETS = r"Transformer/encoderblock_\d+/MlpBlock_0/Dense_[01]"

Params = dict[str, Any]


def target_paths(params: Params, targets: str) -> list[str]:
  """Paths ("a/b/c") of the kernels whose layer path fully matches the regex `targets`."""
  flat = traverse_util.flatten_dict(params, sep="/")
  paths = [k[: -len("/kernel")] for k in flat if k.endswith("/kernel")]
  hits = [p for p in paths if re.fullmatch(targets, p)]
  if not hits:
    raise UserError(f"lora.targets={targets!r} matches no layer; layers with kernels are e.g. "
                    f"{paths[:3]} ... {paths[-2:]}")
  return hits


def init(rng: jax.Array, params: Params, *, rank: int, targets: str = MLP_TARGETS,
         a_init: str = "kaiming", num_in_axes: dict[str, int] | None = None) -> Params:
  """New LoRA tree: A uniform(+-bound), B zeros, so the adapted model starts unchanged.

  a_init: "kaiming" -> bound 1/sqrt(in); "small" -> bound sqrt(6 / (51 in)), about 3x smaller.
  num_in_axes: per path, how many leading kernel axes are inputs (default 1; 2 for the
    attention `out` projection, whose kernel is (heads, head_dim, D)).
  """
  if rank < 1:
    raise UserError(f"lora.rank={rank} must be >= 1")
  if a_init not in ("kaiming", "small"):
    raise UserError(f"lora.a_init={a_init!r}; allowed: 'kaiming', 'small'")
  flat = traverse_util.flatten_dict(params, sep="/")
  paths = target_paths(params, targets)
  out = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    kernel = flat[path + "/kernel"]
    n_in = (num_in_axes or {}).get(path, _default_in_axes(path, kernel))
    fan_in, fan_out = math.prod(kernel.shape[:n_in]), math.prod(kernel.shape[n_in:])
    bound = 1 / math.sqrt(fan_in) if a_init == "kaiming" else math.sqrt(6 / (51 * fan_in))
    out[path] = {"A": jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound),
                 "B": jnp.zeros((rank, fan_out), jnp.float32)}
  return traverse_util.unflatten_dict(
      {tuple(p.split("/")) + (m,): v for p, ab in out.items() for m, v in ab.items()})


def _default_in_axes(path: str, kernel) -> int:
  return 2 if path.endswith("MultiHeadDotProductAttention_0/out") and kernel.ndim == 3 else 1


def layers(lora: Params) -> dict[str, dict[str, jax.Array]]:
  """{"a/b/c": {"A": ..., "B": ...}} view of a LoRA tree."""
  flat = traverse_util.flatten_dict(lora, sep="/")
  out: dict[str, dict[str, jax.Array]] = {}
  for k, v in flat.items():
    path, _, m = k.rpartition("/")
    out.setdefault(path, {})[m] = v
  return out


def delta(ab: dict[str, jax.Array], scale: float, kernel_shape: tuple[int, ...]) -> jax.Array:
  """scale * A @ B reshaped to the kernel's shape."""
  return (scale * ab["A"] @ ab["B"]).reshape(kernel_shape)


def merge(params: Params, lora: Params, scale: float) -> Params:
  """Base params with every LoRA folded in: W <- W + scale * A B."""
  flat = traverse_util.flatten_dict(params, sep="/")
  for path, ab in layers(lora).items():
    k = flat[path + "/kernel"]
    flat[path + "/kernel"] = (k + delta(ab, scale, k.shape).astype(k.dtype))
  return traverse_util.unflatten_dict(flat, sep="/")


def apply(model: nn.Module, params: Params, lora: Params | None, *args, scale: float,
          **kwargs):
  """`model.apply({"params": params}, *args, **kwargs)` with the LoRA path added."""
  if not lora:
    return model.apply({"params": params}, *args, **kwargs)
  by_path = {tuple(p.split("/")): ab for p, ab in layers(lora).items()}

  def interceptor(next_fun, fargs, fkwargs, context):
    ab = by_path.get(tuple(context.module.path))
    if ab is None or context.method_name != "__call__":
      return next_fun(*fargs, **fkwargs)
    x = fargs[0]
    y = next_fun(*fargs, **fkwargs)
    fan_in = ab["A"].shape[0]
    _check_fan_in(x.shape, fan_in)
    # One (tokens, in) matrix: XLA:CPU runs rank-r products over 2-D operands several times
    # faster than batched ones, above all in the backward pass.
    xf = x.reshape(-1, fan_in)
    upd = (xf @ ab["A"].astype(x.dtype)) @ (scale * ab["B"]).astype(x.dtype)
    return y + upd.reshape(y.shape).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    return model.apply({"params": params}, *args, **kwargs)


def _check_fan_in(shape: tuple[int, ...], size: int) -> None:
  """Raises unless some trailing axes of `shape` multiply to `size` (the layer's input)."""
  prod = 1
  for n in range(1, len(shape) + 1):
    prod *= shape[-n]
    if prod == size:
      return
  raise ValueError(f"LoRA input size {size} does not match activation shape {shape}")


def count(tree: Params) -> int:
  """Number of scalars in a pytree."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))
