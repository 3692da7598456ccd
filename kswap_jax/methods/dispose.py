"""`dispose`: Disposable Transfer Learning. Transfer a source-pretrained ViT to a target task,
then dispose of the source task; measure what is left with the piggyback-learning attack.

Stages: `transfer` (target CE, new target head, full fine-tune or LoRA) and `dispose`
(`target * CE_tgt + source term`), after which the released model keeps its target accuracy
but should be a poor starting point for re-learning the source task. Ours, not the paper's:
the DTL text gives the Gradient Collision idea, not its formula, so the GC below is our reading;
the normalised leakage and the PL budgets are our own. Source terms (config `method`):

  gc            gc * GC: a source batch is split into K sub-batches, g_k = d CE_src(B_k) / d
                theta (over the params chosen by a regex), GC = mean_{i != j} cos(g_i, g_j).
                The update differentiates through the K gradients (second order): by default
                with Hessian-vector products, one sub-batch at a time (`collision`).
  grad_ascent   ascent * relu(bound - CE_src): bounded gradient ascent on the source batch.
  random_label  random_label * CE_src(wrong labels): each source example gets a uniformly
                drawn wrong source class, fresh every step.
  none          no source term (plain target fine-tuning).

Source logits come from the frozen source head on the model's embedding, so the target head
and the source head never share rows. PL accuracy (`pl_attacker`): a fresh head on a model's
backbone, trained on a few labelled source (or new downstream) examples for a fixed budget,
either the head only ("linear") or everything ("full"); its test top-1 is the leakage. The
attacks (`pl.attacks`) run on the models of `pl.models`: the scrubbed model, the transferred
(unscrubbed) model and a randomly initialised one; with all three, results.json also holds the
normalised leakage (PL_scrubbed - PL_random) / (PL_unscrubbed - PL_random).

Writes workdir/results.json (target and source-head accuracy before training and after each
stage, PL accuracies), workdir/transferred (exported after the transfer stage) and
workdir/model (the released model: LoRA merged, target head). In a study the transfer stage is
shared by all members, which differ in the dispose stage's lr and loss weights.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kswap_jax import builders, checkpoints, heads, losses, metrics, recipe, sharding, train
from kswap_jax import lora as lora_lib
from kswap_jax import trees
from kswap_jax.data import pipeline
from kswap_jax.errors import UserError
from kswap_jax.models import vit
from kswap_jax.progress import say, table

METHODS = ("gc", "none", "grad_ascent", "random_label")
ATTACKS = {"linear": "head/.*", "full": ".*"}  # attack variant -> trainable-params regex
# Loss weights and the ascent bound, all arrays in state["hparams"].
HPARAMS = ("target", "gc", "ascent", "bound", "random_label")
FINETUNE = ("full", "lora")
PL_MODELS = ("scrubbed", "unscrubbed", "random")

Batch = dict[str, jax.Array]


def check_method(method: str) -> str:
  if method not in METHODS:
    raise UserError(f"method={method!r} is not allowed; use one of {METHODS}")
  return method


def split(batch: Batch, k: int) -> Batch:
  """Leaves (B, ...) -> (K, B / K, ...): K equal sub-batches."""
  size = jax.tree_util.tree_leaves(batch)[0].shape[0]
  if k < 2 or size % k:
    raise UserError(f"dispose.num_splits={k} must be >= 2 and divide the source batch size "
                    f"{size}")
  return jax.tree_util.tree_map(lambda x: x.reshape(k, size // k, *x.shape[1:]), batch)


def measured_paths(trainable, regex: str) -> list[str]:
  """Paths ("lora/..." or "params/...") of the trainable leaves that GC is measured on."""
  paths = list(trees.flatten(trainable))
  hits = trees.matching(paths, regex, "dispose.gc_params")
  if not hits:
    raise UserError(f"dispose.gc_params={regex!r} matches no trainable parameter; trainable "
                    f"paths are e.g. {paths[:3]}")
  return hits


GC_VJPS = ("hvp", "autodiff")


def check_gc_vjp(vjp: str) -> str:
  if vjp not in GC_VJPS:
    raise UserError(f"dispose.gc_vjp={vjp!r} is not allowed; use one of {GC_VJPS}")
  return vjp


def collision(ce_fn: Callable[..., jax.Array], measured, rest, const, sub_batches: Batch,
              similarity: str = "cosine", vjp: str = "hvp") -> tuple[jax.Array, jax.Array]:
  """(GC, mean source CE) of the K sub-batches, g_k = d ce_fn(measured, rest, const, B_k) /
  d measured.

  ce_fn(measured, rest, const, batch) -> scalar source CE of one sub-batch, a pure function:
    `measured` and `rest` are differentiated, `const` is not; sub_batches leaves (K, b, ...).
  vjp: how the update differentiates GC (second order) -- "hvp": a custom VJP that computes
    the g_k one sub-batch at a time and returns dGC/d(measured, rest) = sum_k H_k c_k, with
    c_k = dGC/dg_k in closed form (`losses.collision_weights`) and H_k c_k a forward-over-reverse
    Hessian-vector product, again one sub-batch at a time (no second-order residuals are
    stored); "autodiff": the K gradients by vmap(grad), differentiated by reverse mode.
  """
  check_gc_vjp(vjp)
  losses.check_similarity(similarity)
  if vjp == "hvp":
    return _hvp_collision(ce_fn, similarity, measured, rest, const, sub_batches)
  ce, grads = jax.vmap(jax.value_and_grad(ce_fn), in_axes=(None, None, None, 0))(
      measured, rest, const, sub_batches)
  return losses.gradient_collision(grads, similarity), ce.mean()


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _hvp_collision(ce_fn, similarity, measured, rest, const, sub_batches):
  return _hvp_collision_fwd(ce_fn, similarity, measured, rest, const, sub_batches)[0]


def _hvp_collision_fwd(ce_fn, similarity, measured, rest, const, sub_batches):
  _, (ce, grads) = jax.lax.scan(
      lambda _, b: (None, jax.value_and_grad(ce_fn)(measured, rest, const, b)), None,
      sub_batches)
  gram = losses.gram_matrix(grads)
  w = losses.collision_weights(gram, similarity)
  c = jax.tree_util.tree_map(lambda g: jnp.tensordot(w.astype(g.dtype), g, 1), grads)
  out = (losses.collision_from_gram(gram, similarity), ce.mean())
  return out, (measured, rest, const, sub_batches, c)


def _hvp_collision_bwd(ce_fn, similarity, res, cts):
  """d(gc_bar GC + ce_bar mean CE) / d(measured, rest) = sum_k gc_bar H_k c_k + ce_bar / K
  grad_k; H_k [c_k; 0] by jvp of the (measured, rest) gradient, which gives grad_k too."""
  del similarity
  measured, rest, const, sub_batches, c = res
  gc_bar, ce_bar = cts
  k = jax.tree_util.tree_leaves(c)[0].shape[0]

  def add(total, xs):
    batch, c_k = xs
    grad = jax.grad(ce_fn, argnums=(0, 1))
    g, hc = jax.jvp(lambda m: grad(m, rest, const, batch), (measured,), (c_k,))
    return jax.tree_util.tree_map(lambda t, a, b: t + gc_bar * b + (ce_bar / k) * a,
                                  total, g, hc), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, (measured, rest))
  total, _ = jax.lax.scan(add, zeros, (sub_batches, c))
  return (*total, None, None)


_hvp_collision.defvjp(_hvp_collision_fwd, _hvp_collision_bwd)


def _model_args(trainable, frozen) -> tuple[dict, dict]:
  """(params, lora) of a trainable tree that may lack an empty "lora" / "params" branch."""
  return trees.combine(frozen, trainable.get("params", {})), trainable.get("lora", {})


def _source_ce(net: train.Network) -> Callable[..., jax.Array]:
  """ce_fn(measured, rest, (frozen, source_head), batch) -> source CE of `batch` through the
  frozen source head on the model's embedding, in inference mode."""

  def ce_fn(measured, rest, const, b):
    frozen, source_head = const
    p, lo = _model_args(trees.combine(rest, measured), frozen)
    _, emb = net.apply(p, lo, b["images"], return_embedding=True)
    return losses.cross_entropy(heads.head_logits(emb, source_head), b["labels"])

  return ce_fn


