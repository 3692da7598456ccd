"""`forget`: continual forgetting with GS-LoRA, GS-LoRA++ or a baseline (`config.method`).

  kswap forget --config configs/forget_digits.py --workdir runs/forget_digits
  kswap forget --config configs/forget_digits.py:method=gs_lora_pp --workdir runs/forget_pp

A run is a sequence of tasks. Task t forgets the classes F_t, keeps R_t (every class not yet
forgotten), and only measures the classes O_t forgotten by earlier tasks, which get no signal.
Class ids are indices into the model's label space. Each method is a loss on a few batch
terms plus a `Method` entry (what trains, its lr):

  gs_lora              CE(R) + beta * relu(BND - CE(F)) + alpha * S           LoRA
  gs_lora_pp           gs_lora + w_f * relu(BND_pro - KL_F) + w_r * KL_R      LoRA
  retrain              CE(R), from a freshly initialised model                 all params
  finetune             CE(R)                                                   all but head
  grad_ascent          CE(R) - beta * CE(F)                                    all but head
  grad_ascent_bounded  CE(R) + beta * relu(BND - CE(F))                        all but head
  l2, ewc, mas, lwf, der, der_pp, fdr, scrub, scrub_s, lirf: the authors' continual-learning
  and unlearning baselines (`kswap_jax.methods.forget_baselines`)              all but head

S: group-sparse penalty on the LoRA (`losses.group_sparse`); alpha is 0 during the first
`warmup_epochs` of a task (0 in the paper configs: the authors' scripts keep alpha from the
start). KL_R, KL_F: batch means of KL(softmax(proto[y]) || softmax(emb)), proto = the class's
mean embedding under the model at the start of the task. Every weight (beta, bound, alpha,
proto_bound, w_f, w_r) is a number or a list with one value per task. A baseline is
`loss(terms: Terms, hparams: HParams) -> scalar` plus a `Method` in METHODS;
`config.method` then selects it. A baseline's own state (teacher, penalty, weight average)
lives in the train state, so it resumes, stacks per member in a study and shards like the
params; its settings are `config.baselines` and its weights `config.weights`.

One stage per task. Its begin folds the previous task's carried LoRA (and trained params) into
the model, measures that model ("before"), computes class prototypes if the method uses them,
and starts a fresh LoRA and optimizer state; its end merges the task's chosen LoRA, exports the
model to workdir/task_{t}/model and measures it. Model selection (`select_best`): every
`eval_every_epochs` epochs and at a task's last step the current LoRA is scored by H on the
validation split (data.val_split; R and F of the task) and the best one is kept in the state
(a LoRA whose H is below -1, one that made forgetting worse than doing nothing, is never
kept); otherwise a task ends with its last LoRA. The test split is never used for selection.

`carry`: which LoRA the next task starts from. "chosen" (ours, the default): the task's chosen
(released) one. "last": the last step's, as the authors' code does (it carries the model of
the last epoch into the next task and saves the best one apart; train_own_forget_cl.py), while
the task still reports and exports its chosen one.
Weight averaging (`train.ema_decay` > 0, the authors' `--average_weight`): after each epoch e
>= `train.ema_epoch` of a task, ema = decay * ema + (1 - decay) * weights (ema = weights at
e = ema_epoch, per epoch, as engine_cl / train_own_forget_cl.py do); from then on the average
is the model that selection scores and that a task without selection ends with. (The authors'
code only evaluates its average beside the trained model; keeping it is ours.)

Missing-class evaluation (`missing_classes`, the authors' ImageNet open setting): when the
model starts from a pretrained file whose head covers every class of `init.dataset` (1000
ImageNet classes) while the protocol keeps some of them, the test images of the other classes
("rest", or a class list) are classified by the task's model with the file's full head put
back, top-1 over all classes (train_own_forget_cl.py, "imagenet-val-miss": resume_head, then
eval on the 900 classes outside ImageNet-100). Reported as `acc_missing`, for the pretrained
model and after each task.

Writes workdir/results.json (per task: Acc_r, Acc_f before and after, Acc_o, H, the accuracy
on every class forgotten so far, the pretrained model's Acc_r, trainable share, LoRA group
norms, and with a validation split val_H, the validation H of the model the task ends with)
and workdir/groups.png.
"""
from __future__ import annotations

import dataclasses
import functools
import random
from typing import Any, Callable, TypedDict

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

from kswap_jax import builders, checkpoints, heads, losses, recipe, sharding, train, trees, workdir
from kswap_jax import lora as lora_lib
from kswap_jax.data import pipeline, sources
from kswap_jax.errors import UserError
from kswap_jax.methods import forget_baselines as fb
from kswap_jax.metrics import h_mean, set_accuracy
from kswap_jax.models import vit
from kswap_jax.progress import say, table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

# Loss weights and bounds, all float32 arrays in state["hparams"] (a study may vmap them).
HPARAMS = ("beta", "bound", "alpha", "proto_bound", "w_f", "w_r", *fb.WEIGHTS)
PROTOCOL_SEED = 1337
CARRY = ("chosen", "last")  # the LoRA a task hands to the next (module docstring)
NEAR_ZERO = 1e-3  # a group is "near zero" below this fraction of the largest group norm
COLUMNS = ["task", "forget", "acc_r_pre", "acc_r", "acc_f_before", "acc_f", "acc_o", "H",
           "trainable_%"]
ACCS = ("acc_r", "acc_f", "acc_o")  # retained, forgotten by this task, by earlier ones


