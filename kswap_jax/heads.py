"""Classifier heads on the ViT embedding: the model's linear head, or CosFace; head growth.

CosFace reads the head kernel's columns as class centres:
`logits = s * (cos(emb, w_k) - m * [k == y])` in training, plain `s * cos` at evaluation.
GS-LoRA's released face code also applies the margin at evaluation, with the true labels,
which lowers every accuracy it reports; `margin_at_eval=True` reproduces that (quirk, off
by default).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kswap_jax import train
from kswap_jax.errors import UserError

HEADS = ("linear", "cosface")


def grow_head(params, num_new: int, rng: jax.Array):
  """Appends `num_new` head outputs: kernel columns xavier-uniform, bias zero."""
  kernel, bias = params["head"]["kernel"], params["head"]["bias"]
  new = jax.nn.initializers.xavier_uniform()(rng, (kernel.shape[0], num_new), kernel.dtype)
  head = {"kernel": jnp.concatenate([kernel, new], 1),
          "bias": jnp.concatenate([bias, jnp.zeros((num_new,), bias.dtype)])}
  return {**params, "head": head}


def reset_head(params, num_classes: int, rng: jax.Array):
  """Params with a new head for `num_classes`: kernel (D, num_classes) xavier-uniform, bias 0."""
  head = jax.tree_util.tree_map(lambda x: x[..., :0], params["head"])  # no outputs yet
  return grow_head({**params, "head": head}, num_classes, rng)


def head_logits(embedding: jax.Array, head) -> jax.Array:
  """(B, D) embedding through a {"kernel": (D, K), "bias": (K,)} head -> (B, K) float32."""
  return (embedding @ head["kernel"] + head["bias"]).astype(jnp.float32)


def cosface(emb: jax.Array, kernel: jax.Array, labels: jax.Array | None, *, scale: float,
            margin: float, eps: float = 1e-12) -> jax.Array:
  """CosFace logits: emb (B, D), kernel (D, K), labels (B,) or None -> (B, K)."""
  e = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), eps)
  w = kernel / jnp.maximum(jnp.linalg.norm(kernel, axis=0, keepdims=True), eps)
  cos = e @ w.astype(e.dtype)
  if labels is None:
    return scale * cos
  return scale * (cos - margin * jax.nn.one_hot(labels, kernel.shape[-1], dtype=cos.dtype))


@dataclasses.dataclass(frozen=True)
class HeadNetwork:
  """A `train.Network` whose logits come from the chosen head (same `apply` contract).

  apply(..., labels=y) lets a margin head see the true labels; the linear head ignores them.
  """
  base: train.Network
  kind: str = "linear"
  scale: float = 64.0
  margin: float = 0.35

  def __post_init__(self):
    if self.kind not in HEADS:
      raise UserError(f"head.kind={self.kind!r} is not allowed; use one of {HEADS}")

  @property
  def lora_scale(self) -> float:
    return self.base.lora_scale

  def apply(self, params, lora, images, *, labels=None, train: bool = False, rng=None,
            return_embedding: bool = False):
    """uint8 images (B, H, W, C) -> logits (B, K) [, embedding (B, D)]."""
    logits, emb = self.base.apply(params, lora, images, train=train, rng=rng,
                                  return_embedding=True)
    if self.kind == "cosface":
      logits = cosface(emb, params["head"]["kernel"], labels, scale=self.scale,
                       margin=self.margin)
    return (logits, emb) if return_embedding else logits