def disposal_loss(net: train.Network, source_head, method: str, *, num_splits: int = 4,
                  gc_params: str = ".*", similarity: str = "cosine",
                  gc_vjp: str = "hvp") -> train.LossFn:
  """loss_fn(trainable, frozen, hparams, batches, rng) for `train.make_step`.

  batches: {"target": b[, "source": b]}, b = {"images": uint8 (B, H, W, C), "labels": (B,)};
    target labels index the target head, source labels the frozen `source_head` (D, K_src).
  Loss: target * CE_tgt + the method's source term (module docstring). GC is measured on the
  trainable leaves whose path ("lora/..." / "params/...") fully matches `gc_params`, with the
  source gradients taken in inference mode (no dropout); `gc_vjp` picks how GC is
  differentiated (`collision`).
  """
  check_method(method)
  check_gc_vjp(gc_vjp)
  source_ce = _source_ce(net)

  def loss_fn(trainable, frozen, hp, batches, rng):
    params, lora = _model_args(trainable, frozen)
    tgt = batches["target"]
    logits = net.apply(params, lora, tgt["images"], train=True, rng=rng)
    ce_t = losses.cross_entropy(logits, tgt["labels"])
    aux = {"ce_target": ce_t,
               "acc_target": jnp.mean(jnp.argmax(logits, -1) == tgt["labels"])}
    total = hp["target"] * ce_t
    if method == "none":
      return total, aux
    src = batches["source"]
    if method == "gc":
      rest, measured = trees.partition(trainable, gc_params)
      gc, ce_s = collision(source_ce, measured, rest, (frozen, source_head),
                           split(src, num_splits), similarity, gc_vjp)
      return total + hp["gc"] * gc, {**aux, "gc": gc, "ce_source": ce_s}
    _, emb = net.apply(params, lora, src["images"], train=True,
                       rng=jax.random.fold_in(rng, 1), return_embedding=True)
    src_logits = heads.head_logits(emb, source_head)
    ce_s = losses.cross_entropy(src_logits, src["labels"])
    if method == "grad_ascent":
      term = hp["ascent"] * losses.bounded_forget(src_logits, src["labels"], hp["bound"])
    else:
      n = src_logits.shape[-1]
      shift = jax.random.randint(jax.random.fold_in(rng, 2), src["labels"].shape, 1, n)
      term = hp["random_label"] * losses.cross_entropy(src_logits, (src["labels"] + shift) % n)
    return total + term, {**aux, "ce_source": ce_s}

  return loss_fn


