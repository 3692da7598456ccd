"""ViT backbones with a detection or a segmentation decoder (Linen), for the dense swaps.

Both keep the ViT's parameter names for the backbone (`embedding`, `pos_embedding`,
`Transformer/encoderblock_{i}/...`; no class token), so LoRA targets, the group-sparse
penalty and `.npz` loading treat the backbone as they treat the classifier's. Their decoder
blocks are `decoderblock_{i}` with an `MlpBlock_0` FFN (`Dense_0`, `Dense_1`), the layers
`DENSE_FFN_TARGETS` adapts, and their class scores are the columns of `head` (D, K) with a
separate `noobj_head` (D, 1) for "no object" / background, so `heads.grow_head` adds classes.

Detector (DETR-style; Carion et al. 2020, with DINO's query selection made dense): one
object query per backbone token, starting from the token's feature with the token's cell as
its reference box (ours: DINO selects the top 900 encoder proposals; every token is a query
here, which makes the tiny model converge in minutes where DETR's learned queries do not);
each decoder block is self-attention over the queries, cross-attention to the backbone tokens
(plus their position embedding), and an FFN, all pre-LayerNorm; the box head predicts a
correction of the reference box's logits (Deformable DETR / DINO's box refinement). Queries
that Hungarian matching leaves unmatched learn "no object".

Segmenter (ours: a per-pixel decoder, not Mask2Former's mask classification): a residual
FFN block (the decoder's LoRA target) refines the backbone tokens, each token's feature is
projected to its p x p pixels (pixel shuffle back to the image resolution), and `head` /
`noobj_head` classify each pixel: logits (B, H, W, K + 1), the last one background.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kswap_jax.errors import UserError
from kswap_jax.models import fast_ops, vit

TASKS = ("detection", "segmentation")
# LoRA on the FFN layers of backbone and decoder: the authors' `--lora_pos FFN`
# (KnowledgeSwapping object-detection/models/dino/swin_transformer.py:188 and
# deformable_transformer.py:474; semantic-segmentation/swapping_lfl.py:132-159 groups the
# backbone, pixel-decoder and predictor FFN LoRAs).
DENSE_FFN_TARGETS = r"(Transformer/encoderblock_\d+|decoderblock_\d+)/MlpBlock_0/Dense_[01]"


class DecoderBlock(nn.Module):
  """Pre-LN decoder block: queries (B, Q, D) attend to themselves, then to `memory`
  (B, N, D) (when given), then an FFN (`vit.MlpBlock`, the LoRA target)."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, q, memory, memory_pos, train: bool):
    attn = functools.partial(nn.MultiHeadDotProductAttention, num_heads=self.num_heads,
                             dtype=self.dtype, deterministic=True)
    if memory is not None:
      y = nn.LayerNorm(dtype=self.dtype)(q)
      q = q + attn(name="SelfAttention_0")(y, y)
      y = nn.LayerNorm(dtype=self.dtype)(q)
      q = q + attn(name="CrossAttention_0")(y, memory + memory_pos, memory)
    y = nn.LayerNorm(dtype=self.dtype)(q)
    return q + vit.MlpBlock(self.mlp_dim, self.dropout, self.dtype)(y, train)


REFERENCE_SIDE = 0.4  # ours: a query's reference box before refinement, side / image side


