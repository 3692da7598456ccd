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
  """Mean softmax cross-entropy: logits (B, K), int labels (B,) -> scalar."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def bounded_forget(logits: jax.Array, labels: jax.Array, bound) -> jax.Array:
  """relu(bound - CE): ascends the forget batch's CE until it reaches `bound`, then 0.

  logits (B, K), int labels (B,), bound scalar -> scalar."""
  return jax.nn.relu(bound - cross_entropy(logits, labels))


def group_key(path: str, group: str) -> str:
  """Group of a LoRA leaf "Transformer/encoderblock_3/MlpBlock_0/Dense_0/A".

  block -> "encoderblock_3" (a dense model's "decoderblock_0" likewise); layer ->
  ".../Dense_0"; matrix -> the leaf path itself.
  """
  if group == "block":
    m = re.search(r"(?:en|de)coderblock_\d+", path)
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


def gram_matrix(per_batch_grads) -> jax.Array:
  """(K, K) inner products <g_i, g_j> of a pytree whose leaves have a leading axis K;
  each g_k is the concatenation of its flattened leaves. Raises UserError unless K >= 2."""
  leaves = jax.tree_util.tree_leaves(per_batch_grads)
  k = leaves[0].shape[0] if leaves else 0
  if k < 2:
    raise UserError(f"gradient collision needs K >= 2 gradients, got K={k}; use more "
                    "sub-batches")
  return sum(jnp.einsum("ip,jp->ij", x.reshape(k, -1), x.reshape(k, -1),
                        precision=jax.lax.Precision.HIGHEST) for x in leaves)


def check_similarity(similarity: str) -> None:
  """Raises UserError unless `similarity` is one of SIMILARITIES."""
  if similarity not in SIMILARITIES:
    raise UserError(f"gc similarity {similarity!r} is not allowed; use one of {SIMILARITIES}")


def collision_from_gram(gram: jax.Array, similarity: str = "cosine",
                        eps: float = 1e-12) -> jax.Array:
  """GC = mean_{i != j} sim(g_i, g_j) of a (K, K) Gram matrix -> scalar."""
  check_similarity(similarity)
  k = gram.shape[0]
  if similarity == "cosine":
    norms = jnp.sqrt(jnp.diagonal(gram) + eps)
    gram = gram / (norms[:, None] * norms[None, :])
  return (gram.sum() - jnp.trace(gram)) / (k * (k - 1))


def collision_weights(gram: jax.Array, similarity: str = "cosine",
                      eps: float = 1e-12) -> jax.Array:
  """(K, K) W with dGC/dg_k = sum_j W[k, j] g_j, in closed form from the Gram matrix.

  dot: W = 2 (1 - I) / (K (K-1)). cosine, with n_k = sqrt(|g_k|^2 + eps) and
  C = <g_i, g_j> / (n_i n_j): W[k, j] = 2 / (K (K-1)) * (1 / (n_k n_j) for j != k,
  -sum_{l != k} C[k, l] / n_k^2 for j = k).
  """
  check_similarity(similarity)
  k = gram.shape[0]
  off = 1.0 - jnp.eye(k, dtype=gram.dtype)
  if similarity == "dot":
    return 2.0 * off / (k * (k - 1))
  inv = 1.0 / jnp.sqrt(jnp.diagonal(gram) + eps)
  outer = inv[:, None] * inv[None, :]
  row = (gram * outer * off).sum(1) * inv**2  # sum_{l != k} C[k, l] / n_k^2
  return 2.0 * (outer * off - jnp.diag(row)) / (k * (k - 1))


def gradient_collision(per_batch_grads, similarity: str = "cosine",
                       eps: float = 1e-12) -> jax.Array:
  """Mean pairwise similarity of K gradients: GC = mean_{i != j} sim(g_i, g_j).

  per_batch_grads: a pytree whose leaves have a leading axis K >= 2 (one gradient per source
    sub-batch); each g_k is the concatenation of its flattened leaves.
  similarity: "cosine" -> <g_i, g_j> / (|g_i| |g_j|) (|g|^2 gets `eps` added);
    "dot" -> <g_i, g_j>.
  Returns a scalar: lower means the K gradients point in more different directions.
  """
  check_similarity(similarity)
  return collision_from_gram(gram_matrix(per_batch_grads), similarity, eps)
