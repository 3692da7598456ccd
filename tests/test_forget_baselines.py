"""Tests of the GS-LoRA paper's continual-forgetting baselines (methods/forget_baselines.py)."""
from __future__ import annotations

import os
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kswap_jax import checkpoints, config_lib, runner, sharding, sweep, trees, workdir
from kswap_jax.methods import forget
from kswap_jax.methods import forget_baselines as fb
from test_forget import HP, _apply, _batch, _config, _net, _params, _randomized
from test_sweep import _forget_rows_close

BASELINES = ("l2", "ewc", "mas", "lwf", "der", "der_pp", "fdr", "scrub", "scrub_s", "lirf")
RNG = np.random.default_rng(0)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# --- pure terms against numpy ----------------------------------------------------------------

def test_relabel_follows_the_authors_label_shift():
  """P(wrong = k | y) from enumerating randint(1, 100); never the true label; in [0, N_f)."""
  n_f, y = 3, np.array([0, 1, 2, 7] * 5000)
  got = np.asarray(fb.relabel(jax.random.key(0), jnp.asarray(y), n_f))
  assert got.min() >= 0 and got.max() < n_f and not np.any(got == y)
  for label in (1, 7):
    want = np.zeros(n_f)
    for r in range(1, 101):
      w = (label + r) % n_f
      want[(label + 1) % n_f if w == label else w] += 1 / 100
    freq = np.bincount(got[y == label], minlength=n_f) / (y == label).sum()
    np.testing.assert_allclose(freq, want, atol=0.02)


def test_distillation_terms_against_numpy():
  s, t = RNG.normal(size=(5, 6)) * 3, RNG.normal(size=(5, 6)) * 3
  temp = 2.0
  p_t, p_s = _softmax(t / temp), _softmax(s / temp)
  want_ce = np.mean(-(p_t * np.log(p_s)).sum(1))
  np.testing.assert_allclose(fb.soft_ce(jnp.asarray(s), jnp.asarray(t), temp), want_ce, rtol=1e-5)
  want_kl = (p_t * (np.log(p_t) - np.log(p_s))).sum() * temp**2 / 5
  np.testing.assert_allclose(fb.kd(jnp.asarray(s), jnp.asarray(t), temp), want_kl, rtol=1e-5)
  q_t, q_s = _softmax(t[:, 2:] / 10), _softmax(s[:, 2:] / 10)
  want_kp = (q_t * (np.log(q_t) - np.log(q_s))).sum() * 100 / 5  # LIRF's columns >= N_f = 2
  np.testing.assert_allclose(fb.kd(jnp.asarray(s), jnp.asarray(t), 10.0, 2), want_kp, rtol=1e-5)
  np.testing.assert_allclose(fb.squared_distance(jnp.asarray(s), jnp.asarray(t)),
                             ((s - t) ** 2).sum(), rtol=1e-5)
  np.testing.assert_allclose(fb.mean_distance(jnp.asarray(s), jnp.asarray(t)),
                             np.linalg.norm(s - t, axis=1).mean(), rtol=1e-5)


def test_param_distance_and_its_gradient_at_zero():
  a = {"x": jnp.asarray(RNG.normal(size=(3, 4)), jnp.float32), "y": jnp.ones(5)}
  b = {"x": a["x"] + 1.0, "y": a["y"]}
  np.testing.assert_allclose(fb.param_distance(a, b), np.sqrt(12.0), rtol=1e-6)
  g = jax.grad(fb.param_distance)(a, a)  # equal trees: gradient 0, not NaN
  assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(g))


def test_attention_loss_against_numpy():
  scale = np.where(np.arange(40) < 10, 0.05, 1.0)  # 10 weak features fall under the floor
  h_s, h_t = RNG.normal(size=(2, 5, 40)) * scale, RNG.normal(size=(2, 5, 40))

  def at(h):
    a = (h ** 2).mean(1)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    return np.where(a < 0.005, 0.0, a)

  assert (at(h_s) == 0).any()  # the floor matters on these inputs
  np.testing.assert_allclose(fb.attention_loss(jnp.asarray(h_s), jnp.asarray(h_t)),
                             ((at(h_s) - at(h_t)) ** 2).mean(), rtol=1e-5)


