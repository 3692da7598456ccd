"""Tests of continual forgetting: kswap_jax.continual, kswap_jax.heads and the forget job."""

import functools
import os
import random
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from kswap_jax import checkpoints, config_lib, heads, losses, npz, runner, train, workdir
from kswap_jax import lora as lora_lib
from kswap_jax.errors import UserError
from kswap_jax.methods import forget, forget_baselines
from kswap_jax.models import vit

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
K = 10


def _config(name, arg):
  return config_lib.load(os.path.join(CONFIGS, f"{name}.py"), arg)


@functools.lru_cache(maxsize=None)
def _net(kind="linear"):
  cfg = ml_collections.ConfigDict(dict(variant="Nano/2", num_classes=K))
  return heads.HeadNetwork(train.Network(vit.make_model(cfg), lora_scale=1 / 8), kind)


def _randomized(tree, seed, std):
  """`tree` with every leaf replaced by normal noise (numpy, so nothing compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(std * rng.normal(size=x.shape), jnp.float32), tree)


@functools.lru_cache(maxsize=None)
def _params():
  """Nano/2 params, every leaf random (the initial head is all zeros)."""
  return _randomized(vit.init_params(_net().base.model, jax.random.key(0), (8, 8, 1)), 1, 0.3)


@functools.lru_cache(maxsize=None)
def _random_lora():
  """A rank-4 LoRA whose A and B are both random (a fresh one has B = 0)."""
  return _randomized(lora_lib.init(jax.random.key(2), _params(), rank=4), 3, 0.2)


def _batch(seed, n=6):
  rng = np.random.default_rng(seed)
  return {"images": jnp.asarray(rng.integers(0, 256, (n, 8, 8, 1)), jnp.uint8),
          "labels": jnp.asarray(rng.integers(0, K, n), jnp.int32)}


@functools.lru_cache(maxsize=None)
def _apply(kind="linear"):
  """Jitted (params, lora, images) -> (logits, embedding) of `_net(kind)`."""
  return jax.jit(functools.partial(_net(kind).apply, return_embedding=True))


HP = {"beta": 0.3, "bound": 4.0, "alpha": 0.01, "proto_bound": 2.0, "w_f": 0.1, "w_r": 0.2}


# --- task protocol ----------------------------------------------------------------------

def test_protocol_splits_follow_the_seeded_order():
  """The authors' order: Python's global random, seeded 1337, shuffles list(range(C))."""
  state = random.getstate()
  order = list(range(100))
  random.seed(1337)
  random.shuffle(order)
  random.setstate(state)
  tasks = forget.protocol(100, 20, 4)
  assert [list(t.forget) for t in tasks] == [order[80 - 20 * t:100 - 20 * t] for t in range(4)]
  assert [set(t.forget) for t in tasks] == [set(order[80 - 20 * t:100 - 20 * t])
                                            for t in range(4)]
  for t, task in enumerate(tasks):
    assert set(task.retain) == set(order[:80 - 20 * t])
    assert set(task.old) == set(order[100 - 20 * t:])
    assert sorted(task.forget + task.retain + task.old) == list(range(100))
  assert forget.protocol(10, 2, 4, seed=3) != forget.protocol(10, 2, 4, seed=4)
  with pytest.raises(UserError, match="do not fit"):
    forget.protocol(10, 5, 2)


def test_explicit_tasks():
  a, b = forget.explicit([[3, 5], [1]], 6)
  assert (a.forget, a.retain, a.old) == ((3, 5), (0, 1, 2, 4), ())
  assert (b.forget, b.retain, b.old) == ((1,), (0, 2, 4), (3, 5))
  with pytest.raises(UserError, match="repeats"):
    forget.explicit([[3], [3]], 6)
  with pytest.raises(UserError, match="no class to retain"):
    forget.explicit([[0, 1], [2]], 3)


def test_task_value_and_method_errors():
  assert forget.task_value(0.5, 3, "b") == 0.5
  assert forget.task_value([0.1, 0.2], 1, "b") == pytest.approx(0.2)
  with pytest.raises(UserError, match="no entry for task 2"):
    forget.task_value([0.1, 0.2], 2, "weights.beta")
  with pytest.raises(UserError, match="method='sgd'"):
    forget.get_method("sgd")


def test_per_task_weights_and_carry_checked():
  w = ml_collections.ConfigDict(dict(beta=[0.3, 0.4], bound=105.0, alpha=1e-4,
                                     proto_bound=50.0, w_f=[0.015, 0.06], w_r=0.0))
  with pytest.raises(UserError, match="config.weights lacks .*'l2_lambda'"):
    forget.task_weights(w, 1)
  w.update(forget_baselines.WEIGHTS)
  assert forget.task_weights(w, 1) == pytest.approx(dict(
      beta=0.4, bound=105.0, alpha=1e-4, proto_bound=50.0, w_f=0.06, w_r=0.0,
      **forget_baselines.WEIGHTS))
  w.w_f = [0.015]
  with pytest.raises(UserError, match=r"weights.w_f=\[0.015\] has no entry for task 1"):
    forget.task_weights(w, 1)


def _authors_sizes(labels, classes, data_ratio, few_shot_num):
  """Training-set sizes of the authors' branch: k per class, or int(len(set) * data_ratio)."""
  n = int(np.isin(labels, classes).sum())
  return len(classes) * few_shot_num if few_shot_num else int(n * data_ratio)


