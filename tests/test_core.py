"""ViT, LoRA, losses, metrics and the pure update step."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kswap_jax import lora as lora_lib
from kswap_jax import losses, metrics, train, trees
from kswap_jax.errors import UserError
from kswap_jax.models import vit


def _model(num_classes=5, variant="Nano/2"):
  model = vit.ViT(num_classes=num_classes, **vit.get_variant(variant))
  return model, vit.init_params(model, jax.random.key(0), (8, 8, 1))


def test_get_variant_and_errors():
  assert vit.get_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                         patch_size=16)
  with pytest.raises(UserError, match="unknown ViT variant"):
    vit.get_variant("Q/16")
  with pytest.raises(UserError, match="not a multiple of the patch size"):
    vit.init_params(vit.ViT(num_classes=2, **vit.get_variant("Nano/3")), jax.random.key(0),
                    (8, 8, 1))


def test_vit_shapes_names_and_embedding():
  model, params = _model()
  flat = {"/".join(k) for k in jax.tree_util.tree_flatten_with_path(params)[0] and
          [tuple(getattr(p, "key", p) for p in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]}
  for name in ("embedding/kernel", "cls", "pos_embedding", "head/kernel",
               "Transformer/encoder_norm/scale",
               "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel",
               "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"):
    assert name in flat
  x = jnp.ones((3, 8, 8, 1))
  logits, emb = model.apply({"params": params}, x, return_embedding=True)
  chex.assert_shape(logits, (3, 5))
  chex.assert_shape(emb, (3, 32))
  np.testing.assert_allclose(logits, emb @ params["head"]["kernel"] + params["head"]["bias"],
                             atol=1e-5)


def test_lora_starts_unchanged_and_merge_equals_apply():
  model, params = _model()
  leaves, tree = jax.tree_util.tree_flatten(params)  # a random, nonzero head
  keys = jax.random.split(jax.random.key(9), len(leaves))
  params = tree.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  lora = lora_lib.init(jax.random.key(1), params, rank=4)
  x = jax.random.uniform(jax.random.key(2), (2, 8, 8, 1))
  base = model.apply({"params": params}, x)
  np.testing.assert_allclose(lora_lib.apply(model, params, lora, x, scale=0.5), base, atol=1e-6)
  lora = jax.tree_util.tree_map(lambda t: t + 0.1, lora)  # B nonzero now
  adapted = lora_lib.apply(model, params, lora, x, scale=0.5)
  assert np.abs(adapted - base).max() > 1e-3
  merged = lora_lib.merge(params, lora, 0.5)
  np.testing.assert_allclose(model.apply({"params": merged}, x), adapted, atol=1e-5)


def test_adapted_matmul_gradients_equal_the_unmerged_formula():
  """First and second order (a gradient-norm penalty, as Gradient Collision takes) gradients of
  the merged-kernel product equal JAX's gradients of x W + (x A) B as written."""
  x, kernel, a, b = (jax.random.normal(k, s) for k, s in zip(
      jax.random.split(jax.random.key(0), 4), [(6, 5), (5, 7), (5, 3), (3, 7)]))
  loss = lambda fn: lambda *w: jnp.sum(jnp.sin(fn(*w)))
  plain = lambda x, kernel, a, b: x @ kernel + (x @ a) @ b
  np.testing.assert_allclose(lora_lib.adapted_matmul(x, kernel, a, b), plain(x, kernel, a, b),
                             atol=1e-5)
  got = jax.grad(loss(lora_lib.adapted_matmul), argnums=(0, 1, 2, 3))(x, kernel, a, b)
  want = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(x, kernel, a, b)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4)
  penalty = lambda fn: lambda a, b: jnp.sum(jax.grad(loss(fn), argnums=3)(x, kernel, a, b) ** 2)
  got = jax.grad(penalty(lora_lib.adapted_matmul), argnums=(0, 1))(a, b)
  want = jax.grad(penalty(plain), argnums=(0, 1))(a, b)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_lora_on_attention_out_projection_matches_merge():
  model, params = _model()
  targets = r"Transformer/encoderblock_0/MultiHeadDotProductAttention_0/(query|out)"
  lora = jax.tree_util.tree_map(lambda t: t + 0.05,
                                lora_lib.init(jax.random.key(1), params, rank=2,
                                              targets=targets))
  x = jax.random.uniform(jax.random.key(2), (2, 8, 8, 1))
  np.testing.assert_allclose(lora_lib.apply(model, params, lora, x, scale=1.0),
                             model.apply({"params": lora_lib.merge(params, lora, 1.0)}, x),
                             atol=1e-5)