def test_penalty_in_closed_form_equals_the_sum_of_task_terms():
  """sum_k sum I_k (theta - a_k)^2 for three terms (some importances 0): value and gradient."""
  shape = {"w": (3, 4), "b": (4,)}
  draw = lambda: {k: RNG.normal(size=s) for k, s in shape.items()}  # noqa: E731
  terms = []
  for k in range(3):
    imp = {key: np.abs(v) * (RNG.random(v.shape) > 0.3) for key, v in draw().items()}
    terms.append((imp, draw()))
  theta = draw()
  reg = fb.empty_reg(jax.tree.map(jnp.asarray, theta))
  for imp, anchor in terms:
    reg = fb.add_term(reg, jax.tree.map(jnp.asarray, imp), jax.tree.map(jnp.asarray, anchor))
  want = sum(np.sum(i[k] * (theta[k] - a[k]) ** 2) for i, a in terms for k in shape)
  np.testing.assert_allclose(fb.penalty(jax.tree.map(jnp.asarray, theta), reg), want, rtol=1e-4)
  grad = jax.grad(fb.penalty)(jax.tree.map(jnp.asarray, theta), reg)
  for k in shape:
    np.testing.assert_allclose(grad[k], sum(2 * i[k] * (theta[k] - a[k]) for i, a in terms),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["ewc", "mas"])
def test_importance_of_padded_batches_equals_the_authors_loop(kind):
  """7 examples in batches of 3 (3, 3, 1): ewc sum_b g_b^2 |b| / 3, mas sum_b |g_b| / 3, g_b
  the gradient of batch b's mean CE (ewc) or mean(logits^2) (mas), unpadded."""
  data = _batch(5, n=7)
  params = _params()

  def grads(batch):
    return jax.grad(lambda p: fb.importance_loss(
        kind, _apply()(p, None, batch["images"])[0], batch["labels"], batch["mask"]))(params)

  want = jax.tree.map(jnp.zeros_like, params)
  got = jax.tree.map(jnp.zeros_like, params)
  for lo in (0, 3, 6):
    hi = min(lo + 3, 7)
    exact = {k: v[lo:hi] for k, v in data.items()}
    logits = lambda p, e=exact: _apply()(p, None, e["images"])[0]  # noqa: E731
    if kind == "ewc":
      g = jax.grad(lambda p: jnp.mean(jax.nn.logsumexp(logits(p), -1) - jnp.take_along_axis(
          logits(p), exact["labels"][:, None], 1)[:, 0]))(params)
      want = jax.tree.map(lambda w, x: w + x ** 2 * (hi - lo) / 3, want, g)
    else:
      g = jax.grad(lambda p: jnp.mean(logits(p) ** 2))(params)
      want = jax.tree.map(lambda w, x: w + jnp.abs(x) / 3, want, g)
    pad = 3 - (hi - lo)
    padded = {k: jnp.concatenate([v, jnp.zeros((pad,) + v.shape[1:], v.dtype)])
              for k, v in exact.items()}
    padded["mask"] = jnp.arange(3) < hi - lo
    got = jax.tree.map(jnp.add, got, fb.importance_batch(kind, grads(padded),
                                                          padded["mask"].sum(), 3))
  chex.assert_trees_all_close(got, want, rtol=2e-4, atol=1e-7)  # key biases: ~1e-9 noise


def test_losses_from_terms():
  t = {"ce_r": 1.0, "ce_w": 2.0, "penalty": 3.0, "kd_r": 0.5, "der": 4.0, "fdr": 0.25,
       "kl_r_t": 0.3, "kl_f_t": 0.7, "smooth": 2.0, "at": 0.01, "kp": 0.2}
  hp = fb.weights("scrub_s")
  assert forget.METHODS["ewc"].loss(t, hp) == pytest.approx(1.5 + 10.0 * 3.0)
  assert forget.METHODS["mas"].loss(t, hp) == pytest.approx(1.5 + 0.005 * 3.0)
  assert fb.lwf_loss(t, hp) == pytest.approx(2.0 + 0.5 * 0.5 + 10.0 * 1.0)
  assert fb.der_pp_loss(t, hp) == pytest.approx(2.0 + 0.01 * 4.0 + 0.005 * 1.0)
  assert fb.fdr_loss(t, hp) == pytest.approx(2.0 + 50.0 * 0.25)
  assert fb.scrub_loss({**t, "max_step": 1.0}, hp) == pytest.approx(-0.7 + 0.1 * 2.0)
  assert fb.scrub_loss({**t, "max_step": 0.0}, hp) == pytest.approx(
      0.99 * 1.0 + 0.001 * 0.3 + 0.1 * 2.0)
  assert fb.lirf_loss(t, hp) == pytest.approx(0.9 * 2.0 - 300 * 0.01 + 10 * 0.1 * 0.2 + 5.0)


