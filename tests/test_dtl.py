"""Tests of Disposable Transfer Learning: the GC loss, the disposal loss and the dispose job."""

import os

from flax import traverse_util
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kswap_jax import checkpoints, config_lib, heads, losses, runner, train, workdir
from kswap_jax import npz as npz_lib
from kswap_jax.errors import UserError
from kswap_jax.methods import dispose
from kswap_jax.models import vit

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config(name, arg):
  return config_lib.load(os.path.join(CONFIGS, f"{name}.py"), arg)


def _random_tree(seed, k, dtype=jnp.float32):
  """A gradient-like pytree, leaves (K, ...)."""
  a, b, c = jax.random.split(jax.random.key(seed), 3)
  return {"w": jax.random.normal(a, (k, 3, 4), dtype),
          "inner": {"b": jax.random.normal(b, (k, 5), dtype),
                    "s": jax.random.normal(c, (k,), dtype)}}


def _vectors(tree):
  """(K, P) numpy: each g_k flattened."""
  leaves = jax.tree_util.tree_leaves(tree)
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], 1)


def test_gc_dot_identity():
  k = 5
  g = _random_tree(0, k)
  v = _vectors(g)
  total = np.sum(v.sum(0) ** 2) - np.sum(v ** 2)  # |sum g|^2 - sum |g|^2
  gc = losses.gradient_collision(g, "dot")
  np.testing.assert_allclose(gc * k * (k - 1), total, rtol=1e-5)


def test_gc_cosine_matches_reference_and_is_scale_invariant():
  k = 4
  g = _random_tree(1, k)
  v = _vectors(g)
  cos = v @ v.T / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(v, axis=1))
  want = (cos.sum() - np.trace(cos)) / (k * (k - 1))
  gc = losses.gradient_collision(g, "cosine")
  np.testing.assert_allclose(gc, want, rtol=1e-5)
  scale = jnp.array([1.0, 7.5, 1.0, 0.01])  # rescale g_1 and g_3 only
  scaled = jax.tree_util.tree_map(lambda x: x * scale.reshape(-1, *[1] * (x.ndim - 1)), g)
  np.testing.assert_allclose(losses.gradient_collision(scaled, "cosine"), gc, rtol=1e-5)
  assert float(losses.gradient_collision(scaled, "dot")) != pytest.approx(
      float(losses.gradient_collision(g, "dot")), rel=1e-3)


def test_gc_extremes_and_bad_input():
  u = jnp.ones((1, 6))
  np.testing.assert_allclose(losses.gradient_collision({"x": jnp.concatenate([u, 2 * u])}), 1.0,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.gradient_collision({"x": jnp.concatenate([u, -u])}), -1.0,
                             rtol=1e-6)
  with pytest.raises(UserError, match="K >= 2"):
    losses.gradient_collision({"x": u})
  with pytest.raises(UserError, match="similarity"):
    losses.gradient_collision({"x": jnp.concatenate([u, u])}, "euclid")


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_collision_weights_are_the_gc_gradient(similarity):
  """dGC/dg_k = sum_j W[k, j] g_j (closed form) against autodiff of `gradient_collision`."""
  g = _random_tree(3, 4)
  w = losses.collision_weights(losses.gram_matrix(g), similarity)
  want = jax.grad(losses.gradient_collision)(g, similarity)
  got = jax.tree_util.tree_map(lambda x: jnp.tensordot(w, x, 1), g)
  np.testing.assert_allclose(_vectors(got), _vectors(want), rtol=1e-4, atol=1e-6)


def _mlp_ce(w, rest, const, batch):
  """Source CE of a tiny tanh MLP: first layer w["w1"], w["b1"], output layer rest["w2"];
  batch {"x": (b, 3), "y": (b,)}; const unused."""
  del const
  h = jnp.tanh(batch["x"] @ w["w1"] + w["b1"])
  return losses.cross_entropy(h @ rest["w2"], batch["y"])