@pytest.mark.parametrize("name,arg,ratio", [("forget_digits", "", 0.1),
                                            ("forget_digits", "shots=4", None),
                                            ("forget_imagenet100", "", 0.05),
                                            ("forget_faces", "data=/faces", 0.1),
                                            ("forget_faces", "data=/faces,shots=4", None)])
def test_training_subsets_have_the_authors_sizes(name, arg, ratio):
  """Both training sets of a task are cut as train_own_forget_cl.py cuts them."""
  from kswap_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  c = _config(name, arg)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 20, 3000)
  src = sources.Source("x", "train", labels, [str(i) for i in range(20)], lambda i: None)
  for which, classes in (("retain", list(range(16))), ("forget", [16, 17, 18, 19])):
    spec = c.sets[which]
    ex = pipeline.select(src, classes, classes, image_size=8, channels=1,
                         fraction=spec.fraction, fraction_of=spec.fraction_of,
                         per_class=spec.per_class, seed=3)
    shots = 4 if ratio is None else 0
    assert len(ex) == _authors_sizes(labels, classes, ratio, shots)
    assert len(set(ex.indices.tolist())) == len(ex)
    assert set(labels[ex.indices]) <= set(classes)
    if shots:
      assert np.bincount(ex.labels, minlength=20)[classes].tolist() == [4] * len(classes)
  if name == "forget_faces" and ratio is None:
    assert c.train.batch_size == 4 and c.weights.proto_bound == 50.0
    assert list(c.weights.w_f) == [0.015, 0.06, 0.025, 0.012]


def test_paper_configs_keep_the_authors_weights():
  faces, imagenet = _config("forget_faces", "data=/faces"), _config("forget_imagenet100", "")
  for c in (faces, imagenet):
    assert c.weights.w_r == 0.0 and c.train.warmup_epochs == 0 and c.train.ema_decay == 0.0
    assert c.weights.bound == 105.0 and c.weights.alpha == 1e-4 and c.carry == "chosen"
  assert list(faces.weights.w_f) == [0.01] * 4 and imagenet.weights.w_f == 0.05
  ema = _config("forget_faces", "data=/faces,ema,carry=last")
  assert (ema.train.ema_decay, ema.train.ema_epoch, ema.carry) == (0.9, 30, "last")
  from kswap_jax import config_lib as cl  # pylint: disable=g-import-not-at-top
  assert imagenet.init.classes.split(",") == sorted(cl.IMAGENET100)


