"""Membership inference (`kswap_jax.mia`): features, and the attack's efficacy on a model
that memorised its training examples against one that learned nothing."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kswap_jax import losses, mia


def test_features_of_known_logits():
  f = mia.features(np.log(np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]])), np.array([0, 0]))
  np.testing.assert_allclose(f[:, 0], [np.log(2), np.log(4)])          # loss
  np.testing.assert_allclose(f[:, 1], [0.5, 0.5])                      # confidence
  np.testing.assert_allclose(f[:, 2], [0.5, 0.25])                     # true-class prob
  np.testing.assert_allclose(f[:, 3], [1.5 * np.log(2)] * 2)           # entropy


def _data(seed=0, n=60, dim=32, k=10):
  """Three groups of random inputs with random labels: retain, forget (both trained on) and
  test (never seen)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(3 * n, dim)).astype(np.float32)
  y = rng.integers(0, k, 3 * n)
  return [(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n]) for i in range(3)]


def _fit(x, y, steps, k=10):
  """A 2-layer MLP trained (Adam) on (x, y) for `steps` steps: logits_fn(x) -> (N, K)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"w1": jax.random.normal(k1, (x.shape[1], 256)) / np.sqrt(x.shape[1]),
            "w2": jax.random.normal(k2, (256, k)) / 16}
  fn = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]  # noqa: E731
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(p, opt):
    g = jax.grad(lambda p: losses.cross_entropy(fn(p, x), y))(p)
    u, opt = tx.update(g, opt)
    return optax.apply_updates(p, u), opt

  for _ in range(steps):
    params, opt = step(params, opt)
  return lambda x: np.asarray(fn(params, jnp.asarray(x)))


def _efficacy(logits_fn, retain, forget, test):
  feats = [mia.features(logits_fn(x), y) for x, y in (retain, test, forget)]
  return mia.efficacy(*feats, seed=0)


def test_memorised_forget_set_is_detected_and_untrained_model_is_near_chance():
  retain, forget, test = _data()
  train_x = np.concatenate([retain[0], forget[0]])
  train_y = np.concatenate([retain[1], forget[1]])
  memorised = _fit(train_x, train_y, steps=300)
  assert (memorised(train_x).argmax(-1) == train_y).mean() == 1.0  # it memorised them
  assert _efficacy(memorised, retain, forget, test) >= 0.9
  untrained = _fit(train_x, train_y, steps=0)
  assert abs(_efficacy(untrained, retain, forget, test) - 0.5) <= 0.2


def test_efficacy_is_deterministic():
  retain, forget, test = _data(seed=1)
  fn = _fit(np.concatenate([retain[0], forget[0]]), np.concatenate([retain[1], forget[1]]), 50)
  assert _efficacy(fn, retain, forget, test) == _efficacy(fn, retain, forget, test)
