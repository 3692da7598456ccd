"""CPU speed devices of the ViT: each computes what a stock Flax/JAX op computes, faster.

`gelu` is `nn.gelu(approximate=False)`, `threefry2x32` JAX's threefry2x32 hash, `Dropout`
`nn.Dropout` (masks of the same distribution, not the same bits), `einsum_attention`
`jax.nn.dot_product_attention` and `embed_patches` a stride-p `nn.Conv`;
`tests/test_fast_steps.py` checks this, gradients included.
"""
from __future__ import annotations

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _gelu_cdf(x):
  return 0.5 * (1 + jax.lax.erf(x * np.asarray(1 / np.sqrt(2), x.dtype)))


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU x * Phi(x), any shape (`nn.gelu(x, approximate=False)`).

  Derivative Phi(x) + x phi(x) given directly: about 3x less elementwise work than autodiff of erf.
  """
  return x * _gelu_cdf(x)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  cdf = _gelu_cdf(x)
  pdf = jnp.exp(-0.5 * x * x) * np.asarray(1 / np.sqrt(2 * np.pi), x.dtype)
  return x * cdf, (cdf + x * pdf) * t


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds (the hash of JAX's default PRNG): key uint32 (2,), counter
  words x0, x1 uint32 (n,) -> two uint32 (n,) words.

  Unrolled so XLA fuses it; JAX's own is a loop on CPU, about 6x slower for dropout-sized draws.
  """
  ks = (key[0], key[1], key[0] ^ key[1] ^ np.uint32(0x1BD11BDA))
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for i in range(5):
    for r in _ROTATIONS[i % 2]:
      x0 = x0 + x1
      x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
    x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x0, x1


class Dropout(nn.Module):
  """Inverted dropout: zero each entry with probability `rate`, scale the rest by 1/(1-rate).

  Each entry compares its own 16-bit uniform draw to round(rate * 2^16) (the rate is exact to
  1/65536): `threefry2x32` keyed by two words of the "dropout" rng hashes n/4 counters into
  n/2 words, whose low halves serve the first n/2 entries and high halves the rest.

  Half the random bits of `nn.Dropout`'s float draws, and it works with any key implementation.
  """
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    key = jax.random.bits(self.make_rng("dropout"), (2,), jnp.uint32)
    counters = jax.lax.iota(jnp.uint32, -(-x.size // 4))
    words = jnp.concatenate(threefry2x32(key, jnp.zeros_like(counters), counters))
    # Materialised once: fused into the mask, XLA would hash again for every entry.
    words = jax.lax.optimization_barrier(words)
    draws = jnp.concatenate([words & 0xFFFF, words >> 16])[: x.size].reshape(x.shape)
    keep = draws >= np.uint32(round(self.rate * 65536))
    return jnp.where(keep, x / jnp.asarray(1 - self.rate, x.dtype), jnp.zeros_like(x))


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention with batch and heads folded into one axis: (B, T, N, H) -> (B, T, N, H).

  Every product is one (B*N)-batched matmul with a leading batch axis.
  On XLA:CPU about 3x faster than the (B, T, N, H) einsums of `jax.nn.dot_product_attention`.
  """
  b, t, n, h = q.shape
  fold = lambda x: einops.rearrange(x, "b t n h -> (b n) t h")
  q = fold(q) * jnp.asarray(1 / np.sqrt(h), q.dtype)
  logits = jnp.einsum("xth,xsh->xts", q, fold(k), preferred_element_type=jnp.float32)
  # Softmax with the normalisation applied to the (T, H) output, not the (T, T) weights.
  shifted = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
  out = jnp.einsum("xts,xsh->xth", shifted.astype(v.dtype), fold(v))
  out = out / shifted.sum(-1, keepdims=True).astype(out.dtype)
  return einops.rearrange(out, "(b n) t h -> b t n h", b=b, n=n)


def embed_patches(images: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """`nn.Conv` with stride p over non-overlapping p x p patches: images (B, H, W, C), kernel
  (p, p, C, D), bias (D,) -> (B, H/p, W/p, D).

  One matmul: XLA runs it faster than a strided conv, and it vmaps through second-order gradients.
  """
  p, d = kernel.shape[0], kernel.shape[-1]
  patches = einops.rearrange(images, "b (h p) (w q) c -> b h w (p q c)", p=p, q=p)
  return patches @ kernel.reshape(-1, d) + bias
