"""LoRA as its own pytree beside frozen base params.

A LoRA tree mirrors the paths of the layers it adapts::

  {"Transformer": {"encoderblock_0": {"MlpBlock_0": {"Dense_0": {"A": (in, r), "B": (r, out)}}}}}

`apply` runs a Flax model with each targeted `nn.Dense` / `nn.DenseGeneral` computing
`x (W + scale A B) + bias` (intercepted by path; `adapted_matmul` gives the LoRA its
gradients without forming the (tokens, out) update `(x A) B`), and `merge` folds `scale * A B`
into the kernels.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kswap_jax import trees
from kswap_jax.errors import UserError

MLP_TARGETS = r"Transformer/encoderblock_\d+/MlpBlock_0/Dense_[01]"

Params = dict[str, Any]


def target_paths(params: Params, targets: str) -> list[str]:
  """Paths ("a/b/c") of the kernels whose layer path fully matches the regex `targets`."""
  paths = [k[: -len("/kernel")] for k in trees.flatten(params) if k.endswith("/kernel")]
  hits = trees.matching(paths, targets, "lora.targets")
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
  flat = trees.flatten(params)
  paths = target_paths(params, targets)
  out = {}
  for path, key in zip(paths, jax.random.split(rng, len(paths))):
    kernel = flat[path + "/kernel"]
    n_in = (num_in_axes or {}).get(path, _default_in_axes(path, kernel))
    fan_in, fan_out = math.prod(kernel.shape[:n_in]), math.prod(kernel.shape[n_in:])
    bound = 1 / math.sqrt(fan_in) if a_init == "kaiming" else math.sqrt(6 / (51 * fan_in))
    out[path] = {"A": jax.random.uniform(key, (fan_in, rank), jnp.float32, -bound, bound),
                 "B": jnp.zeros((rank, fan_out), jnp.float32)}
  return trees.unflatten({f"{p}/{m}": v for p, ab in out.items() for m, v in ab.items()})


def _default_in_axes(path: str, kernel) -> int:
  return 2 if path.endswith("MultiHeadDotProductAttention_0/out") and kernel.ndim == 3 else 1


def layers(lora: Params) -> dict[str, dict[str, jax.Array]]:
  """{"a/b/c": {"A": ..., "B": ...}} view of a LoRA tree."""
  out: dict[str, dict[str, jax.Array]] = {}
  for k, v in trees.flatten(lora).items():
    path, _, m = k.rpartition("/")
    out.setdefault(path, {})[m] = v
  return out


def delta(ab: dict[str, jax.Array], scale: float, kernel_shape: tuple[int, ...]) -> jax.Array:
  """scale * A @ B reshaped to the kernel's shape."""
  return (scale * ab["A"] @ ab["B"]).reshape(kernel_shape)


def merge(params: Params, lora: Params, scale: float) -> Params:
  """Base params with every LoRA folded in: W <- W + scale * A B."""
  flat = trees.flatten(params)
  for path, ab in layers(lora).items():
    k = flat[path + "/kernel"]
    flat[path + "/kernel"] = (k + delta(ab, scale, k.shape).astype(k.dtype))
  return trees.unflatten(flat)


@jax.custom_vjp
def adapted_matmul(x: jax.Array, kernel: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """x (M, I) @ (kernel + a b) -> (M, O), with kernel (I, O), a (I, r), b (r, O).

  The forward is one matmul with the merged kernel. The backward gives x and kernel their
  usual gradients and the LoRA its rank-r ones, x^T (dy b^T) and (x a)^T dy, so no (M, O)
  update x a b is stored for the backward pass. Reverse mode only (any order of `grad`).
  """
  return x @ _merged(kernel, a, b, x.dtype)


def _merged(kernel, a, b, dtype):
  return (kernel + a @ b).astype(dtype)


def _adapted_fwd(x, kernel, a, b):
  return x @ _merged(kernel, a, b, x.dtype), (x, kernel, a, b)


def _adapted_bwd(res, dy):
  x, kernel, a, b = res
  # The rank-r products are kept in (M, r) and (r, I) layouts: left to itself, XLA folds the
  # transposes into the dots and emits (r, M) and (I, r) products that contract the wrong
  # way for XLA:CPU, about 10x slower (benchmarks/lora_products.py).
  keep = jax.lax.optimization_barrier
  xa, g = keep(x @ a.astype(x.dtype)), keep(dy @ b.astype(x.dtype).T)  # (M, r) each
  return (dy @ _merged(kernel, a, b, x.dtype).T, (x.T @ dy).astype(kernel.dtype),
          keep(g.T @ x).T.astype(a.dtype), (xa.T @ dy).astype(b.dtype))


adapted_matmul.defvjp(_adapted_fwd, _adapted_bwd)


def apply(model: nn.Module, params: Params, lora: Params | None, *args, scale: float,
          **kwargs):
  """`model.apply({"params": params}, *args, **kwargs)` with every LoRA layer adapted.

  A targeted layer computes `x (W + scale A B) + bias` in its own dtype over one
  (tokens, in) matrix, via `adapted_matmul`.
  """
  if not lora:
    return model.apply({"params": params}, *args, **kwargs)
  by_path = {tuple(p.split("/")): ab for p, ab in layers(lora).items()}

  def interceptor(next_fun, fargs, fkwargs, context):
    ab = by_path.get(tuple(context.module.path))
    if ab is None or context.method_name != "__call__":
      return next_fun(*fargs, **fkwargs)
    x, layer = fargs[0], context.module.variables["params"]
    kernel = layer["kernel"]
    fan_in, fan_out = ab["A"].shape[0], ab["B"].shape[1]
    n_in = _trailing_axes(x.shape, fan_in)
    dtype = context.module.dtype or jnp.result_type(x, kernel)
    y = adapted_matmul(x.reshape(-1, fan_in).astype(dtype), kernel.reshape(fan_in, fan_out),
                       ab["A"], scale * ab["B"])
    if "bias" in layer:
      y = y + layer["bias"].reshape(fan_out).astype(dtype)
    n_out = _trailing_axes(kernel.shape, fan_out)
    return y.reshape(x.shape[: x.ndim - n_in] + kernel.shape[kernel.ndim - n_out:])

  with nn.intercept_methods(interceptor):
    return model.apply({"params": params}, *args, **kwargs)


def _trailing_axes(shape: tuple[int, ...], size: int) -> int:
  """How many trailing axes of `shape` multiply to `size` (a layer's input or output)."""
  prod = 1
  for n in range(1, len(shape) + 1):
    prod *= shape[-n]
    if prod == size:
      return n
  raise ValueError(f"LoRA size {size} does not match the trailing axes of shape {shape}")


def count(tree: Params) -> int:
  """Number of scalars in a pytree."""
  return int(sum(np.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(tree)))
