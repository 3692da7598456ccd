"""Mixed precision: model.dtype="bfloat16" computes in bfloat16 around float32 parameters."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import ml_collections
import numpy as np
import pytest

from kswap_jax import config_lib, losses, runner, train, trees
from kswap_jax import lora as lora_lib
from kswap_jax.methods import dispose
from kswap_jax.models import vit

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _net(dtype: str) -> train.Network:
  cfg = ml_collections.ConfigDict(dict(variant="Mu/2", num_classes=10, dropout=0.0,
                                       dtype=dtype))
  return train.Network(vit.make_model(cfg))


def _setup(finetune: str):
  """(params, state, batch): Mu/2 on 8x8 grey images, a non-zero head, batch of 64."""
  params = vit.init_params(_net("float32").model, jax.random.key(0), (8, 8, 1))
  params["head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(5),
                                                     params["head"]["kernel"].shape)
  lora = None
  if finetune == "lora":
    lora = lora_lib.init(jax.random.key(3), params, rank=4)
    lora = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(
        jax.random.key(4), x.shape), lora)  # B != 0: the LoRA changes the model
  state = train.init_state(params, lora, "head/.*" if lora else ".*",
                           {"lr": 1e-3, "weight_decay": 0.05}, 0, train.make_optimizer())
  a, b = jax.random.split(jax.random.key(1))
  batch = {"images": jax.random.randint(a, (64, 8, 8, 1), 0, 256).astype(jnp.uint8),
           "labels": jax.random.randint(b, (64,), 0, 10)}
  return params, state, batch


def _cosine(a, b) -> float:
  return float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _ce_loss(net):
  def loss_fn(trainable, frozen, hp, batch, rng):
    del hp, rng
    logits = net.apply(trees.combine(frozen, trainable["params"]), trainable["lora"],
                       batch["images"])
    return losses.cross_entropy(logits, batch["labels"]), {}

  return loss_fn


def test_bfloat16_computes_in_bfloat16_around_float32_params():
  net = _net("bfloat16")
  params = vit.init_params(net.model, jax.random.key(0), (8, 8, 1))
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  images = jnp.zeros((2, 8, 8, 1), jnp.uint8)
  logits, emb = net.apply(params, None, images, return_embedding=True)
  assert logits.dtype == emb.dtype == jnp.float32
  jaxpr = jax.make_jaxpr(lambda p: net.apply(p, None, images))(params)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  bf16 = [e for e in dots if e.invars[0].aval.dtype == jnp.bfloat16]
  assert len(bf16) >= len(dots) - 1  # every matmul but the float32 head


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_bfloat16_step_matches_float32_step(finetune):
  """One AdamW step on the same batch: loss within 1% (relative), gradient cosine > 0.999,
  update cosine > 0.95 (Adam's first update is about lr * sign(g), so small gradient entries
  whose sign bfloat16 flips count fully); parameters and optimizer state stay float32."""
  _, state, batch = _setup(finetune)
  out = {}
  for dtype in ("float32", "bfloat16"):
    loss_fn = _ce_loss(_net(dtype))
    grad = jax.jit(jax.grad(lambda t, f=loss_fn: f(t, state["params"], None, batch, None)[0]))(
        state["trainable"])
    new, metrics = jax.jit(train.make_step(loss_fn, train.make_optimizer(), lambda s: 1.0))(
        state, batch)
    update = jax.tree_util.tree_map(lambda a, b: a - b, new["trainable"], state["trainable"])
    out[dtype] = (float(metrics["loss"]), ravel_pytree(grad)[0], ravel_pytree(update)[0])
    floats = [x for x in jax.tree_util.tree_leaves((new["trainable"], new["opt"]))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floats} == {jnp.dtype(jnp.float32)}
  (l32, g32, u32), (l16, g16, u16) = out["float32"], out["bfloat16"]
  assert abs(l16 - l32) / l32 < 1e-2
  assert _cosine(g16, g32) > 0.999
  assert _cosine(u16, u32) > 0.95


def test_bfloat16_lora_merge_is_float32():
  params, state, batch = _setup("lora")
  lora = state["trainable"]["lora"]
  merged = lora_lib.merge(params, lora, 1.0)
  assert {x.dtype for x in jax.tree_util.tree_leaves(merged)} == {jnp.dtype(jnp.float32)}
  net = _net("bfloat16")
  adapted = net.apply(params, lora, batch["images"])
  folded = net.apply(merged, None, batch["images"])
  assert adapted.dtype == folded.dtype == jnp.float32
  np.testing.assert_allclose(adapted, folded, rtol=0.05, atol=0.05)


def test_bfloat16_gc_update_matches_float32():
  """The disposal loss's gradient with GC (hvp VJP, second order) in bfloat16 vs float32."""
  params, _, batch = _setup("full")
  source_head = {"kernel": 0.1 * jax.random.normal(jax.random.key(6), (64, 5)),
                 "bias": jnp.zeros(5)}
  hp = {k: jnp.float32(1.0) for k in dispose.HPARAMS}
  batches = {"target": batch, "source": {**batch, "labels": batch["labels"] % 5}}
  grads = {}
  for dtype in ("float32", "bfloat16"):
    loss_fn = dispose.disposal_loss(_net(dtype), source_head, "gc", num_splits=4)
    grads[dtype] = ravel_pytree(jax.jit(jax.grad(lambda t, f=loss_fn: f(
        t, {}, hp, batches, jax.random.key(0))[0]))({"lora": {}, "params": params}))[0]
  assert grads["bfloat16"].dtype == jnp.float32
  assert bool(jnp.isfinite(grads["bfloat16"]).all())
  assert _cosine(grads["bfloat16"], grads["float32"]) > 0.99


def test_bfloat16_pretraining_converges(tmp_path):
  """Nano/2 on the digits, 176 steps in bfloat16: >= 50% test top-1 of 10 classes (61.7%;
  61.9% in float32)."""
  config = config_lib.load(os.path.join(CONFIGS, "pretrain_digits.py"), "runlocal")
  config.model.dtype = "bfloat16"
  config.train.update(epochs=4, batch_size=32, lr=3e-3)
  config.checkpoint.every_steps = 0  # a checkpoint at the end only (runlocal saves every 2)
  results = runner.run("pretrain", config, str(tmp_path))
  assert results["test_accuracy"] >= 50.0