def test_weight_average_follows_the_epoch_updates():
  """ema = w_e at epoch ema_epoch, then decay * ema + (1 - decay) * w at each later epoch."""
  ws = [np.array([1.0, 2.0]), np.array([3.0, -1.0]), np.array([0.5, 0.5])]
  tree = lambda w: {"lora": {"x": jnp.asarray(w)}, "params": {}}  # noqa: E731
  state = {"trainable": tree(ws[0]), "best": {"trainable": tree([0.0, 0.0]), "h": -1.0},
           "ema": {"trainable": tree([9.0, 9.0]), "n": jnp.zeros((), jnp.int32)}}
  assert forget.candidate(state) is state["trainable"]
  want = ws[0]
  state = forget.average_weights(state, 0.9)
  for w in ws[1:]:
    state = forget.average_weights({**state, "trainable": tree(w)}, 0.9)
    want = 0.9 * want + 0.1 * w
  np.testing.assert_allclose(forget.candidate(state)["lora"]["x"], want, rtol=1e-6)
  assert int(state["ema"]["n"]) == 3
  kept = forget.keep_best(state, 50.0, forget.candidate(state))
  np.testing.assert_allclose(forget.chosen(kept)["lora"]["x"], want, rtol=1e-6)
  del state["best"]
  np.testing.assert_allclose(forget.chosen(state)["lora"]["x"], want, rtol=1e-6)


# --- losses -----------------------------------------------------------------------------

def test_prototype_kl_matches_reference_and_gradient():
  rng = np.random.default_rng(0)
  protos = rng.normal(size=(4, 5))
  emb = rng.normal(size=(3, 5))
  labels = np.array([2, 0, 2])
  p = np.exp(protos[labels]) / np.exp(protos[labels]).sum(-1, keepdims=True)
  q = np.exp(emb) / np.exp(emb).sum(-1, keepdims=True)
  want = (p * (np.log(p) - np.log(q))).sum(-1)
  got = forget.prototype_kl(jnp.asarray(protos), jnp.asarray(labels), jnp.asarray(emb))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(
      forget.prototype_kl(jnp.asarray(protos), jnp.asarray(labels),
                             jnp.asarray(protos[labels])), 0.0, atol=1e-6)
  grad = jax.grad(lambda e: forget.prototype_kl(jnp.asarray(protos), labels, e).sum())(
      jnp.asarray(emb))
  np.testing.assert_allclose(grad, q - p, rtol=1e-4, atol=1e-6)  # d KL / d logits = q - p


def test_method_losses_from_terms():
  t = {"ce_r": 1.0, "ce_f": 3.0, "forget": 2.0, "sparse": 10.0, "kl_r": 0.5, "kl_f": 1.5}
  assert forget.gs_lora_loss(t, HP) == pytest.approx(1.0 + 0.3 * 2.0 + 0.01 * 10.0)
  assert forget.gs_lora_pp_loss(t, HP) == pytest.approx(
      1.0 + 0.3 * 2.0 + 0.01 * 10.0 + 0.1 * (2.0 - 1.5) + 0.2 * 0.5)
  assert forget.retain_loss(t, HP) == 1.0
  assert forget.grad_ascent_loss(t, HP) == pytest.approx(1.0 - 0.3 * 3.0)
  assert forget.bounded_ascent_loss(t, HP) == pytest.approx(1.0 + 0.3 * 2.0)


@functools.lru_cache(maxsize=None)
def _loss_fn(name):
  """Jitted loss_fn of method `name` on `_net()`, block groups."""
  return jax.jit(forget.make_loss(forget.METHODS[name], _net(), "block"))


def _loss(name, hp, stage_step, protos=None):
  """(args, loss, terms, reference terms) of a method's loss on fixed R and F batches."""
  r, f = _batch(1), _batch(2)
  ctx = {"stage_step": jnp.asarray(stage_step, jnp.int32),
         "stage": {"alpha_warmup": jnp.asarray(2, jnp.int32)}}  # 2 warm-up steps
  if protos is not None:
    ctx["protos"] = protos
  args = ({"lora": _random_lora(), "params": {}}, _params(),
          {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()},
          {"retain": r, "forget": f, "ctx": ctx}, jax.random.key(0))
  loss, terms = _loss_fn(name)(*args)
  logits, emb = _apply()(_params(), _random_lora(), jnp.concatenate([r["images"], f["images"]]))
  ref = {"ce_r": losses.cross_entropy(logits[:6], r["labels"]),
         "ce_f": losses.cross_entropy(logits[6:], f["labels"]),
         "sparse": losses.group_sparse(_random_lora(), "block"), "emb_r": emb[:6]}
  return args, loss, terms, ref