@dataclasses.dataclass(frozen=True)
class Task:
  """Label-space class ids of one forgetting request."""
  forget: tuple[int, ...]
  retain: tuple[int, ...]
  old: tuple[int, ...]


def protocol(num_classes: int, per_task: int, num_tasks: int,
             seed: int = PROTOCOL_SEED) -> list[Task]:
  """Seeded class order; task t forgets order[C - N(t+1) : C - Nt], retains order[: C - N(t+1)].

  The order is the authors': Python's `random.seed(seed); random.shuffle(list(range(C)))`
  (bjzhb666/GS-LoRA train/train_own_forget_cl.py, "create order list").
  """
  if per_task < 1 or num_tasks < 1 or per_task * num_tasks >= num_classes:
    raise UserError(f"tasks: {num_tasks} tasks of {per_task} classes do not fit {num_classes} "
                    f"classes; need per_task * num_tasks < {num_classes} so some class is kept")
  order = list(range(num_classes))
  random.Random(seed).shuffle(order)
  out = []
  for t in range(num_tasks):
    lo, hi = num_classes - per_task * (t + 1), num_classes - per_task * t
    out.append(Task(tuple(order[lo:hi]), tuple(order[:lo]), tuple(order[hi:])))
  return out


def explicit(forget: list[list[int]], num_classes: int) -> list[Task]:
  """Tasks from explicit forget lists; R_t is every class not forgotten by tasks <= t."""
  out, gone = [], []
  for t, classes in enumerate(forget):
    again = sorted(set(classes) & set(gone))
    if again:
      raise UserError(f"tasks.forget[{t}] repeats classes {again} forgotten by an earlier task")
    dropped = set(gone) | set(classes)
    retain = tuple(c for c in range(num_classes) if c not in dropped)
    if not retain:
      raise UserError(f"tasks.forget[{t}] leaves no class to retain; keep at least one")
    out.append(Task(tuple(classes), retain, tuple(gone)))
    gone += list(classes)
  return out


def task_value(values, t: int, name: str) -> float:
  """Per-task value: a number, or the t-th entry of a list."""
  if isinstance(values, (int, float)):
    return float(values)
  if t >= len(values):
    raise UserError(f"{name}={list(values)} has no entry for task {t}; give one value per task "
                    f"or a single number")
  return float(values[t])


def task_weights(weights: ml_collections.ConfigDict, t: int) -> dict[str, float]:
  """Task t's value of every loss weight in HPARAMS."""
  missing = [h for h in HPARAMS if h not in weights]
  if missing:
    raise UserError(f"config.weights lacks {missing}; add them (the baselines' defaults: "
                    "forget_baselines.weights(method))")
  return {h: task_value(weights[h], t, f"weights.{h}") for h in HPARAMS}


# --- losses ------------------------------------------------------------------------------

class Terms(TypedDict, total=False):
  """Batch terms a method's loss reads, each a scalar (), computed by `make_loss`."""
  ce_r: jax.Array     # mean cross-entropy on the retain batch
  ce_f: jax.Array     # mean cross-entropy on the forget batch
  forget: jax.Array   # losses.bounded_forget on the forget batch: relu(bound - CE(F))
  sparse: jax.Array   # losses.group_sparse of the LoRA
  kl_r: jax.Array     # mean prototype_kl on the retain batch (methods with prototypes)
  kl_f: jax.Array     # mean prototype_kl on the forget batch (methods with prototypes)
  # A baseline adds its own (forget_baselines.*_terms): ce_w, penalty, kd_r, der, fdr,
  # kl_r_t, kl_f_t, smooth, max_step, at, kp.


class HParams(TypedDict):
  """A member's loss weights, float32 scalars () (stacked (N,) in a study, vmapped away)."""
  beta: jax.Array         # forget-loss weight
  bound: jax.Array        # BND of the bounded forget loss
  alpha: jax.Array        # group-sparse weight (0 during the warm-up epochs)
  proto_bound: jax.Array  # BND_pro of the prototype forget term
  w_f: jax.Array          # prototype forget weight
  w_r: jax.Array          # prototype retain weight
  # and every baseline weight of forget_baselines.WEIGHTS (l2_lambda, ..., lirf_alpha)


def prototype_kl(protos: jax.Array, labels: jax.Array, emb: jax.Array) -> jax.Array:
  """KL(softmax(protos[labels]) || softmax(emb)) per sample: (K, D), (B,), (B, D) -> (B,)."""
  log_p = jax.nn.log_softmax(protos[labels], -1)
  log_q = jax.nn.log_softmax(emb, -1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)


def gs_lora_loss(t: Terms, hp: HParams) -> jax.Array:
  """GS-LoRA: CE(R) + beta * relu(BND - CE(F)) + alpha * S -> ()."""
  return t["ce_r"] + hp["beta"] * t["forget"] + hp["alpha"] * t["sparse"]


def gs_lora_pp_loss(t: Terms, hp: HParams) -> jax.Array:
  """GS-LoRA++: gs_lora_loss + w_f * relu(BND_pro - KL_F) + w_r * KL_R -> ()."""
  return (gs_lora_loss(t, hp) + hp["w_f"] * jax.nn.relu(hp["proto_bound"] - t["kl_f"])
          + hp["w_r"] * t["kl_r"])


def retain_loss(t: Terms, hp: HParams) -> jax.Array:
  """CE(R) -> () (retraining, fine-tuning)."""
  del hp
  return t["ce_r"]


def grad_ascent_loss(t: Terms, hp: HParams) -> jax.Array:
  """CE(R) - beta * CE(F) -> ()."""
  return t["ce_r"] - hp["beta"] * t["ce_f"]


