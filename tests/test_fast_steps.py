"""The fast ViT pieces compute what a straightforward Flax ViT computes."""
import dataclasses
import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kswap_jax import heads, train
from kswap_jax import lora as lora_lib
from kswap_jax.data import pipeline
from kswap_jax.errors import UserError
from kswap_jax.methods import forget
from kswap_jax.models import fast_ops, vit


class _RefBlock(nn.Module):
  """Pre-LN block from stock Flax layers: MultiHeadDotProductAttention, erfc GELU, Dropout."""
  mlp_dim: int
  num_heads: int
  dropout: float

  @nn.compact
  def __call__(self, x, train):
    y = nn.LayerNorm(epsilon=1e-6)(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(y, y, deterministic=True)
    x = x + nn.Dropout(self.dropout)(y, deterministic=not train)
    y = nn.LayerNorm(epsilon=1e-6)(x)
    return x + _RefMlp(self.mlp_dim, self.dropout, name="MlpBlock_0")(y, train)


class _RefMlp(nn.Module):
  mlp_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x, train):
    y = nn.gelu(nn.Dense(self.mlp_dim)(x), approximate=False)
    y = nn.Dense(x.shape[-1])(nn.Dropout(self.dropout)(y, deterministic=not train))
    return nn.Dropout(self.dropout)(y, deterministic=not train)


class _RefViT(nn.Module):
  """The same parameter tree as `vit.ViT`, built the obvious way (3-D Dense, Flax attention)."""
  num_classes: int
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, images, *, train=False, return_embedding=False):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), name="embedding")(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d) + self.param("pos_embedding", nn.initializers.zeros,
                                            (1, h * w, d))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    x = _RefEncoder(self.depth, self.mlp_dim, self.num_heads, self.dropout,
                    name="Transformer")(x, train)
    emb = x[:, 0]
    logits = nn.Dense(self.num_classes, name="head")(emb)
    return (logits, emb) if return_embedding else logits


class _RefEncoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float

  @nn.compact
  def __call__(self, x, train):
    for i in range(self.depth):
      x = _RefBlock(self.mlp_dim, self.num_heads, self.dropout,
                    name=f"encoderblock_{i}")(x, train)
    return nn.LayerNorm(epsilon=1e-6, name="encoder_norm")(x)


@dataclasses.dataclass(frozen=True)
class _RefNetwork(train.Network):
  """`train.Network` with each LoRA layer computing layer(x) + scale (x A) B as written."""

  def apply(self, params, lora, images, *, train=False, rng=None, return_embedding=False):
    by_path = {tuple(p.split("/")): ab for p, ab in lora_lib.layers(lora).items()}

    def interceptor(next_fun, fargs, fkwargs, context):
      y = next_fun(*fargs, **fkwargs)
      ab = by_path.get(tuple(context.module.path))
      if ab is None or context.method_name != "__call__":
        return y
      x = fargs[0].reshape(-1, ab["A"].shape[0])
      return y + (self.lora_scale * (x @ ab["A"]) @ ab["B"]).reshape(y.shape)

    with nn.intercept_methods(interceptor):
      return self.model.apply({"params": params}, pipeline.normalize(images, self.mean, self.std),
                              train=train, rngs={"dropout": rng} if train else None,
                              return_embedding=return_embedding)