@pytest.mark.parametrize("vjp", dispose.GC_VJPS)
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_gc_gradient_matches_finite_differences_float64(similarity, vjp):
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(0), 6)
    theta = {"w1": jax.random.normal(keys[0], (3, 5), jnp.float64),
             "b1": jax.random.normal(keys[1], (5,), jnp.float64),
             "w2": jax.random.normal(keys[2], (5, 4), jnp.float64)}
    batch = {"x": jax.random.normal(keys[3], (8, 3), jnp.float64),
             "y": jax.random.randint(keys[4], (8,), 0, 4)}

    @jax.jit
    def gc(t):
      """GC on the first layer, plus the mean CE (the hvp VJP gives it its gradient too)."""
      out = dispose.collision(_mlp_ce, {"w1": t["w1"], "b1": t["b1"]}, {"w2": t["w2"]}, None,
                              dispose.split(batch, 4), similarity, vjp)
      return out[0] + 0.5 * out[1]

    grad = jax.grad(gc)(theta)
    assert grad["w1"].dtype == jnp.float64
    for i, key in enumerate(jax.random.split(keys[5], 3)):
      d = jax.tree_util.tree_map(lambda x, k=key: jax.random.normal(k, x.shape, x.dtype), theta)
      eps = 1e-6
      plus = jax.tree_util.tree_map(lambda x, y: x + eps * y, theta, d)
      minus = jax.tree_util.tree_map(lambda x, y: x - eps * y, theta, d)
      fd = (gc(plus) - gc(minus)) / (2 * eps)
      analytic = sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(grad),
                                                    jax.tree_util.tree_leaves(d)))
      np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-9, err_msg=f"direction {i}")


def _tiny_net():
  model = vit.ViT(num_classes=3, patch_size=4, width=8, depth=1, mlp_dim=16, num_heads=2)
  return train.Network(model), vit.init_params(model, jax.random.key(0), (8, 8, 1))


def _batch(seed, n, classes):
  a, b = jax.random.split(jax.random.key(seed))
  return {"images": jax.random.randint(a, (n, 8, 8, 1), 0, 256).astype(jnp.uint8),
          "labels": jax.random.randint(b, (n,), 0, classes)}


def test_disposal_gc_term_matches_explicit_per_batch_gradients():
  """GC on the Transformer params only (regex), K=3, against a Python loop of jax.grad."""
  net, params = _tiny_net()
  source_head = {"kernel": jax.random.normal(jax.random.key(1), (8, 4)), "bias": jnp.zeros(4)}
  src = _batch(2, 6, 4)
  hp = {k: jnp.float32(v) for k, v in dict(target=0.0, gc=1.0, ascent=0.0, bound=0.0,
                                           random_label=0.0).items()}
  loss_fn = dispose.disposal_loss(net, source_head, "gc", num_splits=3,
                              gc_params="params/Transformer/.*")
  trainable = {"lora": {}, "params": params}
  batches = {"target": _batch(3, 4, 3), "source": src}
  (value, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      trainable, {}, hp, batches, jax.random.key(0))

  def reference(p):
    def ce(block, images, labels):
      _, emb = net.apply({**p, "Transformer": block}, None, images, return_embedding=True)
      return losses.cross_entropy(heads.head_logits(emb, source_head), labels)

    gs = [ravel_pytree(jax.grad(ce)(p["Transformer"], src["images"][2 * k:2 * k + 2],
                                    src["labels"][2 * k:2 * k + 2]))[0] for k in range(3)]
    cos = [jnp.vdot(gs[i], gs[j]) / (jnp.linalg.norm(gs[i]) * jnp.linalg.norm(gs[j]))
           for i in range(3) for j in range(3) if i != j]
    return sum(cos) / 6

  want, want_grads = jax.jit(jax.value_and_grad(reference))(params)
  np.testing.assert_allclose(value, want, rtol=1e-4)
  np.testing.assert_allclose(metrics["gc"], want, rtol=1e-4)
  flat, flat_want = (traverse_util.flatten_dict(t, sep="/") for t in (grads["params"], want_grads))
  assert set(flat) == set(flat_want)
  for k, v in flat_want.items():
    np.testing.assert_allclose(flat[k], v, rtol=2e-3, atol=1e-6, err_msg=k)
  assert float(jnp.abs(flat["embedding/kernel"]).sum()) > 0  # reached through the 2nd order


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_hvp_and_autodiff_give_the_same_update_gradient(similarity):
  """The whole disposal loss's gradient, GC on part of the network (the rest reached through
  the second order too), float32: the custom hvp VJP against reverse-over-reverse."""
  net, params = _tiny_net()
  source_head = {"kernel": jax.random.normal(jax.random.key(1), (8, 4)), "bias": jnp.zeros(4)}
  hp = {k: jnp.float32(1.0) for k in dispose.HPARAMS}
  batches = {"target": _batch(3, 4, 3), "source": _batch(2, 8, 4)}
  trainable = {"lora": {}, "params": params}
  grads = {}
  for vjp in dispose.GC_VJPS:
    loss_fn = dispose.disposal_loss(net, source_head, "gc", num_splits=4, similarity=similarity,
                                    gc_params="params/Transformer/.*/MlpBlock_0/.*",
                                    gc_vjp=vjp)
    (_, metrics), g = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        trainable, {}, hp, batches, jax.random.key(0))
    grads[vjp] = (ravel_pytree(g)[0], metrics["gc"])
  (a, gc_a), (b, gc_b) = grads["hvp"], grads["autodiff"]
  np.testing.assert_allclose(gc_a, gc_b, rtol=1e-5)
  assert float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))) > 0.9999
  assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-4
  with pytest.raises(UserError, match="gc_vjp"):
    dispose.disposal_loss(net, source_head, "gc", gc_vjp="forward")