def test_gs_lora_loss_against_reference_and_warmup():
  _, loss, terms, ref = _loss("gs_lora", HP, stage_step=5)
  for k in ("ce_r", "ce_f", "sparse"):
    np.testing.assert_allclose(terms[k], ref[k], rtol=1e-5)
  want = ref["ce_r"] + HP["beta"] * max(0.0, HP["bound"] - ref["ce_f"]) + HP["alpha"] * ref[
      "sparse"]
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  _, loss_warm, _, _ = _loss("gs_lora", HP, stage_step=1)  # alpha is 0 in the warm-up
  np.testing.assert_allclose(loss_warm, want - HP["alpha"] * ref["sparse"], rtol=1e-5)


def test_bounded_forget_has_no_gradient_once_the_bound_is_reached():
  args, _, terms, _ = _loss("gs_lora", {**HP, "bound": 0.0}, stage_step=5)
  assert float(terms["forget"]) == 0.0
  trainable, params, _, batches, _ = args
  g = jax.jit(jax.grad(lambda tr: _loss_fn("gs_lora")(tr, *args[1:])[0]))(trainable)

  def ref(tr):
    logits, _ = _apply()(params, tr["lora"], batches["retain"]["images"])
    return (losses.cross_entropy(logits, batches["retain"]["labels"])
            + HP["alpha"] * losses.group_sparse(tr["lora"], "block"))

  chex.assert_trees_all_close(g["lora"], jax.jit(jax.grad(ref))(trainable)["lora"], rtol=1e-4,
                              atol=1e-7)


def test_gs_lora_pp_and_grad_ascent_losses():
  protos = jax.random.normal(jax.random.key(3), (K, 32))
  args, loss, terms, ref = _loss("gs_lora_pp", HP, 5, protos=protos)
  labels_r = args[3]["retain"]["labels"]
  np.testing.assert_allclose(
      terms["kl_r"], forget.prototype_kl(protos, labels_r, ref["emb_r"]).mean(), rtol=1e-5)
  want = (ref["ce_r"] + HP["beta"] * max(0.0, HP["bound"] - ref["ce_f"])
          + HP["alpha"] * ref["sparse"] + HP["w_f"] * max(0.0, HP["proto_bound"] - terms["kl_f"])
          + HP["w_r"] * terms["kl_r"])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  _, loss, _, ref = _loss("grad_ascent", HP, 5)
  np.testing.assert_allclose(loss, ref["ce_r"] - HP["beta"] * ref["ce_f"], rtol=1e-5)


def test_prototypes_are_class_means():
  rng = np.random.default_rng(0)
  emb, labels = rng.normal(size=(7, 3)), np.array([0, 2, 2, 0, 1, 2, 1])
  mask = np.array([1, 1, 1, 1, 1, 0, 0], bool)
  sums, counts = forget.class_sums(jnp.asarray(emb), labels, mask, 4)
  protos = forget.prototypes(sums, counts)
  np.testing.assert_allclose(counts, [2, 1, 2, 0])
  for c in range(3):
    np.testing.assert_allclose(protos[c], emb[(labels == c) & mask].mean(0), rtol=1e-5)
  np.testing.assert_allclose(protos[3], 0.0)


# --- heads ------------------------------------------------------------------------------

def test_cosface_logits_and_margin_at_eval():
  rng = np.random.default_rng(0)
  emb, kernel, labels = rng.normal(size=(4, 6)), rng.normal(size=(6, 3)), np.array([0, 1, 2, 1])
  cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
      kernel / np.linalg.norm(kernel, axis=0, keepdims=True))
  got = heads.cosface(jnp.asarray(emb), jnp.asarray(kernel), None, scale=64.0, margin=0.35)
  np.testing.assert_allclose(got, 64 * cos, rtol=1e-5)
  got = heads.cosface(jnp.asarray(emb), jnp.asarray(kernel), labels, scale=64.0, margin=0.35)
  np.testing.assert_allclose(got, 64 * (cos - 0.35 * np.eye(3)[labels]), rtol=1e-5, atol=1e-5)

  net = _net("cosface")
  params = _params()
  batch = {**_batch(0, 16), "mask": jnp.ones(16, bool)}
  plain = train.correct_counts(net, K)(params, None, batch)
  quirk = train.correct_counts(net, K, pass_labels=True)(params, None, batch)
  assert int(quirk[0].sum()) <= int(plain[0].sum())
  np.testing.assert_array_equal(plain[1], quirk[1])
  with pytest.raises(UserError, match="head.kind"):
    heads.HeadNetwork(net.base, "arcface")


