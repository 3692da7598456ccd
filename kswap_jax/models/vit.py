"""Vision Transformer (Linen) with the big_vision / vision_transformer parameter names.

Parameter tree::

  embedding/{kernel (p, p, C, D), bias}     cls (1, 1, D)     pos_embedding (1, N, D)
  Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,value,out},
                              LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}
  Transformer/encoder_norm    [pre_logits/{kernel, bias}]    head/{kernel (D, K), bias (K,)}

Pre-LayerNorm blocks, CLS-token classifier, dropout after the embeddings, after attention and
inside the MLP. GELU, dropout, attention and the patch embedding are the faster equivalents of
the stock ops in `fast_ops`. Defaults follow vision_transformer / big_vision (LayerNorm eps 1e-6,
attention logits scaled by head_dim^-0.5, query/key/value biases, no position embedding on the
class token); `attention_scale`, `layernorm_eps`, `qkv_bias` and `class_posemb` select other
models' choices (e.g. the GS-LoRA face ViT), with `pos_embedding` then (1, 1+N, D).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kswap_jax.errors import UserError
from kswap_jax.models import fast_ops

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


ATTENTION = ("einsum", "cudnn")
GELU = ("exact", "tanh")
ATTENTION_SCALE = ("head", "width")


class Attention(nn.Module):
  """Multi-head self-attention with the `nn.MultiHeadDotProductAttention` parameter layout.

  x (B, T, D) -> (B, T, D); query/key/value kernels (D, N, D/N), out kernel (N, D/N, D).
  impl: "einsum" (`fast_ops.einsum_attention`, every backend) or "cudnn" (the cuDNN flash kernel of
  `jax.nn.dot_product_attention`; NVIDIA GPUs, bfloat16 / float16 only).
  scale: logits q.k times "head" head_dim^-0.5 or "width" D^-0.5.
  qkv_bias: whether query/key/value have biases (the out projection always has one).
  """
  num_heads: int
  impl: str = "einsum"
  dtype: Any = jnp.float32
  scale: str = "head"
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    dense = functools.partial(nn.DenseGeneral, dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform())
    # Projections act on one (B*T, D) token matrix: 2-D matmuls are XLA:CPU's fastest.
    tokens = x.reshape(b * t, d)
    h = d // self.num_heads
    q, k, v = (dense((self.num_heads, h), use_bias=self.qkv_bias, name=n)(tokens).reshape(
        b, t, self.num_heads, h) for n in ("query", "key", "value"))
    if self.scale == "width":  # both kernels divide by sqrt(h): q * sqrt(h / D) makes it sqrt(D)
      q = q * jnp.asarray(math.sqrt(h / d), q.dtype)
    if self.impl == "cudnn":
      out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    else:
      out = fast_ops.einsum_attention(q, k, v)
    out = dense(d, axis=(-2, -1), name="out")(out.reshape(b * t, self.num_heads, -1))
    return out.reshape(b, t, d)


class MlpBlock(nn.Module):
  """Dense_0 (D -> mlp_dim), GELU, dropout, Dense_1 (mlp_dim -> D), dropout; x (B, T, D).

  gelu: "exact" (erf: torchvision, timm, the GS-LoRA face ViT) or "tanh" (the approximation
  `flax.linen.gelu` defaults to, which the vision_transformer / AugReg and big_vision models
  were trained with).
  """
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  gelu: str = "exact"

  @nn.compact
  def __call__(self, x, train: bool):
    b, t, d = x.shape
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(stddev=1e-6))
    y = dense(self.mlp_dim)(x.reshape(b * t, d))  # one (B*T, D) token matrix, as in Attention
    y = fast_ops.gelu(y) if self.gelu == "exact" else jax.nn.gelu(y, approximate=True)
    y = fast_ops.Dropout(self.dropout)(y, deterministic=not train)
    y = dense(d)(y)
    return fast_ops.Dropout(self.dropout)(y, deterministic=not train).reshape(b, t, d)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)); x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention: str = "einsum"
  dtype: Any = jnp.float32
  gelu: str = "exact"
  attention_scale: str = "head"
  layernorm_eps: float = 1e-6
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype)(x)
    y = Attention(self.num_heads, self.attention, self.dtype, self.attention_scale,
                  self.qkv_bias, name="MultiHeadDotProductAttention_0")(y)
    x = x + fast_ops.Dropout(self.dropout)(y, deterministic=not train)
    y = nn.LayerNorm(epsilon=self.layernorm_eps, dtype=self.dtype)(x)
    return x + MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.gelu)(y, train)


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  attention: str = "einsum"
  dtype: Any = jnp.float32
  gelu: str = "exact"
  attention_scale: str = "head"
  layernorm_eps: float = 1e-6
  qkv_bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.depth):
      x = EncoderBlock(self.mlp_dim, self.num_heads, self.dropout, self.attention, self.dtype,
                       self.gelu, self.attention_scale, self.layernorm_eps, self.qkv_bias,
                       name=f"encoderblock_{i}")(x, train)
    return nn.LayerNorm(epsilon=self.layernorm_eps, name="encoder_norm", dtype=self.dtype)(x)


class PatchEmbedding(nn.Module):
  """Non-overlapping p x p patches -> width: (B, H, W, C) -> (B, H/p, W/p, D).

  The `nn.Conv` parameters (kernel (p, p, C, D), bias (D,)) applied by `fast_ops.embed_patches`
  as one matmul, which XLA runs faster than a strided convolution and which vmaps through
  second-order gradients (Gradient Collision members of a sweep).
  """
  width: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p, c = self.patch_size, images.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width))
    bias = self.param("bias", nn.initializers.zeros, (self.width,))
    return fast_ops.embed_patches(images, kernel.astype(self.dtype), bias.astype(self.dtype))


class ViT(nn.Module):
  """ViT classifier: images (B, H, W, C) -> float32 logits (B, num_classes).

  dtype: what activations and matmuls compute in (float32 or bfloat16); parameters are float32
  whatever it is, cast at use. The embedding is cast to float32 and the head computes in float32.

  With `return_embedding=True` returns (logits, embedding (B, D')) where the embedding is the
  pre-logit CLS feature that the head reads. class_posemb: `pos_embedding` (1, 1+N, D) is added
  to the class token too (else (1, N, D), patches only; the same functions either way).
  """
  num_classes: int
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  mlp_dim: int = 3072
  num_heads: int = 12
  dropout: float = 0.0
  representation_size: int | None = None
  attention: str = "einsum"
  dtype: Any = jnp.float32
  gelu: str = "exact"
  attention_scale: str = "head"
  layernorm_eps: float = 1e-6
  qkv_bias: bool = True
  class_posemb: bool = False

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_embedding: bool = False):
    p = self.patch_size
    x = PatchEmbedding(self.width, p, self.dtype, name="embedding")(images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    rows = int(self.class_posemb)
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                     (1, rows + h * w, d)).astype(self.dtype)
    x = x + pos[:, rows:]
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d)).astype(self.dtype)
    if self.class_posemb:
      cls = cls + pos[:, :1]
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x = fast_ops.Dropout(self.dropout)(x, deterministic=not train)
    x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, self.attention,
                self.dtype, self.gelu, self.attention_scale, self.layernorm_eps, self.qkv_bias,
                name="Transformer")(x, train)
    emb = x[:, 0]
    if self.representation_size:
      emb = nn.tanh(nn.Dense(self.representation_size, name="pre_logits", dtype=self.dtype)(emb))
    emb = emb.astype(jnp.float32)  # the head, the losses and argmax see float32
    logits = nn.Dense(self.num_classes, name="head", kernel_init=nn.initializers.zeros,
                      dtype=jnp.float32)(emb)
    return (logits, emb) if return_embedding else logits


def make_model(cfg) -> ViT:
  """Builds the ViT of a `config.model` ConfigDict (variant, num_classes, dropout, ...)."""
  kw = get_variant(cfg.variant)
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(cfg.get("dtype", "float32"))
  if dtype is None:
    raise UserError(f"model.dtype={cfg.dtype!r} is not allowed; use 'float32' or 'bfloat16'")
  if not 0.0 <= cfg.get("dropout", 0.0) < 1.0:
    raise UserError(f"model.dropout={cfg.dropout} must be in [0, 1)")
  attention = cfg.get("attention", "einsum")
  if attention not in ATTENTION:
    raise UserError(f"model.attention={attention!r} is not allowed; use one of {ATTENTION}")
  gelu = cfg.get("gelu", "exact")
  if gelu not in GELU:
    raise UserError(f"model.gelu={gelu!r} is not allowed; use one of {GELU}")
  if attention == "cudnn" and (jax.default_backend() != "gpu" or dtype == jnp.float32):
    raise UserError("model.attention='cudnn' needs an NVIDIA GPU and model.dtype='bfloat16'; "
                    "use 'einsum' elsewhere")
  scale = cfg.get("attention_scale", "head")
  if scale not in ATTENTION_SCALE:
    raise UserError(f"model.attention_scale={scale!r} is not allowed; use one of "
                    f"{ATTENTION_SCALE}")
  eps = cfg.get("layernorm_eps", 1e-6)
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
    raise UserError(f"model.layernorm_eps={eps!r} must be a number in (0, 1), e.g. 1e-6")
  flags = {k: cfg.get(k, default) for k, default in (("qkv_bias", True), ("class_posemb", False))}
  for k, v in flags.items():
    if not isinstance(v, bool):
      raise UserError(f"model.{k}={v!r} must be True or False")
  return ViT(num_classes=cfg.num_classes, dropout=cfg.get("dropout", 0.0),
             representation_size=cfg.get("representation_size") or None, attention=attention,
             dtype=dtype, gelu=gelu, attention_scale=scale, layernorm_eps=float(eps), **flags,
             **kw)


def init_params(model: ViT, rng: jax.Array, image_shape: tuple[int, int, int]):
  """Initial params for images of shape (H, W, C)."""
  if image_shape[0] % model.patch_size or image_shape[1] % model.patch_size:
    raise UserError(f"image size {image_shape[:2]} is not a multiple of the patch size "
                    f"{model.patch_size}; change data.image_size or model.variant")
  return jax.jit(lambda r: model.init(r, jnp.zeros((1, *image_shape)))["params"])(rng)
