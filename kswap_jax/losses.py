"""Pure loss functions: learning, retaining, forgetting and the group-sparse penalty.

logits: (B, K) float; labels: (B,) int. Every loss returns a scalar.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from kswap_jax.errors import UserError

GROUP_TYPES = ("block", "layer", "matrix")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy over the batch."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def bounded_forget(logits: jax.Array, labels: jax.Array, bound) -> jax.Array:
  """relu(bound - CE): ascends the forget batch's CE until it reaches `bound`, then 0."""
  return jax.nn.relu(bound - cross_entropy(logits, labels))


def group_key(path: str, group: str) -> str:
  """Group of a LoRA leaf "Transformer/encoderblock_3/MlpBlock_0/Dense_0/A".

  block -> "encoderblock_3"; layer -> ".../Dense_0"; matrix -> the leaf path itself.
  """
  if group == "block":
    m = re.search(r"encoderblock_\d+", path)
    return m.group(0) if m else path.rpartition("/")[0]
  if group == "layer":
    return path.rpartition("/")[0]
  if group == "matrix":
    return path
  raise UserError(f"group type {group!r} is not allowed; use one of {GROUP_TYPES}")


def group_norms(lora, group: str = "block", eps: float = 1e-12) -> dict[str, jax.Array]:
  """{group name: sqrt(sum of squared Frobenius norms of its tensors + eps)}."""
  sq: dict[str, jax.Array] = {}
  for path, x in traverse_util.flatten_dict(lora, sep="/").items():
    k = group_key(path, group)
    sq[k] = sq.get(k, 0.0) + jnp.sum(jnp.square(x.astype(jnp.float32)))
  return {k: jnp.sqrt(v + eps) for k, v in sq.items()}


def group_sparse(lora, group: str = "block", eps: float = 1e-12) -> jax.Array:
  """Group lasso S = sum_g sqrt(sum_{W in g} |W|_F^2 + eps); gradient finite (0) at zero."""
  return sum(group_norms(lora, group, eps).values(), jnp.zeros((), jnp.float32))


SIMILARITIES = ("cosine", "dot")


def gradient_collision(per_batch_grads, similarity: str = "cosine",
                       eps: float = 1e-12) -> jax.Array:
  """Mean pairwise similarity of K gradients: GC = mean_{i != j} sim(g_i, g_j).

  per_batch_grads: a pytree whose leaves have a leading axis K >= 2 (one gradient per source
    sub-batch); each g_k is the concatenation of its flattened leaves.
  similarity: "cosine" -> <g_i, g_j> / (|g_i| |g_j|) (|g|^2 gets `eps` added);
    "dot" -> <g_i, g_j>.
  Returns a scalar: lower means the K gradients point in more different directions.
  """
  if similarity not in SIMILARITIES:
    raise UserError(f"gc similarity {similarity!r} is not allowed; use one of {SIMILARITIES}")
  leaves = jax.tree_util.tree_leaves(per_batch_grads)
  k = leaves[0].shape[0] if leaves else 0
  if k < 2:
    raise UserError(f"gradient collision needs K >= 2 gradients, got K={k}; use more "
                    "sub-batches")
  gram = sum(jnp.einsum("ip,jp->ij", x.reshape(k, -1), x.reshape(k, -1),
                        precision=jax.lax.Precision.HIGHEST) for x in leaves)  # (K, K)
  if similarity == "cosine":
    norms = jnp.sqrt(jnp.diagonal(gram) + eps)
    gram = gram / (norms[:, None] * norms[None, :])
  return (gram.sum() - jnp.trace(gram)) / (k * (k - 1))