def test_linear_head_ignores_labels():
  net = _net()
  images, labels = _batch(0)["images"], jnp.zeros(6, jnp.int32)
  got = jax.jit(lambda p, x: net.apply(p, None, x, labels=labels))(_params(), images)
  np.testing.assert_allclose(got, _apply()(_params(), None, images)[0], rtol=1e-6)


# --- task transitions -------------------------------------------------------------------

def test_merge_then_new_lora_equals_the_merged_model():
  net, params, old = _net(), _params(), _random_lora()
  tx = train.make_optimizer()
  state = train.init_state(params, old, "", {"lr": 1.0, "weight_decay": 0.0, "beta": 0.2}, 0,
                           tx)
  state["best"] = {"trainable": state["trainable"], "h": jnp.asarray(50.0)}
  merged = forget.merged_model(state, net.lora_scale)
  fresh = lora_lib.init(jax.random.key(5), merged, rank=4, a_init="small")
  new = forget.start_task(state, merged, fresh, "", tx, {"beta": 0.25})
  images = _batch(3)["images"]
  want, _ = _apply()(params, old, images)
  np.testing.assert_allclose(_apply()(merged, None, images)[0], want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
      _apply()(train.full_params(new), new["trainable"]["lora"], images)[0], want, rtol=1e-4,
      atol=1e-5)
  assert jax.tree.structure(new) == jax.tree.structure(state)
  assert float(new["hparams"]["beta"]) == pytest.approx(0.25)
  assert float(new["best"]["h"]) == -1.0
  assert all(float(jnp.abs(ab["B"]).max()) == 0.0
             for ab in lora_lib.layers(new["trainable"]["lora"]).values())


def test_keep_best_and_group_report():
  state = {"trainable": {"lora": {"x": jnp.ones(2)}, "params": {}},
           "best": {"trainable": {"lora": {"x": jnp.zeros(2)}, "params": {}},
                    "h": jnp.asarray(10.0)}}
  assert forget.keep_best(state, 5.0) is state
  kept = forget.keep_best(state, 10.0)
  np.testing.assert_array_equal(forget.chosen(kept)["lora"]["x"], [1.0, 1.0])
  assert float(kept["best"]["h"]) == 10.0
  members = {"trainable": {"lora": {"x": jnp.ones((3, 2))}, "params": {}},
             "best": {"trainable": {"lora": {"x": jnp.zeros((3, 2))}, "params": {}},
                      "h": jnp.asarray([10.0, 10.0, 10.0])}}
  kept = forget.keep_best(members, np.array([9.0, 10.0, 11.0]))
  np.testing.assert_array_equal(kept["best"]["trainable"]["lora"]["x"], [[0, 0], [1, 1], [1, 1]])
  np.testing.assert_array_equal(kept["best"]["h"], [10.0, 10.0, 11.0])
  lora = {"Transformer": {f"encoderblock_{i}": {"MlpBlock_0": {"Dense_0": {
      "A": jnp.full((2, 1), v), "B": jnp.zeros((1, 2))}}} for i, v in enumerate([1.0, 0.0, 2.0])}}
  rep = forget.group_report(lora, "block")
  assert rep["near_zero"] == pytest.approx(1 / 3)
  assert rep["norms"]["encoderblock_2"] == pytest.approx(np.sqrt(8.0))


# --- the job ----------------------------------------------------------------------------

def _digits_config(every_steps: int = 0):
  """every_steps: the checkpoint interval; 0 (runs that resume nothing): at the ends of stages
  only."""
  c = _config("forget_digits", "runlocal")
  c.sets.retain.per_class = 4      # tasks of 4 and 3 steps: room to resume inside task 1
  c.checkpoint.every_steps = every_steps
  c.init.pretrain.checkpoint.every_steps = 0
  return c


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
  """(run dir, results) of a 2-task digits run; its step traces are counted in TRACES."""
  run_dir = str(tmp_path_factory.mktemp("forget_digits"))
  make_step = train.make_step

  def counted(*args, **kwargs):
    step = make_step(*args, **kwargs)

    def traced(state, batches):  # runs once per trace (compilation) of the jitted step
      TRACES.append("alpha_warmup" in state["stage"])  # a forget task's (not pretraining's)
      return step(state, batches)

    return traced

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, "make_step", counted)
    return run_dir, runner.run("forget", _digits_config(), run_dir)