def supervised_loss(net: train.Network) -> train.LossFn:
  """CE of batches {"images", "labels"} through the model's own head (LoRA-free)."""

  def loss_fn(trainable, frozen, hp, batches, rng):
    del hp
    logits = net.apply(trees.combine(frozen, trainable["params"]), None, batches["images"],
                       train=True, rng=rng)
    return losses.cross_entropy(logits, batches["labels"]), {}

  return loss_fn


def pl_attacker(net: train.Network, train_set: pipeline.ExampleSet,
                test_set: pipeline.ExampleSet, *, variant: str, steps: int, lr: float,
                batch_size: int, weight_decay: float, eval_batch_size: int, mesh,
                seed: int) -> Callable[[dict], float]:
  """attack(params) -> PL accuracy (test top-1 %) of one attack variant.

  `net.model` has one output per PL class. attack() gives `params` (a LoRA-free ViT, any
  head) a fresh head and trains `steps` AdamW steps (cosine from `lr` to 1e-3 lr) on
  `train_set`: the head only ("linear") or all params ("full"). The compiled step is shared
  by every call, so the scrubbed, unscrubbed and random models cost one compilation.
  """
  if variant not in ATTACKS:
    raise UserError(f"pl.attacks has {variant!r}; allowed: {sorted(ATTACKS)}")
  tx = train.make_optimizer()
  schedule = lambda s: train.lr_factor(s["stage_step"], total_steps=steps)  # noqa: E731
  step = sharding.compile_step(
      train.make_step(supervised_loss(net), tx, schedule, net.rng_impl), mesh)
  sampler = pipeline.EpochSampler(len(train_set), batch_size, seed)
  batch_sharding = sharding.data_sharding(mesh)
  counts = train.correct_counts(net, net.model.num_classes)

  def attack(params) -> float:
    params = heads.reset_head(params, net.model.num_classes, jax.random.key(seed))
    state = train.init_state(params, None, ATTACKS[variant],
                             {"lr": lr, "weight_decay": weight_decay}, seed, tx, net.rng_impl)
    state = jax.device_put(state, sharding.replicated(mesh), may_alias=False)  # step donates it
    for s in range(steps):
      state, _ = step(state, pipeline.batch(train_set, sampler.positions(s), batch_sharding))
    correct, count = train.evaluate(counts, train.full_params(state), None, test_set,
                                    eval_batch_size, mesh)
    return metrics.set_accuracy(correct, count)

  return attack