def bounded_ascent_loss(t: Terms, hp: HParams) -> jax.Array:
  """CE(R) + beta * relu(BND - CE(F)) -> ()."""
  return t["ce_r"] + hp["beta"] * t["forget"]


@dataclasses.dataclass(frozen=True)
class Method:
  """loss(terms, hparams) -> scalar, and what the method trains.

  lora: train a fresh LoRA per task (merged after it); trainable: regex of base params trained
  directly (or depth -> regex); from_scratch: re-initialise the model before each task;
  prototypes: the loss reads class prototypes; lr: its default learning rate (1e-2 for LoRA
  and 1e-4 for fine-tuning, as in the papers; 2e-3 to train from scratch; a baseline's from
  the authors' script), which the configs read. Baselines: terms(View) -> extra Terms;
  teacher: keeps the pretrained trainable params in state["teacher"]; importance: "l2" |
  "ewc" | "mas", a quadratic penalty in state["reg"] gaining a term at every task start;
  swa: a weight average in state["swa"]; alternate: SCRUB's max / min schedule; block: the
  loss reads the tokens after this block (View.mid).
  """
  loss: Callable[[Terms, HParams], jax.Array]
  lr: float
  lora: bool = False
  trainable: str | Callable[[int], str] = ""
  from_scratch: bool = False
  prototypes: bool = False
  terms: Callable[[fb.View], dict] | None = None
  teacher: bool = False
  importance: str = ""
  swa: bool = False
  alternate: bool = False
  block: bool = False