class _Dense(nn.Module):
  """Shared fields and the ViT backbone of both dense models."""
  num_classes: int
  patch_size: int = 4
  width: int = 64
  depth: int = 4
  mlp_dim: int = 128
  num_heads: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32
  decoder_depth: int = 1

  def encode(self, images, train: bool):
    """(B, H, W, C) -> tokens (B, N, D) after the encoder, grid (h, w), pos (1, N, D)."""
    x = vit.PatchEmbedding(self.width, self.patch_size, self.dtype,
                           name="embedding")(images.astype(self.dtype))
    b, h, w, d = x.shape
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, h * w, d)).astype(self.dtype)
    x = x.reshape(b, h * w, d) + pos
    x = fast_ops.Dropout(self.dropout)(x, deterministic=not train)
    x = vit.Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, dtype=self.dtype,
                    name="Transformer")(x, train)
    return x, (h, w), pos

  def classify(self, feats):
    """(..., D) features -> float32 logits (..., K + 1): `head` columns, then `noobj_head`."""
    feats = feats.astype(jnp.float32)
    dense = functools.partial(nn.Dense, dtype=jnp.float32, kernel_init=nn.initializers.zeros)
    return jnp.concatenate([dense(self.num_classes, name="head")(feats),
                            dense(1, name="noobj_head")(feats)], -1)


class Detector(_Dense):
  """images (B, H, W, C) -> {"logits": (B, N, K + 1), "boxes": (B, N, 4) cxcywh in [0, 1]},
  one query per backbone token (N = H/p * W/p)."""

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_embedding: bool = False):
    del return_embedding  # the classifier's option; a detector has no single embedding
    memory, (h, w), pos = self.encode(images, train)
    ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing="ij")
    ref = jnp.stack([xs.ravel(), ys.ravel(), *(jnp.full(h * w, REFERENCE_SIDE),) * 2], -1)
    ref = jnp.log(ref / (1 - ref))  # (N, 4) reference boxes, logits
    q = memory
    for i in range(self.decoder_depth):
      q = DecoderBlock(self.mlp_dim, self.num_heads, self.dropout, self.dtype,
                       name=f"decoderblock_{i}")(q, memory, pos, train)
    q = nn.LayerNorm(dtype=self.dtype, name="decoder_norm")(q)
    delta = q.astype(jnp.float32)
    for j in range(2):
      delta = nn.relu(nn.Dense(self.width, name=f"box_{j}")(delta))
    delta = nn.Dense(4, name="box_2", kernel_init=nn.initializers.zeros)(delta)
    return {"logits": self.classify(q), "boxes": jax.nn.sigmoid(ref + delta)}


class Segmenter(_Dense):
  """images (B, H, W, C) -> per-pixel logits (B, H, W, K + 1), the last one background."""
  pixel_dim: int = 32

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_embedding: bool = False):
    del return_embedding
    x, (h, w), _ = self.encode(images, train)
    for i in range(self.decoder_depth):
      x = DecoderBlock(self.mlp_dim, self.num_heads, self.dropout, self.dtype,
                       name=f"decoderblock_{i}")(x, None, None, train)
    p, e = self.patch_size, self.pixel_dim
    x = nn.Dense(p * p * e, dtype=self.dtype, name="pixel_embed")(x)
    x = x.reshape(-1, h, w, p, p, e).transpose(0, 1, 3, 2, 4, 5).reshape(-1, h * p * w * p, e)
    x = nn.LayerNorm(dtype=self.dtype, name="decoder_norm")(x)
    return self.classify(x).reshape(images.shape[0], h * p, w * p, -1)


def make_model(cfg) -> nn.Module:
  """The dense model of a `config.model` with `task` "detection" or "segmentation" (variant
  as for the ViT, e.g. "Mu/4"; num_classes; decoder_depth; pixel_dim)."""
  if cfg.task not in TASKS:
    raise UserError(f"model.task={cfg.task!r} is not allowed; use one of {TASKS} (or leave it "
                    "out for a classifier)")
  kw = vit.get_variant(cfg.variant)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(cfg.get("dtype", "float32"))
  if dtype is None:
    raise UserError(f"model.dtype={cfg.dtype!r} is not allowed; use 'float32' or 'bfloat16'")
  common = dict(num_classes=cfg.num_classes, dropout=cfg.get("dropout", 0.0), dtype=dtype,
                decoder_depth=cfg.get("decoder_depth", 1), **kw)
  if cfg.task == "detection":
    return Detector(**common)
  return Segmenter(pixel_dim=cfg.get("pixel_dim", 32), **common)