def leakage(pl_scrubbed: float, pl_unscrubbed: float, pl_random: float) -> float:
  """(PL_scrubbed - PL_random) / (PL_unscrubbed - PL_random): 1 = nothing disposed, 0 = the
  random-init floor; NaN when the unscrubbed model is no better than random."""
  gap = pl_unscrubbed - pl_random
  return float((pl_scrubbed - pl_random) / gap) if gap > 1e-9 else float("nan")


def _with_classes(model_cfg, n: int) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(model_cfg.to_dict())
  out.num_classes = n
  return out


class Recipe(recipe.Recipe):
  """Transfer (shared by a study's members), then dispose; PL attacks on the released model.

  A study varies the dispose stage's lr and source-term weights; its score is validation
  target accuracy - 100 x mean leakage.
  """
  name = "dispose"
  sweepable = ("train.lr.dispose", *(f"weights.{k}" for k in HPARAMS if k != "target"))
  score_text = "val target acc - 100 x max(mean PL leakage, 0)"
  pareto = (("target_acc", "target accuracy"), ("leakage", "PL leakage"), None)

  def __init__(self, config, run_dir, init, mesh):
    super().__init__(config, run_dir, init, mesh)
    self.method = check_method(config.method)
    if config.finetune not in FINETUNE:
      raise UserError(f"finetune={config.finetune!r} is not allowed; use one of {FINETUNE}")
    pl_models = tuple(config.pl.models)
    if not pl_models or set(pl_models) - set(PL_MODELS):
      raise UserError(f"pl.models={pl_models} is not allowed; name some of {PL_MODELS}")
    self.columns = ("target_acc", "source_acc", "val_target_acc",
                    *(f"pl_{v}" for v in config.pl.attacks), "leakage")
    data = config.data
    params, model_cfg, src_labels = builders.initial_model(config, init)
    self.labels = builders.label_space(data, config.target.dataset, config.target.classes,
                                       "target.classes")
    pl_labels = builders.label_space(data, config.pl.data.dataset, config.pl.data.classes,
                                     "pl.data.classes")
    self.source_head = jax.device_put(params["head"], sharding.replicated(mesh))
    self.params = heads.reset_head(params, len(self.labels), jax.random.key(config.seed + 1))
    self.model_cfg = _with_classes(model_cfg, len(self.labels))
    self.pl_cfg = _with_classes(model_cfg, len(pl_labels))
    self.sets = {"target": self._examples(config.target, self.labels, "target"),
                 "source": self._examples(config.source, src_labels, "source"),
                 "pl": self._examples(config.pl.data, pl_labels, "pl")}
    self.net = builders.network(config, self.model_cfg)
    net_src = builders.network(config, _with_classes(model_cfg, len(src_labels)))
    tcfg = config.train
    self.samplers = (
        pipeline.EpochSampler(len(self.sets["target"]["train"]), tcfg.batch_size, config.seed),
        pipeline.EpochSampler(len(self.sets["source"]["train"]),
                              config.dispose.source_batch_size, config.seed + 7))
    self.counts = {"target": train.correct_counts(self.net, len(self.labels)),
                   "source": train.correct_counts(net_src, len(src_labels))}

  def _examples(self, spec, labels, name) -> dict[str, pipeline.ExampleSet]:
    """{"train", "test"[, "val"]} sets of a set spec; spec.test_split overrides
    data.test_split; "val" (target and source) with data.val_split."""
    data = self.config.data
    out = {"train": builders.example_set(data, spec, data.train_split, labels, name,
                                         subset=True),
           "test": builders.example_set(data, spec, spec.get("test_split") or data.test_split,
                                        labels, name, subset=False)}
    if data.get("val_split") and name != "pl":
      out["val"] = builders.example_set(data, spec, builders.split_of(data, spec, "val"),
                                        labels, name, subset=False)
    return out

  def initial_state(self, config):
    lora = None
    if config.finetune == "lora":
      lora = lora_lib.init(jax.random.key(config.seed + 2), self.params, rank=config.lora.rank,
                           targets=config.lora.targets, a_init=config.lora.a_init)
    hparams = {"lr": config.train.lr.transfer, "weight_decay": config.train.weight_decay,
               **{k: config.weights[k] for k in HPARAMS}}
    state = train.init_state(self.params, lora, "head/.*" if lora else ".*", hparams,
                             config.seed, self.tx, self.rng_impl)
    if self.method == "gc":
      measured_paths(state["trainable"], config.dispose.gc_params)
    return state

  def batches(self, s: int, with_source: bool) -> dict:
    """Stage step s: {"target": batch[, "source": batch]} on the mesh."""
    tgt, src = self.samplers
    put = sharding.data_sharding(self.mesh)
    out = {"target": pipeline.batch(self.sets["target"]["train"], tgt.positions(s), put)}
    if with_source:
      out["source"] = pipeline.batch(self.sets["source"]["train"], src.positions(s), put)
    return out

  def loss(self, kind: str) -> train.LossFn:
    """Loss of stage `kind`: target CE, plus the method's source term in "dispose"."""
    dcfg = self.config.dispose
    return disposal_loss(self.net, self.source_head, self.method if kind == "dispose" else "none",
                         num_splits=dcfg.num_splits, gc_params=dcfg.gc_params,
                         similarity=dcfg.similarity, gc_vjp=dcfg.get("gc_vjp", "hvp"))

  def stages(self):
    per_epoch = self.samplers[0].steps_per_epoch
    steps = {k: self.config.train.epochs[k] * per_epoch for k in ("transfer", "dispose")}
    return [
        recipe.Stage("transfer", steps["transfer"], self.loss("transfer"),
                     functools.partial(self.batches, with_source=False),
                     end_ratio=lambda c: c.train.lr_end / c.train.lr.transfer,
                     steps_per_epoch=per_epoch, end=self.end_transfer, shared=True),
        recipe.Stage("dispose", steps["dispose"], self.loss("dispose"),
                     functools.partial(self.batches, with_source=self.method != "none"),
                     end_ratio=lambda c: c.train.lr_end / c.train.lr.dispose,
                     steps_per_epoch=per_epoch, begin=self.start_dispose,
                     end=self.end_dispose)]

  def start(self, member, state):
    results = member.results
    results.update(method=self.method, finetune=self.config.finetune,
                   examples={k: {"train": len(v["train"]), "test": len(v["test"])}
                             for k, v in self.sets.items()})
    results.setdefault("evals", [])
    if member.export:
      say(f"dispose ({self.method}, {self.config.finetune}): source "
          f"{len(self.sets['source']['train'])} / target {len(self.sets['target']['train'])} / "
          f"PL {len(self.sets['pl']['train'])} train images; trainable "
          f"{lora_lib.count(state['trainable']):,} parameters")
    if not any(r["after"] == "pretrained" for r in results["evals"]):
      self.evaluate(member, state, "pretrained")

  def start_dispose(self, member, state):
    """The dispose stage's start: fresh optimizer moments, the member's lr and weights."""
    c = member.config
    hp = {**state["hparams"], "lr": jnp.float32(c.train.lr.dispose),
          **{k: jnp.float32(c.weights[k]) for k in HPARAMS}}
    return {**state, "opt": self.tx.init(state["trainable"]), "hparams": hp}

  def evaluate(self, member, state, when: str) -> None:
    """Target and source-head top-1 (%) on the test (and validation) sets."""
    params, lora = train.full_params(state), state["trainable"]["lora"]
    bs = self.config.data.eval_batch_size
    row = {"after": when}
    for which, prefix in (("test", ""), ("val", "val_")):
      if which not in self.sets["target"]:
        continue
      for name, head in (("target", params["head"]), ("source", self.source_head)):
        correct, count = train.evaluate(self.counts[name], {**params, "head": head}, lora,
                                        self.sets[name][which], bs, self.mesh)
        row[f"{prefix}{name}_acc"] = metrics.set_accuracy(correct, count)
    results = member.results
    results["evals"] = [r for r in results["evals"] if r["after"] != when] + [row]
    member.save()
    if member.export:
      say(table(results["evals"], ["after", "target_acc", "source_acc"]))

  @staticmethod
  def report(results):
    out = table(results["evals"], ["after", "target_acc", "source_acc"])
    models = [m for m in PL_MODELS if any(m in r for r in results.get("pl", {}).values())]
    if models:
      out += "\n" + table([{"attack": a, **r} for a, r in results["pl"].items()],
                          ["attack", *models, "leakage"], "{:.3f}")
    return out

  @functools.cached_property
  def attacks(self) -> dict[str, Callable[[dict], float]]:
    """{attack variant: attack(params) -> PL accuracy %}, each compiled once."""
    pl, config = self.config.pl, self.config
    net = builders.network(config, self.pl_cfg)
    return {variant: pl_attacker(net, self.sets["pl"]["train"], self.sets["pl"]["test"],
                                 variant=variant, steps=pl[variant].steps, lr=pl[variant].lr,
                                 batch_size=pl.batch_size, weight_decay=pl.weight_decay,
                                 eval_batch_size=config.data.eval_batch_size, mesh=self.mesh,
                                 seed=config.seed + 11)
            for variant in pl.attacks}

  def end_transfer(self, member, state) -> None:
    """Measures the transferred model and attacks the reference models (unscrubbed, random)."""
    self.evaluate(member, state, "transfer")
    transferred = self.released(state)
    if member.export:
      checkpoints.export_model(member.path("transferred"), transferred, self.model_cfg,
                               self.labels.to_json())
    build = {"unscrubbed": lambda: transferred,
             "random": lambda: vit.init_params(
                 self.net.model, jax.random.key(self.config.seed + 3),
                 (self.config.data.image_size,) * 2 + (self.config.data.channels,))}
    models = [m for m in self.config.pl.models if m in build]
    member.results["pl"] = {v: {m: attack(build[m]()) for m in models}
                            for v, attack in self.attacks.items()}
    member.save()

  def end_dispose(self, member, state) -> None:
    """Measures and exports the released model, and attacks it."""
    self.evaluate(member, state, "dispose")
    scrubbed = self.released(state)
    if member.export:
      checkpoints.export_model(member.path("model"), scrubbed, self.model_cfg,
                               self.labels.to_json(), extra={"method": self.method})
    pl = member.results["pl"]
    for variant, attack in self.attacks.items():
      acc = pl[variant]
      if "scrubbed" in self.config.pl.models:
        acc["scrubbed"] = attack(scrubbed)
      if set(PL_MODELS) <= set(acc):
        acc["leakage"] = leakage(acc["scrubbed"], acc["unscrubbed"], acc["random"])
    member.save()
    if member.export:
      say(table([{"attack": a, **r} for a, r in pl.items()],
                ["attack", *self.config.pl.models, "leakage"], "{:.3f}"))

  def released(self, state):
    return lora_lib.merge(train.full_params(state), state["trainable"]["lora"],
                          self.net.lora_scale)

  def row(self, member):
    results = member.results
    last = results["evals"][-1]
    row = {k: v for k, v in last.items() if k != "after"}
    for variant, acc in results["pl"].items():
      row.update({f"pl_{variant}": acc.get("scrubbed", float("nan")),
                  f"pl_unscrubbed_{variant}": acc.get("unscrubbed", float("nan")),
                  f"pl_random_{variant}": acc.get("random", float("nan")),
                  f"leakage_{variant}": acc.get("leakage", float("nan"))})
    leaks = [x for x in (row[f"leakage_{v}"] for v in results["pl"]) if x == x]
    row["leakage"] = float(np.mean(leaks)) if leaks else float("nan")
    return row

  def score(self, row):
    """Validation target accuracy - 100 x mean leakage, the leakage clipped at 0 (ours): PL
    below the random-init model's is no better than the random model."""
    leak = row["leakage"]
    return row["val_target_acc"] - (100 * max(leak, 0.0) if leak == leak else 0.0)

  def evaluate_model(self, member, state):
    """Target top-1, and source top-1 through the starting model's source head (leakage
    needs the reference models of a run: see its results.json)."""
    self.evaluate(member, state, "model")
    return table(member.results["evals"], ["after", "target_acc", "source_acc"])