def test_baseline_losses_and_errors():
  net, params = _tiny_net()
  source_head = {"kernel": jnp.zeros((8, 4)), "bias": jnp.zeros(4)}  # uniform source logits
  hp = {k: jnp.float32(1.0) for k in dispose.HPARAMS} | {"bound": jnp.float32(3.0)}
  batches = {"target": _batch(3, 4, 3), "source": _batch(2, 6, 4)}
  trainable = {"lora": {}, "params": params}
  def loss(method):
    return jax.jit(dispose.disposal_loss(net, source_head, method))(trainable, {}, hp, batches,
                                                                jax.random.key(0))

  plain = loss("none")[0]
  for method, extra in (("grad_ascent", 3.0 - np.log(4)), ("random_label", np.log(4))):
    total, metrics = loss(method)
    np.testing.assert_allclose(metrics["ce_source"], np.log(4), rtol=1e-5)
    np.testing.assert_allclose(total, plain + extra, rtol=1e-5)
  with pytest.raises(UserError, match="method="):
    dispose.disposal_loss(net, source_head, "forget")
  with pytest.raises(UserError, match="num_splits=4"):
    dispose.split(batches["source"], 4)
  with pytest.raises(UserError, match="gc_params"):
    dispose.measured_paths(trainable, "lora/.*")
  assert dispose.leakage(60.0, 90.0, 30.0) == pytest.approx(0.5)
  assert dispose.leakage(40.0, 90.0, 30.0) == pytest.approx(1 / 6)  # not symmetric
  assert np.isnan(dispose.leakage(60.0, 30.0, 30.0))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_dispose_digits_end_to_end(tmp_path, digits_dir):
  config = _config("dispose_digits", "runlocal")
  config.data.data_dir = config.init.pretrain.data.data_dir = digits_dir
  # Run-time settings that change no result: checkpoints at the ends of stages only (runlocal
  # saves every 2 steps), evaluation in batches of 16 (one compiled shape, not one per set size).
  for c in (config, config.init.pretrain):
    c.checkpoint.every_steps = 0
    c.data.eval_batch_size = 16
  results = runner.run("dispose", config, str(tmp_path))
  assert [r["after"] for r in results["evals"]] == ["pretrained", "transfer", "dispose"]
  assert set(results["pl"]) == {"linear", "full"}
  for row in results["pl"].values():
    assert set(row) == {*dispose.PL_MODELS, "leakage"}
    assert all(0.0 <= row[m] <= 100.0 for m in dispose.PL_MODELS)
  assert workdir.read_json(str(tmp_path / "results.json"))["pl"].keys() == results["pl"].keys()
  params, meta = checkpoints.load_model(str(tmp_path / "model"))
  assert params["head"]["kernel"].shape[-1] == 5 and meta["method"] == "gc"
  assert [c[2] for c in meta["classes"]] == ["5", "6", "7", "8", "9"]


def test_dispose_cifar10_config_on_mock_data(tmp_path):
  probe = _config("dispose_cifar10", "runlocal")
  model_cfg = ml_collections.ConfigDict(probe.model.to_dict())
  model_cfg.num_classes = 1000
  shape = (probe.data.image_size, probe.data.image_size, probe.data.channels)
  npz = str(tmp_path / "source_vit.npz")
  npz_lib.save_npz(npz, vit.init_params(vit.make_model(model_cfg), jax.random.key(0), shape))
  config = _config("dispose_cifar10", f"runlocal,checkpoint={npz},method=random_label,finetune=lora")
  config.data.data_dir = str(tmp_path / "tfds")
  config.pl.attacks = ("linear",)
  config.checkpoint.every_steps = 0  # at the ends of stages only (runlocal saves every 2 steps)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    results = runner.run("dispose", config, str(tmp_path / "run"))
  assert [r["after"] for r in results["evals"]] == ["pretrained", "transfer", "dispose"]
  assert set(results["pl"]) == {"linear"}
  assert len(workdir.read_json(str(tmp_path / "run" / "model" / "model.json"))["classes"]) == 10