TRACES = []


def test_tasks_of_different_sizes_share_one_compiled_step(digits_run):
  _, results = digits_run
  rows = results["tasks"]
  assert rows[0]["retain_images"] != rows[1]["retain_images"]  # different steps per task
  assert TRACES.count(True) == 1  # one trace of the forget step for both tasks


def test_digits_job_end_to_end(digits_run):
  run_dir, results = digits_run
  rows = results["tasks"]
  assert [r["task"] for r in rows] == [0, 1]
  assert rows[0]["forget_ids"] == [8, 9] and rows[1]["forget_ids"] == [4, 5]
  assert rows[1]["old_ids"] == [8, 9]
  c = _digits_config()
  from kswap_jax import builders  # pylint: disable=g-import-not-at-top
  labels = builders.source(c.data, "sklearn_digits", c.data.train_split).labels
  for r in rows:  # 4 retain images per class; int(0.1 n) forget images, as the authors cut
    assert r["retain_images"] == 4 * len(r["retain_ids"])
    assert r["forget_images"] == int(0.1 * np.isin(labels, r["forget_ids"]).sum())
  for r in rows:
    for key in ("acc_r", "acc_f", "acc_f_before", "acc_r_pre", "val_H"):
      assert 0.0 <= r[key] <= 100.0
    assert r["groups"]["near_zero"] >= 0.0 and len(r["groups"]["norms"]) == 2
    assert 0.0 < r["trainable_%"] < 100.0
  saved = workdir.read_json(os.path.join(run_dir, "results.json"))
  assert [r["H"] for r in saved["tasks"]] == [r["H"] for r in rows]
  for f in ("task_0/model/model.json", "task_1/model/model.json", "groups.png"):
    assert os.path.exists(os.path.join(run_dir, f))


def test_carry_last_changes_only_what_later_tasks_start_from(digits_run, tmp_path):
  """carry=last: task 0 trains and exports exactly what carry=chosen does (only what task 1
  starts from changes)."""
  run_dir, results = digits_run
  c = _digits_config()
  c.init.checkpoint = os.path.join(run_dir, "pretrain", "model")
  c.carry = "last"
  got = runner.run("forget", c, str(tmp_path))
  for key in ("acc_r", "acc_f", "acc_f_before", "val_H"):
    assert got["tasks"][0][key] == pytest.approx(results["tasks"][0][key])
  a, _ = checkpoints.load_model(str(tmp_path / "task_0" / "model"))
  b, _ = checkpoints.load_model(os.path.join(run_dir, "task_0", "model"))
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
  with pytest.raises(UserError, match="carry='best'"):
    c.carry = "best"
    runner.run("forget", c, str(tmp_path / "bad"))


def test_weight_averaging_run(digits_run, tmp_path):
  run_dir, _ = digits_run
  c = _digits_config()
  c.init.checkpoint = os.path.join(run_dir, "pretrain", "model")
  c.train.update(epochs=2, ema_decay=0.5, ema_epoch=0)
  got = runner.run("forget", c, str(tmp_path))
  assert [r["task"] for r in got["tasks"]] == [0, 1]
  assert all(0.0 <= r["val_H"] <= 100.0 for r in got["tasks"])


class _Interrupt(Exception):
  pass