NOT_HEAD = r"(?!head/).*"
_CL = dict(trainable=NOT_HEAD, teacher=True)  # the baselines' common fields
METHODS = {
    "gs_lora": Method(gs_lora_loss, 1e-2, lora=True),
    "gs_lora_pp": Method(gs_lora_pp_loss, 1e-2, lora=True, prototypes=True),
    "retrain": Method(retain_loss, 2e-3, trainable=".*", from_scratch=True),
    "finetune": Method(retain_loss, 1e-4, trainable=NOT_HEAD),
    "grad_ascent": Method(grad_ascent_loss, 1e-4, trainable=NOT_HEAD),
    "grad_ascent_bounded": Method(bounded_ascent_loss, 1e-4, trainable=NOT_HEAD),
    # lr: scripts/run_cl_forget.sh, the 4-task runs (`for lr in ...`)
    "l2": Method(fb.reg_loss("l2_lambda"), 1e-4, trainable=NOT_HEAD, terms=fb.reg_terms,
                 importance="l2"),
    "ewc": Method(fb.reg_loss("ewc_lambda"), 1e-4, trainable=NOT_HEAD, terms=fb.reg_terms,
                  importance="ewc"),
    "mas": Method(fb.reg_loss("mas_lambda"), 1e-4, trainable=NOT_HEAD, terms=fb.reg_terms,
                  importance="mas"),
    "lwf": Method(fb.lwf_loss, 1e-4, terms=fb.lwf_terms, **_CL),
    "der": Method(fb.der_loss, 1e-3, terms=fb.der_terms, **_CL),
    "der_pp": Method(fb.der_pp_loss, 1e-3, terms=fb.der_terms, **_CL),
    "fdr": Method(fb.fdr_loss, 1e-3, terms=fb.fdr_terms, **_CL),
    "scrub": Method(fb.scrub_loss, 1e-4, terms=fb.scrub_terms, swa=True, alternate=True,
                    **_CL),
    "scrub_s": Method(fb.scrub_loss, 1e-4, terms=fb.scrub_terms, swa=True, alternate=True,
                      **_CL),
    "lirf": Method(fb.lirf_loss, 1e-4, trainable=fb.lirf_trainable, terms=fb.lirf_terms,
                   teacher=True, block=True),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise UserError(f"method={name!r} is not allowed; use one of {sorted(METHODS)}")
  return METHODS[name]


def make_loss(method: Method, net, group: str, num_forget: int = 0,
              settings: ml_collections.ConfigDict | None = None) -> train.LossFn:
  """loss_fn(trainable, frozen, hparams, batches, rng) for `train.make_step`.

  batches: {"retain": b, "forget": b, "ctx": {"stage_step": int32 (), "stage": {
  "alpha_warmup": int32 () [, "forget_steps", "retain_steps"]} [, "protos": (K, D)]
  [, "teacher", "reg", "swa"]}}, b = {"images": uint8 (B, H, W, C), "labels": int32 (B,)};
  one forward pass over R and F. net.apply(..., labels=) lets a margin head see the labels.
  alpha_warmup: steps with alpha held at 0; forget_steps, retain_steps: SCRUB's batches per
  epoch. Baselines: num_forget (the task's forget classes), settings (config.baselines).
  """
  block = fb.lirf_block(net) if method.block else None

  def loss_fn(trainable, frozen, hp, batches, rng):
    r, f, ctx = batches["retain"], batches["forget"], batches["ctx"]
    n = r["labels"].shape[0]
    labels = jnp.concatenate([r["labels"], f["labels"]])
    images = jnp.concatenate([r["images"], f["images"]])
    logits, emb, mid = fb.apply_capturing(
        net, trees.combine(frozen, trainable["params"]), trainable["lora"], images, block,
        labels=labels, train=True, rng=rng)
    terms = {"ce_r": losses.cross_entropy(logits[:n], r["labels"]),
             "ce_f": losses.cross_entropy(logits[n:], f["labels"]),
             "forget": losses.bounded_forget(logits[n:], f["labels"], hp["bound"]),
             "sparse": losses.group_sparse(trainable["lora"], group)}
    if method.prototypes:
      terms["kl_r"] = prototype_kl(ctx["protos"], r["labels"], emb[:n]).mean()
      terms["kl_f"] = prototype_kl(ctx["protos"], f["labels"], emb[n:]).mean()
    if method.terms:
      if method.alternate:
        st = ctx["stage"]
        ctx = {**ctx, "max_step": fb.scrub_max_step(ctx["stage_step"], st["forget_steps"],
                                                    st["retain_steps"])}
      terms.update(method.terms(fb.View(
          net, logits, emb, mid, labels, images, n, frozen, trainable["params"], ctx, rng,
          num_forget, settings)))
    warm = ctx["stage_step"] >= ctx["stage"]["alpha_warmup"]
    hp = {**hp, "alpha": jnp.where(warm, hp["alpha"], 0.0)}
    return method.loss(terms, hp), terms

  return loss_fn


# --- prototypes, task transitions, reports ------------------------------------------------

def class_sums(emb: jax.Array, labels: jax.Array, mask: jax.Array,
               num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Per-class embedding sums and counts: (B, D), (B,), (B,) -> (K, D), (K,)."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=emb.dtype) * mask[:, None]
  return onehot.T @ emb, onehot.sum(0)


def prototypes(sums: jax.Array, counts: jax.Array) -> jax.Array:
  """Mean embedding per class (K, D); zero rows for classes without examples."""
  return sums / jnp.maximum(counts, 1)[:, None]


def candidate(state: dict) -> dict:
  """The trainable tree selection scores: the weight average once it has started, else the
  current weights."""
  ema = state.get("ema")
  if ema is not None and int(np.max(np.asarray(ema["n"]))) > 0:
    return ema["trainable"]
  return state["trainable"]


def chosen(state: dict) -> dict:
  """The trainable tree a task ends with: the selected one if the state keeps a best."""
  return state["best"]["trainable"] if "best" in state else candidate(state)


def merged_model(state: dict, scale: float, trainable: dict | None = None) -> dict:
  """Full params with `trainable` (default: the chosen tree) and its LoRA folded in."""
  t = chosen(state) if trainable is None else trainable
  return lora_lib.merge(trees.combine(state["params"], t["params"]), t["lora"], scale)


def average_weights(state: dict, decay: float) -> dict:
  """One epoch's weight-average update: ema = decay * ema + (1 - decay) * trainable (the
  trainable tree itself at the first update)."""
  ema = state["ema"]
  d = jnp.where(ema["n"] > 0, decay, 0.0)
  avg = jax.tree.map(lambda a, w: d * a + (1 - d) * w, ema["trainable"], state["trainable"])
  return {**state, "ema": {"trainable": avg, "n": ema["n"] + 1}}


def start_task(state: dict, params: dict, lora: dict, trainable: str, tx,
               hparams: dict[str, float]) -> dict:
  """State for a new task on model `params`: fresh LoRA (or {}), optimizer state, hparams.

  Keeps every key of `state` and the structure of each value, so checkpoints of any task
  restore onto the same target.
  """
  frozen, tparams = trees.partition(params, trainable)
  t = {"lora": lora, "params": tparams}
  out = {**state, "params": frozen, "trainable": t, "opt": tx.init(t),
         "hparams": {**state["hparams"],
                     **{k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}}}
  if "best" in state:
    out["best"] = {"trainable": jax.tree.map(jnp.copy, t), "h": jnp.asarray(-1.0, jnp.float32)}
  if "ema" in state:
    out["ema"] = {"trainable": jax.tree.map(jnp.copy, t), "n": jnp.zeros((), jnp.int32)}
  return out


def keep_best(state: dict, h, tree: dict | None = None) -> dict:
  """Stores `tree` (default: the current trainable tree) as the best where `h` is at least the
  best's.

  h: a float, or (N,) one score per member of a study's stacked state.
  """
  tree = state["trainable"] if tree is None else tree
  h = np.asarray(h, np.float64)
  better = h >= np.asarray(state["best"]["h"], np.float64)
  if not better.any():
    return state

  def pick(new, old):
    return jnp.where(better.reshape(better.shape + (1,) * (new.ndim - better.ndim)), new, old)

  return {**state, "best": {
      "trainable": jax.tree.map(pick, tree, state["best"]["trainable"]),
      "h": jnp.asarray(np.where(better, h, state["best"]["h"]), jnp.float32)}}


def group_report(lora: dict, group: str) -> dict[str, Any]:
  """{"norms": {group: norm}, "near_zero": fraction of groups below NEAR_ZERO * max norm}."""
  norms = {k: float(v) for k, v in losses.group_norms(lora, group).items()}
  top = max(norms.values(), default=0.0)
  near = sum(v < NEAR_ZERO * top for v in norms.values())
  return {"norms": norms, "near_zero": near / len(norms) if norms else float("nan")}


def task_accuracies(correct: np.ndarray, count: np.ndarray, task: Task) -> dict[str, float]:
  """Acc_r, Acc_f, Acc_o (%) from per-class (correct, count), each (K,)."""
  return {"acc_r": set_accuracy(correct, count, task.retain),
          "acc_f": set_accuracy(correct, count, task.forget),
          "acc_o": set_accuracy(correct, count, task.old)}


def tasks_from_config(tcfg: ml_collections.ConfigDict,
                      labels: pipeline.LabelSpace) -> list[Task]:
  """Explicit `forget` lists (ids or names of the model's classes), else the protocol."""
  names = [e[2] for e in labels.entries]
  if tcfg.get("forget"):
    return explicit([sources.parse_classes(f, names, f"tasks.forget[{t}]")
                     for t, f in enumerate(tcfg.forget)], len(names))
  return protocol(len(names), tcfg.per_task, tcfg.num_tasks,
                  tcfg.get("order_seed", PROTOCOL_SEED))


class Recipe(recipe.Recipe):
  """Continual forgetting: one stage per task, each member with its own merged model, best
  LoRA per task (validation H) and class prototypes. A study's score is the mean validation
  H over tasks."""
  name = "forget"
  sweepable = ("seed", "train.lr", "train.weight_decay", *(f"weights.{k}" for k in HPARAMS))
  score_text = "mean val H over tasks"
  columns = ("acc_r", "acc_f", "acc_o", "acc_forgotten", "H", "val_H")
  pareto = (("acc_r", "Acc_r"), ("acc_forgotten", "Acc on all forgotten classes"),
            ("H", "mean H"))

  def __init__(self, config, run_dir, init, mesh):
    super().__init__(config, run_dir, init, mesh)
    self.method = get_method(config.method)
    self.params, self.model_cfg, self.labels = builders.initial_model(config, init)
    datasets = sorted({e[0] for e in self.labels.entries})
    if len(datasets) != 1:
      raise UserError(f"the model's classes come from several datasets {datasets}; forget "
                      "needs one")
    data = config.data
    if config.select_best and not data.get("val_split"):
      raise UserError("select_best needs a validation split: set data.val_split (e.g. "
                      "'train[90%:]') or select_best=False")
    self.tasks = tasks_from_config(config.tasks, self.labels)
    hcfg = config.head
    self.net = heads.HeadNetwork(builders.network(config, self.model_cfg), hcfg.kind,
                                 hcfg.scale, hcfg.margin)
    depth = self.net.base.model.depth
    if self.method.block and depth < 2:
      raise UserError(f"method={config.method!r} splits the blocks in two halves; the model has "
                      f"{depth} block, use a model with at least 2")
    trainable = self.method.trainable
    self.trainable = trainable if isinstance(trainable, str) else trainable(depth)
    self.settings = config.get("baselines", fb.settings())
    # A task's merge changes the LoRA-target kernels: a study keeps them per member.
    self.member_params = f"(?:{config.lora.targets})/kernel" if self.method.lora else ""
    self.sets, self.samplers = [], []
    for t, task in enumerate(self.tasks):
      self.sets.append(tuple(
          self._examples(task_classes, data.train_split, f"{name}_{t}", config.sets[name],
                         config.seed + t)
          for name, task_classes in (("retain", task.retain), ("forget", task.forget))))
      self.samplers.append((
          pipeline.EpochSampler(len(self.sets[t][0]), config.train.batch_size, config.seed + t),
          pipeline.EpochSampler(len(self.sets[t][1]), config.train.batch_size,
                                config.seed + 1000 + t)))
    everything = range(len(self.labels))
    self.eval_sets = {"": self._examples(everything, data.test_split, "test")}
    if data.get("val_split"):
      self.eval_sets["val_"] = self._examples(everything, data.val_split, "val")
    self.counts = train.correct_counts(self.net, len(self.labels),
                                       pass_labels=hcfg.margin_at_eval)
    k, net = len(self.labels), self.net

    @jax.jit
    def emb_sums(params, batch):
      _, emb = net.apply(params, None, batch["images"], return_embedding=True)
      return class_sums(emb, batch["labels"], batch["mask"], k)

    self.emb_sums = emb_sums

    @functools.partial(jax.jit, static_argnums=0)
    def importance_grads(kind, tparams, frozen, batch):
      def f(tp):
        logits = net.apply(trees.combine(frozen, tp), None, batch["images"],
                           labels=batch["labels"])
        return fb.importance_loss(kind, logits, batch["labels"], batch["mask"])
      return jax.grad(f)(tparams)

    self.importance_grads = importance_grads
    self.missing = self._missing(config) if config.get("missing_classes") else None
    for t, task in enumerate(self.tasks):
      retain, forget = self.sets[t]
      say(f"task {t}: forget {len(task.forget)} classes ({len(forget)} images), retain "
          f"{len(task.retain)} ({len(retain)} images), {self.steps(t)} steps")
    say(f"forget ({config.method}): {len(self.tasks)} tasks, {len(self.labels)} classes, ViT "
        f"{self.model_cfg.variant}, {hcfg.kind} head")

  def _examples(self, classes, split: str, name: str, subset_cfg=None,
                seed: int = 0) -> pipeline.ExampleSet:
    """Examples of label-space `classes` from `split`; a fraction / k-shot subset if given."""
    entries = self.labels.entries
    spec = ml_collections.ConfigDict(dict(
        dataset=entries[0][0], classes=[entries[k][1] for k in classes], seed=seed,
        **{k: v for k, v in (subset_cfg or {}).items()
           if k in ("fraction", "fraction_of", "per_class")}))
    return builders.example_set(self.config.data, spec, split, self.labels, name,
                                subset=subset_cfg is not None)

  def _missing(self, config):
    """(full head params, examples, counts fn) of the missing-class evaluation."""
    init, data = config.init, config.data
    if not builders.is_pretrained_file(self.init) or "dataset" not in init:
      raise UserError("missing_classes needs init.checkpoint to be a pretrained file (.npz, "
                      ".pth, .safetensors) and init.dataset the dataset its full head covers")
    if config.head.kind != "linear":
      raise UserError(f"missing_classes needs the linear head; head.kind={config.head.kind!r}")
    names = builders.source(data, init.dataset, data.test_split).class_names
    everything = builders.label_space(data, init.dataset, f"0-{len(names) - 1}",
                                      "init.dataset")
    kept = {c for _, c, _ in self.labels.entries}
    if config.missing_classes == "rest":
      ids = [c for c in range(len(names)) if c not in kept]
    else:
      ids = sources.parse_classes(config.missing_classes, names, "missing_classes")
    if not ids or kept & set(ids):
      raise UserError(f"missing_classes must name classes outside the model's "
                      f"{len(kept)} (got {len(ids)} classes, {len(kept & set(ids))} of them kept)")
    full_cfg = ml_collections.ConfigDict({**self.model_cfg, "num_classes": len(names)})
    net = builders.network(config, full_cfg)
    shape = (data.image_size, data.image_size, data.channels)
    full = builders.load_pretrained(self.init, vit.init_params(net.model, jax.random.key(0),
                                                               shape))
    spec = ml_collections.ConfigDict(dict(dataset=init.dataset, classes=ids))
    examples = builders.example_set(data, spec, data.test_split, everything, "missing",
                                    subset=False)
    say(f"missing-class evaluation: {len(ids)} classes ({len(examples)} test images) through "
        f"the file's {len(names)}-class head")
    return {"head": full["head"]}, examples, train.correct_counts(net, len(names))

  def missing_accuracy(self, params) -> float:
    """Top-1 (%) on the missing classes' test images of `params` with the full head."""
    head, examples, counts = self.missing
    correct, count = train.evaluate(counts, {**params, **head}, None, examples,
                                    self.config.data.eval_batch_size, self.mesh)
    return set_accuracy(correct, count)

  def steps(self, t: int) -> int:
    rs, fs = self.samplers[t]
    if self.method.alternate:
      return self.settings.superepochs * fb.scrub_length(fs.steps_per_epoch, rs.steps_per_epoch)
    return self.config.train.epochs * rs.steps_per_epoch

  def measure(self, params, lora, examples) -> tuple[np.ndarray, np.ndarray]:
    """Per-class (correct, count), each (K,)."""
    return train.evaluate(self.counts, params, lora, examples,
                          self.config.data.eval_batch_size, self.mesh)

  def new_lora(self, params, t: int, seed: int) -> dict:
    """Task t's fresh LoRA ({} for methods without one)."""
    if not self.method.lora:
      return {}
    lcfg = self.config.lora
    return lora_lib.init(jax.random.fold_in(jax.random.key(seed + 2), t), params,
                         rank=lcfg.rank, targets=lcfg.targets,
                         a_init=lcfg.a_init_first if t == 0 else lcfg.a_init)

  def check(self, config):
    """Refuses a per-task weight list without a value for every task, and unknown `carry`."""
    for t in range(len(self.tasks)):
      task_weights(config.weights, t)
    if config.get("carry", "chosen") not in CARRY:
      raise UserError(f"carry={config.carry!r} is not allowed; use one of {list(CARRY)}")

  def initial_state(self, config):
    """Task 0's state for a member `config`: its lr, weights and seed."""
    self.check(config)
    tcfg = config.train
    hparams = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay,
               **task_weights(config.weights, 0)}
    state = train.init_state(self.params, self.new_lora(self.params, 0, config.seed),
                             self.trainable, hparams, config.seed, self.tx, self.rng_impl)
    pretrained = state["trainable"]["params"]
    if self.method.teacher:
      state["teacher"] = jax.tree.map(jnp.copy, pretrained)
    if self.method.importance:
      state["reg"] = fb.empty_reg(pretrained)
    if self.method.swa:
      state["swa"] = {"params": jax.tree.map(jnp.copy, pretrained),
                      "n": jnp.zeros((), jnp.int32)}
    if self.config.select_best:
      state["best"] = {"trainable": jax.tree.map(jnp.copy, state["trainable"]),
                       "h": jnp.asarray(-1.0, jnp.float32)}
    if self.config.train.get("ema_decay", 0.0) > 0:
      state["ema"] = {"trainable": jax.tree.map(jnp.copy, state["trainable"]),
                      "n": jnp.zeros((), jnp.int32)}
    if self.method.prototypes:
      state["protos"] = jnp.zeros((len(self.labels), self.embedding_dim()), jnp.float32)
    return state

  def embedding_dim(self) -> int:
    data = self.config.data
    dummy = jnp.zeros((1, data.image_size, data.image_size, data.channels), jnp.uint8)
    return jax.eval_shape(lambda p: self.net.apply(p, None, dummy, return_embedding=True)[1],
                          self.params).shape[-1]

  def prototypes(self, params, t: int) -> jax.Array:
    """(K, D) mean embedding per class of task t's train sets under `params`."""
    sums = n = 0
    for s in self.sets[t]:
      for b in pipeline.eval_batches(s, self.config.data.eval_batch_size,
                                     sharding.data_sharding(self.mesh)):
        ds, dn = self.emb_sums(params, b)
        sums, n = sums + ds, n + dn
    return prototypes(sums, n)

  def stages(self):
    """One stage per task; tasks with as many forget classes share one loss, and so one
    compiled step (their sizes are numbers in state["stage"])."""
    tcfg, put = self.config.train, sharding.data_sharding(self.mesh)
    out, loss_fns = [], {}
    for t, task in enumerate(self.tasks):
      (retain, forget), (rs, fs) = self.sets[t], self.samplers[t]
      spe = rs.steps_per_epoch
      epoch_steps = (fs.steps_per_epoch, spe)  # SCRUB's schedule

      def batches(s, retain=retain, forget=forget, rs=rs, fs=fs, epoch_steps=epoch_steps):
        f, r = fb.scrub_positions(s, *epoch_steps) if self.method.alternate else (s, s)
        return {"retain": pipeline.batch(retain, rs.positions(r), put),
                "forget": pipeline.batch(forget, fs.positions(f), put)}

      def select_at(s, t=t, spe=spe):  # after an epoch (weight average) or a superepoch
        return (self.averages() and (s + 1) % spe == 0  # (SWA), or to select
                or self.swa_at(s, t) or self.selects_at(s, t))

      n = len(task.forget)
      if n not in loss_fns:
        loss_fns[n] = make_loss(self.method, self.net, self.config.group, n, self.settings)
      out.append(recipe.Stage(
          f"task {t}", self.steps(t), loss_fns[n], batches,
          end_ratio=lambda c: c.train.lr_end / c.train.lr, steps_per_epoch=spe,
          values={"alpha_warmup": tcfg.warmup_epochs * spe, "forget_steps": epoch_steps[0],
                  "retain_steps": spe},
          context=_context, begin=lambda m, s, t=t, task=task: self.begin(m, s, t, task),
          end=lambda m, s, t=t, task=task: self.end(m, s, t, task), select_at=select_at,
          select=lambda m, s, t=t, task=task: self.select(m, s, t, task)))
    return out

  def start(self, member, state):
    results = member.results
    results.setdefault("method", self.config.method)
    results.setdefault("tasks", [])
    if "pretrained" not in results:  # the initial state holds the pretrained model, placed
      correct, count = self.measure(train.full_params(state), None, self.eval_sets[""])
      results["pretrained"] = {"correct": correct, "count": count}
      if self.missing:
        results["pretrained"]["acc_missing"] = self.missing_accuracy(train.full_params(state))

  def _row(self, member, t: int) -> dict:
    return next(r for r in member.results["tasks"] if r["task"] == t)

  def _save_row(self, member, new: dict) -> None:
    results = member.results
    results["tasks"] = sorted([r for r in results["tasks"] if r["task"] != new["task"]]
                              + [new], key=lambda r: r["task"])
    member.save()

  def begin(self, member, state, t: int, task: Task):
    """Measures the model the task starts from (the previous task's, carried as `carry`
    says), then starts the task on it."""
    last = member.config.get("carry", "chosen") == "last"
    params = merged_model(state, self.net.lora_scale, state["trainable"] if last else None)
    pre = {key: np.asarray(v) for key, v in member.results["pretrained"].items()}
    names = self.labels.entries
    r = {"task": t, "forget": ",".join(names[c][2] for c in task.forget),
         "retain_images": len(self.sets[t][0]), "forget_images": len(self.sets[t][1]),
         "forget_ids": list(task.forget), "retain_ids": list(task.retain),
         "old_ids": list(task.old),
         "acc_r_pre": set_accuracy(pre["correct"], pre["count"], task.retain)}
    for prefix, examples in self.eval_sets.items():
      accs = task_accuracies(*self.measure(params, None, examples), task)
      r.update({f"{prefix}{key}_before": v for key, v in accs.items()})
    self._save_row(member, r)
    config = member.config
    if self.method.from_scratch:
      data = self.config.data
      params = vit.init_params(self.net.base.model, jax.random.key(config.seed + 100 + t),
                               (data.image_size,) * 2 + (data.channels,))
    state = start_task(state, params, self.new_lora(params, t, config.seed),
                       self.trainable, self.tx, task_weights(config.weights, t))
    if self.method.prototypes:
      state["protos"] = self.prototypes(params, t)
    if self.method.importance:
      anchor = state["trainable"]["params"]
      state["reg"] = fb.add_term(state["reg"], self.importance(state, t, task), anchor)
    return state

  def importance(self, state, t: int, task: Task):
    """Task t's importance of each trainable param at its start (forget_baselines): task 0
    on its retain training set, later tasks on their whole retain split."""
    tparams, kind = state["trainable"]["params"], self.method.importance
    if kind == "l2":
      return jax.tree.map(jnp.ones_like, tparams)
    examples = (self.sets[0][0] if t == 0 else
                self._examples(task.retain, self.config.data.train_split, f"importance_{t}"))
    size = self.config.train.batch_size
    num = -(-len(examples) // size)
    total = jax.tree.map(jnp.zeros_like, tparams)
    for b in pipeline.eval_batches(examples, size, sharding.data_sharding(self.mesh)):
      grads = self.importance_grads(kind, tparams, state["params"], b)
      total = jax.tree.map(jnp.add, total,
                           fb.importance_batch(kind, grads, b["mask"].sum(), num))
    return total

  def averages(self) -> bool:
    return self.config.train.get("ema_decay", 0.0) > 0

  def swa_at(self, s: int, t: int) -> bool:
    """Whether stage step s of task t ends a superepoch of a method with a weight average."""
    rs, fs = self.samplers[t]
    return self.method.swa and (s + 1) % fb.scrub_length(fs.steps_per_epoch,
                                                         rs.steps_per_epoch) == 0

  def selects_at(self, s: int, t: int) -> bool:
    """Whether model selection scores the model after stage step s of task t."""
    spe = self.samplers[t][0].steps_per_epoch
    return self.config.select_best and ((s + 1) % (self.config.eval_every_epochs * spe) == 0
                                        or s + 1 == self.steps(t))

  def select(self, member, state, t: int, task: Task):
    """After an epoch: updates the weight average (from `train.ema_epoch` on); after a
    superepoch, SCRUB's (state["swa"]); at a selection point, keeps the candidate tree as the
    task's best if its validation H is."""
    s = int(np.asarray(state["stage_step"])) - 1
    spe = self.samplers[t][0].steps_per_epoch
    tcfg = member.config.train
    if self.averages() and (s + 1) % spe == 0 and (s + 1) // spe - 1 >= tcfg.ema_epoch:
      state = average_weights(state, tcfg.ema_decay)
    if self.swa_at(s, t):
      state = {**state, "swa": fb.swa_update(state["swa"], state["trainable"]["params"])}
    if not self.selects_at(s, t):
      return state
    tree = candidate(state)
    params = trees.combine(state["params"], tree["params"])
    a = task_accuracies(*self.measure(params, tree["lora"], self.eval_sets["val_"]), task)
    h = h_mean(a["acc_r"], self._row(member, t)["val_acc_f_before"], a["acc_f"])
    return keep_best(state, h, tree)

  def end(self, member, state, t: int, task: Task) -> None:
    """Measures the task's merged model (test and validation); exports it in a single run."""
    params = self.released(state)
    r = self._row(member, t)
    for prefix, examples in self.eval_sets.items():
      correct, count = self.measure(params, None, examples)
      r.update({f"{prefix}{key}": v for key, v in task_accuracies(correct, count, task).items()})
      if prefix == "":
        r["acc_forgotten"] = set_accuracy(correct, count, task.old + task.forget)
    n = lora_lib.count(chosen(state))
    r.update(H=h_mean(r["acc_r"], r["acc_f_before"], r["acc_f"]), trainable=n,
             **{"trainable_%": 100.0 * n / lora_lib.count(self.params)})
    if "val_" in self.eval_sets:
      r["val_H"] = h_mean(r["val_acc_r"], r["val_acc_f_before"], r["val_acc_f"])
    if self.method.lora:
      r["groups"] = group_report(chosen(state)["lora"], self.config.group)
    if self.missing:
      r["acc_missing"] = self.missing_accuracy(params)
    self._save_row(member, r)
    if member.export:
      checkpoints.export_model(member.path(f"task_{t}", "model"), params, self.model_cfg,
                               self.labels.to_json(),
                               {"task": t, "forgotten": list(task.old + task.forget)})
      say(self.report(member.results))
      if jax.process_index() == 0 and self.method.lora:
        plot_groups(member.results["tasks"], self.config.group, member.path("groups.png"))

  def released(self, state):
    return merged_model(state, self.net.lora_scale)

  @staticmethod
  def report(results):
    rows = results["tasks"]
    if not any("acc_missing" in r for r in rows):
      return table(rows, COLUMNS)
    pre = results["pretrained"]["acc_missing"]
    return (table(rows, COLUMNS + ["acc_missing"])
            + f"\nmissing classes, pretrained model: {pre:.2f}")

  def row(self, member):
    tasks = member.results["tasks"]
    last = tasks[-1]
    return {**{k: last[k] for k in (*ACCS, "acc_forgotten")},
            "H": float(np.mean([r["H"] for r in tasks])),
            "val_H": float(np.mean([r.get("val_H", np.nan) for r in tasks])), "tasks": tasks}

  def score(self, row):
    return row["val_H"]

  def evaluate_model(self, member, state):
    """Acc_r / Acc_f / Acc_o of every task, and the accuracy on all forgotten classes."""
    correct, count = self.measure(train.full_params(state), None, self.eval_sets[""])
    rows = [{"task": t, **task_accuracies(correct, count, task)}
            for t, task in enumerate(self.tasks)]
    forgotten = sorted({k for task in self.tasks for k in task.forget})
    member.results.update(tasks=rows, acc_forgotten=set_accuracy(correct, count, forgotten))
    return (f"{table(rows, ['task', *ACCS])}\n"
            f"all forgotten classes: {member.results['acc_forgotten']:.2f}")

  def mia_sets(self, stage):
    """Task `stage`'s retain train set (members), its retained classes' test examples
    (non-members) and its forget train set (target)."""
    t = range(len(self.tasks))[stage]
    retain, forget = self.sets[t]
    test = self._examples(self.tasks[t].retain, self.config.data.test_split, f"retain_test_{t}")
    return {"member": retain, "nonmember": test, "target": forget}


def _context(state) -> dict:
  """What a task's loss reads from the state: the stage step and numbers, the class
  prototypes and a baseline's teacher, penalty and weight average."""
  return {"stage_step": state["stage_step"], "stage": state["stage"],
          **{k: state[k] for k in ("protos", "teacher", "reg", "swa") if k in state}}


def plot_groups(rows: list[dict], group: str, path: str) -> None:
  """One bar group per LoRA group: its norm after each task (log scale)."""
  rows = [r for r in rows if "groups" in r]
  names = sorted(rows[0]["groups"]["norms"])
  fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(names) * len(rows)), 3.2))
  width = 0.8 / len(rows)
  x = np.arange(len(names))
  for i, r in enumerate(rows):
    norms = [r["groups"]["norms"][n] for n in names]
    ax.bar(x + (i - (len(rows) - 1) / 2) * width, norms, width,
           label=f"task {r['task']} ({100 * r['groups']['near_zero']:.0f}% near 0)")
  ax.set_xticks(x, [n.replace("Transformer/", "").replace("encoderblock_", "block ")
                    for n in names], rotation=30 if len(names) > 6 else 0, fontsize=7, ha="right")
  ax.set_yscale("log")
  ax.set_ylabel(f"LoRA norm per {group}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  workdir.save_figure(fig, path)
  plt.close(fig)
