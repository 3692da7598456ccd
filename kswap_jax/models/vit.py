"""Vision Transformer (Linen) with the big_vision / vision_transformer parameter names.

Parameter tree::

  embedding/{kernel (p, p, C, D), bias}     cls (1, 1, D)     pos_embedding (1, N, D)
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                              LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}
  Transformer/encoder_norm    [pre_logits/{kernel, bias}]    head/{kernel (D, K), bias (K,)}

Pre-LayerNorm blocks (eps 1e-6), CLS-token classifier, dropout after the embeddings, after
attention and inside the MLP.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kswap_jax.errors import UserError

# name: (width, depth, mlp_dim, heads)
_WIDTHS = {
    "Mu": (64, 4, 128, 4),       # tiny: trains in seconds on 8x8 images
    "Nano": (32, 2, 64, 2),      # tests
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "F6": (512, 6, 2048, 8),     # GS-LoRA face-recognition ViT
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def get_variant(name: str) -> dict[str, Any]:
  """`"B/16"` -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)."""
  m = re.fullmatch(r"([A-Za-z0-9]+)/(\d+)", name)
  if not m or m.group(1) not in _WIDTHS:
    raise UserError(f"unknown ViT variant {name!r}; allowed: <size>/<patch> with size in "
                    f"{sorted(_WIDTHS)}, e.g. 'B/16' or 'Mu/2'")
  width, depth, mlp_dim, heads = _WIDTHS[m.group(1)]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
              patch_size=int(m.group(2)))


def dot_product_attention(query, key, value, bias=None, mask=None, dropout_rate=0.0,
                          deterministic=True, dtype=None, **_):
  """Attention for `nn.MultiHeadDotProductAttention` via `jax.nn.dot_product_attention`.

  q, k, v: (B, T, H, D/H) -> (B, T, H, D/H). No dropout on attention weights (rate 0 in ViT).
  """
  if dropout_rate and not deterministic:
    raise NotImplementedError("attention-weight dropout is not supported")
  del dtype
  return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask)


class MlpBlock(nn.Module):
  """Dense_0 (D -> mlp_dim), GELU, dropout, Dense_1 (mlp_dim -> D), dropout."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    d = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(stddev=1e-6))
    x = dense(self.mlp_dim)(x)
    x = nn.gelu(x, approximate=False)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = dense(d)(x)
    return nn.Dropout(self.dropout)(x, deterministic=not train)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        attention_fn=dot_product_attention)(y, y, deterministic=True)
    x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    return x + MlpBlock(self.mlp_dim, self.dropout, self.dtype)(y, train)


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.depth):
      x = EncoderBlock(self.mlp_dim, self.num_heads, self.dropout, self.dtype,
                       name=f"encoderblock_{i}")(x, train)
    return nn.LayerNorm(epsilon=1e-6, name="encoder_norm", dtype=self.dtype)(x)


class ViT(nn.Module):
  """ViT classifier: images (B, H, W, C) -> logits (B, num_classes).

  With `return_embedding=True` returns (logits, embedding (B, D')) where the embedding is the
  pre-logit CLS feature that the head reads.
  """
  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  dropout: float = 0.0
  representation_size: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_embedding: bool = False):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", name="embedding",
                dtype=self.dtype)(images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, h * w, d))
    x = x + pos.astype(self.dtype)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (b, 1, 1)), x], axis=1)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, self.dtype,
                name="Transformer")(x, train)
    emb = x[:, 0]
    if self.representation_size:
      emb = nn.tanh(nn.Dense(self.representation_size, name="pre_logits", dtype=self.dtype)(emb))
    logits = nn.Dense(self.num_classes, name="head", kernel_init=nn.initializers.zeros,
                      dtype=self.dtype)(emb).astype(jnp.float32)
    return (logits, emb.astype(jnp.float32)) if return_embedding else logits


def make_model(cfg) -> ViT:
  """Builds the ViT of a `config.model` ConfigDict (variant, num_classes, dropout, ...)."""
  kw = get_variant(cfg.variant)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(cfg.get("dtype", "float32"))
  if dtype is None:
    raise UserError(f"model.dtype={cfg.dtype!r} is not allowed; use 'float32' or 'bfloat16'")
  return ViT(num_classes=cfg.num_classes, dropout=cfg.get("dropout", 0.0),
             representation_size=cfg.get("representation_size") or None, dtype=dtype, **kw)


def init_params(model: ViT, rng: jax.Array, image_shape: tuple[int, int, int]):
  """Initial params for images of shape (H, W, C)."""
  if image_shape[0] % model.patch_size or image_shape[1] % model.patch_size:
    raise UserError(f"image size {image_shape[:2]} is not a multiple of the patch size "
                    f"{model.patch_size}; change data.image_size or model.variant")
  return jax.jit(lambda r: model.init(r, jnp.zeros((1, *image_shape)))["params"])(rng)