def test_resume_mid_sequence_equals_an_uninterrupted_run(digits_run, tmp_path):
  run_dir, results = digits_run
  c = _digits_config(every_steps=1)
  c.init.checkpoint = os.path.join(run_dir, "pretrain", "model")
  save = checkpoints.Checkpoints.maybe_save

  def crash_after_step_5(self, step, state, force=False, iterator=None):
    save(self, step, state, force, iterator)
    if step == 5:  # inside task 1 (steps 5-7)
      self.manager.wait_until_finished()
      raise _Interrupt

  with mock.patch.object(checkpoints.Checkpoints, "maybe_save", crash_after_step_5):
    with pytest.raises(_Interrupt):
      runner.run("forget", c, str(tmp_path))
  rows = workdir.read_json(str(tmp_path / "results.json"))["tasks"]
  assert [r["task"] for r in rows] == [0, 1] and "H" in rows[0] and "H" not in rows[1]
  resumed = runner.run("forget", c, str(tmp_path))
  for a, b in zip(resumed["tasks"], results["tasks"]):
    for key in ("acc_r", "acc_f", "acc_o", "acc_f_before", "val_H"):
      np.testing.assert_allclose(a[key], b[key], equal_nan=True)
  got, _ = checkpoints.load_model(str(tmp_path / "task_1" / "model"))
  want, _ = checkpoints.load_model(os.path.join(run_dir, "task_1", "model"))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_imagenet100_config_runs_on_mock_data(tmp_path):
  cfg = ml_collections.ConfigDict(dict(variant="Nano/16", num_classes=100))
  model = vit.make_model(cfg)
  ckpt = str(tmp_path / "in100.npz")
  npz.save_npz(ckpt, vit.init_params(model, jax.random.key(0), (32, 32, 3)))
  c = _config("forget_imagenet100",
              f"runlocal,checkpoint={ckpt},per_task=20,num_tasks=1,method=retrain")
  with tfds.testing.mock_data(num_examples=400, policy=tfds.testing.MockPolicy.USE_CODE):
    results = runner.run("forget", c, str(tmp_path / "run"))
  assert [r["task"] for r in results["tasks"]] == [0]
  assert len(results["tasks"][0]["forget_ids"]) == 20
  assert results["tasks"][0]["trainable_%"] == pytest.approx(100.0)


def test_faces_config_runs_on_a_folder(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 4), ("val", 2), ("test", 2)):
    for person in range(6):
      d = tmp_path / "faces" / split / f"id{person}"
      d.mkdir(parents=True)
      for i in range(n):
        pixels = np.clip(rng.normal(40 * person, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f"{i}.png")
  c = _config("forget_faces", f"runlocal,data={tmp_path / 'faces'},classes=0-5,per_task=2,"
                              "num_tasks=1,method=gs_lora_pp")
  c.init.pretrain.checkpoint.every_steps = 0
  results = runner.run("forget", c, str(tmp_path / "run"))
  assert [r["task"] for r in results["tasks"]] == [0]
  assert c.head.kind == "cosface"
  with pytest.raises(UserError, match="needs data="):
    _config("forget_faces", "runlocal")


def test_missing_classes_are_measured_through_the_full_head(tmp_path):
  """A 1000-class file: the protocol keeps the ImageNet-100 rows, and the other classes' test
  images are classified over all 1000 outputs, as a plain forward of the file's model does."""
  from kswap_jax import builders  # pylint: disable=g-import-not-at-top
  from kswap_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(dict(variant="Nano/16", num_classes=1000, gelu="tanh"))
  model = vit.make_model(cfg)
  full = _randomized(vit.init_params(model, jax.random.key(0), (32, 32, 3)), 1, 0.3)
  ckpt = str(tmp_path / "in1k.npz")
  npz.save_npz(ckpt, full)
  c = _config("forget_imagenet100",
              f"runlocal,checkpoint={ckpt},per_task=20,num_tasks=1,method=gs_lora,missing")
  with tfds.testing.mock_data(num_examples=300, policy=tfds.testing.MockPolicy.USE_CODE):
    results = runner.run("forget", c, str(tmp_path / "run"))
    src = builders.source(c.data, "imagenet2012", c.data.test_split)
    kept = set(sources_ids := [src.class_names.index(n) for n in c.init.classes.split(",")])
    idx = [i for i in range(len(src.labels)) if int(src.labels[i]) not in kept]
    images = np.stack([pipeline.resize(src.image(i), 32, 3) for i in idx])
    labels = src.labels[idx]
  assert sources_ids == sorted(sources_ids)  # sorted WordNet ids = ascending label ids
  logits = model.apply({"params": full}, pipeline.normalize(images, c.data.mean, c.data.std))
  want = 100.0 * np.mean(np.argmax(np.asarray(logits), -1) == labels)
  assert results["pretrained"]["acc_missing"] == pytest.approx(want, abs=1e-6)
  assert 0.0 <= results["tasks"][0]["acc_missing"] <= 100.0