def _randomised(params, key):
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return tree.unflatten([x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _nets(dropout=0.0, head="cosface"):
  kw = vit.get_variant("Nano/4")
  fast = vit.ViT(num_classes=6, dropout=dropout, **kw)
  ref = _RefViT(num_classes=6, dropout=dropout, **kw)
  params = _randomised(vit.init_params(fast, jax.random.key(0), (16, 16, 3)), jax.random.key(1))
  return [heads.HeadNetwork(train.Network(fast, lora_scale=0.5), head),
          heads.HeadNetwork(_RefNetwork(ref, lora_scale=0.5), head)], params


def _batches(key, n=4):
  out = {}
  for name, k in zip(("retain", "forget"), jax.random.split(key)):
    a, b = jax.random.split(k)
    out[name] = {"images": jax.random.randint(a, (n, 16, 16, 3), 0, 256).astype(jnp.uint8),
                 "labels": jax.random.randint(b, (n,), 0, 6)}
  return {**out, "ctx": {"stage_step": jnp.asarray(5, jnp.int32),
                         "stage": {"alpha_warmup": jnp.asarray(0, jnp.int32)}}}


def test_reference_has_the_same_parameter_tree():
  (fast, ref), params = _nets()
  ref_params = ref.base.model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  assert jax.tree.structure(ref_params) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, ref_params) == jax.tree.map(jnp.shape, params)


@pytest.mark.parametrize("head", ["linear", "cosface"])
def test_gs_lora_update_equals_the_straightforward_one(head):
  """Same loss, metrics, LoRA and optimizer state after 3 updates (dropout 0, train mode)."""
  (fast, ref), params = _nets(head=head)
  lora = jax.tree.map(lambda t: t + 0.05, lora_lib.init(jax.random.key(2), params, rank=4))
  tx = train.make_optimizer()
  hp = {"lr": 1e-2, "weight_decay": 0.05, "beta": 0.2, "bound": 500.0, "alpha": 1e-2,
        "proto_bound": 0.0, "w_f": 0.0, "w_r": 0.0}
  method = forget.get_method("gs_lora")
  out = []
  for net in (fast, ref):
    state = train.init_state(params, lora, "", hp, 0, tx)
    step = jax.jit(train.make_step(forget.make_loss(method, net, "block"), tx,
                                   lambda s: 1.0))
    for i in range(3):
      state, metrics = step(state, _batches(jax.random.key(10 + i)))
    out.append((state["trainable"], state["opt"], metrics))
  (t_fast, o_fast, m_fast), (t_ref, o_ref, m_ref) = out
  assert float(m_ref["forget"]) > 0  # the bounded forget term is active
  for a, b in zip(jax.tree.leaves((t_fast, m_fast)), jax.tree.leaves((t_ref, m_ref))):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  for a, b in zip(jax.tree.leaves(o_fast), jax.tree.leaves(o_ref)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)


def test_einsum_attention_matches_jax_attention_and_its_gradient():
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 7, 3, 5))
  np.testing.assert_allclose(fast_ops.einsum_attention(q, k, v),
                             jax.nn.dot_product_attention(q, k, v), atol=1e-5)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
  got = jax.grad(loss(fast_ops.einsum_attention), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_gelu_and_its_derivative_match_the_erfc_gelu():
  x = jnp.linspace(-9.0, 9.0, 2001)
  want = functools.partial(jax.nn.gelu, approximate=False)
  np.testing.assert_allclose(fast_ops.gelu(x), want(x), atol=2e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(fast_ops.gelu))(x), jax.vmap(jax.grad(want))(x),
                             atol=2e-6)


def test_dropout_rate_scale_and_determinism():
  x = jnp.ones((400, 500))
  drop = fast_ops.Dropout(0.1)
  out = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  zero = np.asarray(out == 0)
  n = zero.size
  assert abs(zero.mean() - 0.1) < 4 * np.sqrt(0.1 * 0.9 / n)
  np.testing.assert_allclose(np.asarray(out)[~zero], 1 / 0.9, rtol=1e-6)
  assert abs(zero[:200].mean() - zero[200:].mean()) < 8 * np.sqrt(0.09 / (n / 2))  # no stripes
  again = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(out, again)
  other = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
  assert np.mean(np.asarray(other == 0) != zero) > 0.1
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  odd = drop.apply({}, jnp.ones((3, 7)), deterministic=False, rngs={"dropout": jax.random.key(0)})
  assert odd.shape == (3, 7)


def test_threefry2x32_equals_the_jax_primitive():
  from jax.extend.random import threefry2x32_p  # pylint: disable=g-import-not-at-top
  key = jax.random.bits(jax.random.key(7), (2,), jnp.uint32)
  x0, x1 = (jax.random.bits(k, (1001,), jnp.uint32) for k in jax.random.split(jax.random.key(8)))
  for got, want in zip(fast_ops.threefry2x32(key, x0, x1),
                       threefry2x32_p.bind(key[0], key[1], x0, x1)):
    np.testing.assert_array_equal(got, want)