def test_lora_init_shapes_bounds_and_count():
  _, params = _model()
  lora = lora_lib.init(jax.random.key(0), params, rank=3)
  layers = lora_lib.layers(lora)
  assert sorted(layers) == [f"Transformer/encoderblock_{i}/MlpBlock_0/Dense_{j}"
                            for i in range(2) for j in range(2)]
  ab = layers["Transformer/encoderblock_0/MlpBlock_0/Dense_0"]
  chex.assert_shape(ab["A"], (32, 3))
  chex.assert_shape(ab["B"], (3, 64))
  assert np.abs(ab["A"]).max() <= 1 / np.sqrt(32) and not np.any(ab["B"])
  small = lora_lib.layers(lora_lib.init(jax.random.key(0), params, rank=3, a_init="small"))
  assert np.abs(small["Transformer/encoderblock_0/MlpBlock_0/Dense_0"]["A"]).max() <= \
      np.sqrt(6 / (51 * 32))
  assert lora_lib.count(lora) == 2 * 3 * (32 + 64) * 2
  with pytest.raises(UserError, match="matches no layer"):
    lora_lib.init(jax.random.key(0), params, rank=3, targets="nothing")


def test_cross_entropy_and_bounded_forget_against_reference():
  logits = jax.random.normal(jax.random.key(0), (6, 4))
  labels = jnp.array([0, 1, 2, 3, 0, 1])
  ref = -np.mean(np.log(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))[
      np.arange(6), labels])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), ref, rtol=1e-5)
  np.testing.assert_allclose(losses.bounded_forget(logits, labels, 10.0), 10.0 - ref, rtol=1e-5)
  assert losses.bounded_forget(logits, labels, 0.1) == 0.0
  g_in = jax.grad(losses.bounded_forget)(logits, labels, 10.0)
  np.testing.assert_allclose(g_in, -jax.grad(losses.cross_entropy)(logits, labels), rtol=1e-5)
  assert not np.any(jax.grad(losses.bounded_forget)(logits, labels, 0.1))


def test_group_sparse_groups_values_and_gradients():
  _, params = _model()
  lora = jax.tree_util.tree_map(lambda t: jnp.ones_like(t),
                                lora_lib.init(jax.random.key(0), params, rank=2))
  # block: per block sqrt(sum of all entries^2) = sqrt(2 * 2 * (32 + 64))
  np.testing.assert_allclose(losses.group_sparse(lora, "block"), 2 * np.sqrt(384), rtol=1e-5)
  per_layer = 2 * np.sqrt(2 * 32 + 2 * 64) * 2
  np.testing.assert_allclose(losses.group_sparse(lora, "layer"), per_layer, rtol=1e-5)
  matrix = 2 * 2 * (np.sqrt(2 * 32) + np.sqrt(2 * 64))
  np.testing.assert_allclose(losses.group_sparse(lora, "matrix"), matrix, rtol=1e-5)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, lora)
  g = jax.grad(losses.group_sparse)(zeros)
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(g))
  g1 = jax.grad(losses.group_sparse)(lora)  # d/dW sqrt(sum W^2) = W / norm
  leaf = g1["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["A"]
  np.testing.assert_allclose(leaf, 1 / np.sqrt(384), rtol=1e-4)
  with pytest.raises(UserError, match="group type"):
    losses.group_sparse(lora, "row")


def test_metrics():
  correct, count = np.array([1, 1, 1, 0]), np.array([1, 1, 2, 0])
  assert metrics.set_accuracy(correct, count, [1, 2]) == pytest.approx(200 / 3)
  assert metrics.set_accuracy(correct, count) == pytest.approx(75.0)
  assert np.isnan(metrics.set_accuracy(correct, count, [3]))
  assert metrics.h_mean(80.0, 90.0, 10.0) == pytest.approx(2 * 80 * 80 / 160)


def test_partition_combine_roundtrip():
  _, params = _model()
  frozen, tr = trees.partition(params, "head/.*")
  assert set(tr) == {"head"} and "head" not in frozen
  chex.assert_trees_all_equal(trees.combine(frozen, tr), params)


def test_lr_factor_cosine_per_epoch():
  f = [float(train.lr_factor(s, total_steps=10, steps_per_epoch=5, end_ratio=0.1))
       for s in range(10)]
  assert f[:5] == [1.0] * 5 and f[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 2)))