def test_scrub_schedule_follows_the_authors_loops():
  """Two superepochs of SCRUBtrain.py's loops with 2 forget and 3 retain batches per epoch."""
  n_f, n_r = 2, 3
  want, f, r = [], 0, 0
  for _ in range(2):
    for i in range(10):
      if i < 5:
        for _ in range(n_f):
          want.append(("max", f))
          f += 1
      for _ in range(n_r):
        want.append(("min", r))
        r += 1
  assert fb.scrub_length(n_f, n_r) * 2 == len(want)
  for s, (phase, index) in enumerate(want):
    assert bool(fb.scrub_max_step(s, n_f, n_r)) == (phase == "max")
    assert bool(fb.scrub_max_step(jnp.int32(s), n_f, n_r)) == (phase == "max")
    got_f, got_r = fb.scrub_positions(s, n_f, n_r)
    assert (got_f if phase == "max" else got_r) == index


def test_swa_update_copies_then_averages():
  swa = {"params": {"w": jnp.zeros(2)}, "n": jnp.zeros((), jnp.int32)}
  swa = fb.swa_update(swa, {"w": jnp.asarray([1.0, 2.0])})
  np.testing.assert_allclose(swa["params"]["w"], [1.0, 2.0])
  swa = fb.swa_update(swa, {"w": jnp.asarray([3.0, 4.0])})
  np.testing.assert_allclose(swa["params"]["w"], [1.2, 2.2], rtol=1e-6)
  assert int(swa["n"]) == 2


def test_lirf_trains_the_embeddings_and_the_lower_half():
  paths = trees.flatten(_params())
  hit = set(trees.matching(paths, fb.lirf_trainable(_net().base.model.depth)))
  depth = _net().base.model.depth
  assert any(p.startswith("embedding/") for p in hit) and "cls" in hit
  for i in range(depth):
    block = {p for p in paths if p.startswith(f"Transformer/encoderblock_{i}/")}
    assert (block <= hit) == (i < depth // 2) and (block & hit or i >= depth // 2)
  assert not any(p.startswith("head/") for p in hit)


@pytest.mark.parametrize("name", ["lwf", "der_pp", "fdr", "scrub_s", "lirf", "ewc"])
def test_step_terms_against_direct_forward_passes(name):
  """make_loss's baseline terms equal the same terms of separate student / teacher passes."""
  method = forget.METHODS[name]
  frozen, tparams = trees.partition(_params(), forget.NOT_HEAD)
  teacher = _randomized(tparams, 9, 0.3)
  r, f = _batch(1), _batch(2)
  ctx = {"stage_step": jnp.int32(0), "teacher": teacher,
         "stage": {"alpha_warmup": jnp.int32(0), "forget_steps": jnp.int32(1),
                   "retain_steps": jnp.int32(1)},
         "reg": fb.add_term(fb.empty_reg(teacher), jax.tree.map(jnp.ones_like, teacher),
                            teacher),
         "swa": {"params": teacher, "n": jnp.int32(1)}}
  hp = {k: jnp.float32(v) for k, v in {**HP, **fb.weights(name)}.items()}
  loss_fn = forget.make_loss(method, _net(), "block", 2, fb.settings())
  _, terms = jax.jit(loss_fn)({"lora": {}, "params": tparams}, frozen, hp,
                              {"retain": r, "forget": f, "ctx": ctx}, jax.random.key(0))
  student, t_params = _params(), trees.combine(frozen, teacher)
  s_r, e_r = _apply()(student, None, r["images"])
  t_r, te_r = _apply()(t_params, None, r["images"])
  s_f, _ = _apply()(student, None, f["images"])
  t_f, _ = _apply()(t_params, None, f["images"])
  want = {"lwf": {"kd_r": fb.soft_ce(s_r, t_r, 2.0)},
          "der_pp": {"der": fb.squared_distance(e_r, te_r)},
          "fdr": {"fdr": fb.mean_distance(s_r, t_r)},
          "scrub_s": {"kl_r_t": fb.kd(s_r, t_r, 2.0), "kl_f_t": fb.kd(s_f, t_f, 2.0),
                      "smooth": fb.param_distance(tparams, teacher), "max_step": 1.0},
          "lirf": {"kp": fb.kd(s_f, t_f, 10.0, 2)},
          "ewc": {"penalty": sum(jnp.sum((a - b) ** 2) for a, b in zip(
              jax.tree.leaves(tparams), jax.tree.leaves(teacher)))}}[name]
  for k, v in want.items():
    np.testing.assert_allclose(terms[k], v, rtol=2e-4, atol=1e-6, err_msg=k)
  if "ce_w" in terms:  # CE under labels in [0, N_f) that differ from the true ones
    assert float(terms["ce_w"]) > 0


def test_configs_take_every_baseline():
  for name, extra in (("forget_digits", ""), ("forget_imagenet100", ""),
                      ("forget_faces", ",data=/faces")):
    for m in BASELINES:
      c = _config(name, f"runlocal,method={m}{extra}")
      assert c.train.lr == forget.METHODS[m].lr
      assert set(fb.WEIGHTS) <= set(c.weights) and c.baselines.kd_T == 2.0
  assert _config("forget_digits", "method=scrub_s").weights.smoothing == 0.1
  assert _config("forget_digits", "method=der_pp").weights.der == 0.005


# --- runs: resume, and a study's members equal their single runs -------------------------------

# ewc: importances and task-start params in the state; scrub_s: teacher, weight average and
# alternating max / min steps. The other baselines' terms are checked step by step above.
RUN_METHODS = ("ewc", "scrub_s")
STUDY_METHODS = ("ewc",)
MAIN = {"ewc": "ewc_lambda", "scrub_s": "smoothing"}


def _run_config(method):
  c = _config("forget_digits", f"runlocal,method={method}")
  c.sets.retain.per_class = 4      # tasks of several steps: room to resume inside task 1
  c.baselines.superepochs = 1
  # Checkpoints at the ends of stages only (runlocal saves every 2 steps); the resume test
  # sets its own interval.
  c.checkpoint.every_steps = c.init.pretrain.checkpoint.every_steps = 0
  c.log_every = 10**6
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("pretrain"))
  runner.run("pretrain", _run_config("ewc").init.pretrain, d)
  return d