def test_dropout_masks_of_vmapped_keys_equal_single_ones():
  drop = lambda key, x: fast_ops.Dropout(0.1).apply({}, x, deterministic=False,
                                                    rngs={"dropout": key})
  keys = jax.random.split(jax.random.key(0), 3)
  stacked = jax.vmap(drop)(keys, jnp.ones((3, 20, 9)))
  for key, got in zip(keys, stacked):
    np.testing.assert_array_equal(got, drop(key, jnp.ones((20, 9))))
  assert not np.array_equal(stacked[0], stacked[1])


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_dropout_in_training_steps_with_each_key_implementation(impl):
  (fast, _), params = _nets(dropout=0.3, head="linear")
  tx = train.make_optimizer()
  hp = {"lr": 1e-2, "weight_decay": 0.0}
  loss = lambda t, f, h, b, rng: (optax.softmax_cross_entropy_with_integer_labels(
      fast.apply(f, t["lora"], b["images"], train=True, rng=rng), b["labels"]).mean(), {})
  step = jax.jit(train.make_step(loss, tx, lambda s: 1.0, impl))
  state = train.init_state(params, lora_lib.init(jax.random.key(2), params, rank=2), "", hp, 0,
                           tx, impl)
  batch = _batches(jax.random.key(5))["retain"]
  s1, m1 = step(state, batch)
  s2, m2 = step(s1, batch)
  assert np.isfinite(float(m1["loss"])) and float(m1["loss"]) != float(m2["loss"])
  s1b, m1b = step(state, batch)
  assert float(m1b["loss"]) == float(m1["loss"])  # a step's masks depend on its key only


def test_cudnn_attention_is_refused_off_gpu():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(variant="Nano/4", num_classes=3, attention="cudnn",
                                       dtype="bfloat16"))
  if jax.default_backend() != "gpu":
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
      vit.make_model(cfg)
  cfg.attention = "flash"
  with pytest.raises(UserError, match="model.attention='flash' is not allowed"):
    vit.make_model(cfg)
  cfg.update(attention="einsum", dropout=1.0)
  with pytest.raises(UserError, match=r"model.dropout=1.0 must be in \[0, 1\)"):
    vit.make_model(cfg)


def test_bfloat16_compute_keeps_float32_lora_gradients():
  """model.dtype="bfloat16": LoRA gradients stay float32 and near the float32 model's."""
  kw = vit.get_variant("Nano/4")
  params = _randomised(vit.init_params(vit.ViT(num_classes=6, **kw), jax.random.key(0),
                                       (16, 16, 3)), jax.random.key(1))
  lora = jax.tree.map(lambda t: t + 0.05, lora_lib.init(jax.random.key(2), params, rank=4))
  batch = _batches(jax.random.key(3))["retain"]
  grads = []
  for dtype in (jnp.float32, jnp.bfloat16):
    net = train.Network(vit.ViT(num_classes=6, dtype=dtype, **kw), lora_scale=0.5)
    ce = lambda lo: optax.softmax_cross_entropy_with_integer_labels(
        net.apply(params, lo, batch["images"]), batch["labels"]).mean()
    grads.append(jax.jit(jax.grad(ce))(lora))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads[1]))
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0]))
  for full, half in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(half, full, atol=0.03 * scale)


_FAULTS_SCRIPT = """
import resource, statistics, sys
from kswap_jax import host_memory
if sys.argv[1] == "retain":
  assert host_memory.retain_freed_memory()
import jax, jax.numpy as jnp
x, w2 = jnp.ones((8192, 256)) / 16, jnp.ones((2048, 8)) / 45
grad = jax.jit(jax.grad(lambda w1: (jax.nn.gelu(x @ w1) @ w2).sum())).lower(
    jnp.ones((256, 2048))).compile()
faults = []
for i in range(16):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(grad(jnp.ones((256, 2048)) / 16))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
pages = grad.memory_analysis().temp_size_in_bytes // resource.getpagesize()
print(pages, statistics.median(faults[4:]))  # the heap has grown to fit after 4 calls
"""


def _temp_pages_and_median_faults(mode):
  # The step compiled as a run compiles it (not with the suite's quick compilation, conftest):
  # its 16 calls of a 136 MiB step cost less optimised than the compile saves.
  env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
  out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], check=True,
                       capture_output=True, text=True, env=env).stdout.split()
  return int(out[0]), float(out[1])


def test_retained_host_memory_stops_page_faults_in_repeated_steps():
  """A gradient step with a 136 MiB temp buffer: glibc's defaults map it afresh and unmap it
  on every call; retained, the typical call reuses heap pages (a call may still grow the heap
  when a small block has landed in the freed buffer, hence the median)."""
  pages, faults = _temp_pages_and_median_faults("default")
  assert pages >= 8192 and faults >= pages
  pages, faults = _temp_pages_and_median_faults("retain")
  assert faults < pages // 100