@pytest.mark.parametrize("total,warmup,per_epoch,end", [(20, 5, 0, 0.1), (20, 0, 4, 0.2),
                                                       (7, 0, 0, 1e-3)])
def test_stage_schedule_from_state_numbers_by_hand(total, warmup, per_epoch, end):
  """The schedule read from state["stage"] arrays, one compiled function for every stage."""
  numbers = train.stage_numbers(total, warmup, per_epoch, end)
  fn = jax.jit(lambda s, n: train.stage_schedule({"stage_step": s, "stage": n}))
  for s in range(total + 2):
    if per_epoch:
      warm, progress = 1.0, min(1.0, (s // per_epoch) / -(-total // per_epoch))
    else:
      warm = min(1.0, (s + 1) / warmup) if warmup else 1.0
      progress = min(1.0, max(0.0, (s - warmup) / max(1, total - warmup)))
    want = warm * (end + (1 - end) * 0.5 * (1 + np.cos(np.pi * progress)))
    assert float(fn(np.int32(s), numbers)) == pytest.approx(want, rel=1e-5, abs=1e-7), s


def test_step_is_pure_and_compiles_once():
  model, params = _model(num_classes=3)
  net = train.Network(model, lora_scale=0.5)
  lora = lora_lib.init(jax.random.key(1), params, rank=2)
  tx = train.make_optimizer()
  state = train.init_state(params, lora, "head/.*", {"lr": 1e-2, "weight_decay": 0.0}, 0, tx)

  def loss_fn(trainable, frozen, hp, batch, rng):
    del hp
    logits = net.apply(trees.combine(frozen, trainable["params"]), trainable["lora"],
                       batch["images"], train=True, rng=rng)
    return losses.cross_entropy(logits, batch["labels"]), {}

  step = jax.jit(chex.assert_max_traces(
      train.make_step(loss_fn, tx, lambda s: 1.0), n=1))
  batch = {"images": jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 8, 8, 1)),
                                 jnp.uint8), "labels": jnp.array([0, 1, 2, 0])}
  before = jax.tree_util.tree_map(np.asarray, state)
  s1, m1 = step(state, batch)
  s2, m2 = step(s1, batch)
  assert int(s2["step"]) == 2 and float(m2["loss"]) < float(m1["loss"])
  chex.assert_trees_all_equal(s2["params"], before["params"])  # frozen stays frozen
  again, _ = step(jax.tree_util.tree_map(jnp.asarray, before), batch)
  chex.assert_trees_all_close(again["trainable"], s1["trainable"])  # same in, same out
  # the lr in the state is what was applied: zero lr leaves trainables unchanged
  zero = {**before, "hparams": {**before["hparams"], "lr": np.float32(0.0)}}
  s0, _ = step(jax.tree_util.tree_map(jnp.asarray, zero), batch)
  chex.assert_trees_all_close(s0["trainable"], before["trainable"])


def test_make_optimizer_matches_optax_adamw():
  p = {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}
  g = {"w": jnp.full((2, 3), 0.5), "b": jnp.full((3,), -0.2)}
  tx = train.make_optimizer()
  st = tx.init(p)
  st.hyperparams["learning_rate"] = jnp.float32(0.1)
  st.hyperparams["weight_decay"] = jnp.float32(0.05)
  ours, _ = tx.update(g, st, p)
  ref_tx = optax.adamw(0.1, weight_decay=0.05, mask=train.decay_mask)
  ref, _ = ref_tx.update(g, ref_tx.init(p), p)
  chex.assert_trees_all_close(ours, ref, rtol=1e-5)