@pytest.fixture(scope="module")
def single_runs(pretrained, tmp_path_factory):
  """{method: (run dir, results)} of one uninterrupted run each (the study's member 1)."""
  out = {}
  for m in RUN_METHODS:
    c = sweep.member_config(_run_config(m), _members(m)[1])
    c.init.checkpoint = pretrained
    d = str(tmp_path_factory.mktemp(m))
    out[m] = d, runner.run("forget", c, d)
  return out


def _members(method):
  w = MAIN[method]
  base = _run_config(method)
  return ({"train.lr": base.train.lr, f"weights.{w}": base.weights[w]},
          {"train.lr": 3 * base.train.lr, f"weights.{w}": 2 * base.weights[w] + 0.05})


class _Interrupt(Exception):
  pass


@pytest.mark.parametrize("method", RUN_METHODS)
def test_resume_mid_sequence_equals_an_uninterrupted_run(method, pretrained, single_runs,
                                                         tmp_path):
  run_dir, results = single_runs[method]
  c = sweep.member_config(_run_config(method), _members(method)[1])
  c.init.checkpoint = pretrained
  rec = forget.Recipe(c, str(tmp_path / "probe"), pretrained, sharding.make_mesh(c.mesh))
  crash = rec.steps(0) + 2   # inside task 1
  assert crash < rec.steps(0) + rec.steps(1)
  c.checkpoint.every_steps = crash
  save = checkpoints.Checkpoints.maybe_save

  def crash_after(self, step, state, force=False, iterator=None):
    save(self, step, state, force, iterator)
    if step == crash:
      self.manager.wait_until_finished()
      raise _Interrupt

  with mock.patch.object(checkpoints.Checkpoints, "maybe_save", crash_after):
    with pytest.raises(_Interrupt):
      runner.run("forget", c, str(tmp_path / "run"))
  rows = workdir.read_json(str(tmp_path / "run" / "results.json"))["tasks"]
  assert "H" in rows[0] and "H" not in rows[1]
  resumed = runner.run("forget", c, str(tmp_path / "run"))
  _forget_rows_close(resumed["tasks"], results["tasks"])
  got, _ = checkpoints.load_model(str(tmp_path / "run" / "task_1" / "model"))
  want, _ = checkpoints.load_model(os.path.join(run_dir, "task_1", "model"))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_study_members_equal_their_single_runs(pretrained, single_runs, tmp_path):
  """A study of ewc (two vmapped members, each with its own importances and task-start
  params) equals its single runs."""
  base = _run_config("ewc")
  base.init.checkpoint = pretrained
  members = []
  for m in STUDY_METHODS:
    for a in _members(m):
      own = {f"weights.{k}": v for k, v in fb.METHOD_WEIGHTS.get(m, {}).items()}
      members.append({"method": m, **own, **a})
  c = config_lib.sweep("forget", base, {}, True)
  c.checkpoint.every_steps = 0
  c.members = members
  c.grid = {}
  res = runner.sweep(c, str(tmp_path))
  for m in STUDY_METHODS:
    i = next(k for k, a in enumerate(members) if a["method"] == m
             and a["train.lr"] != _run_config(m).train.lr)
    _, single = single_runs[m]
    _forget_rows_close(res["members"][i]["tasks"], single["tasks"])
  assert res["best"] == int(np.argmax([r["val_H"] for r in res["members"]]))
