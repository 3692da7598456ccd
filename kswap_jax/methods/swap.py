"""`swap`: from a pretrained ViT, forget F, retain R and learn L (Knowledge Swapping).

Orders (config `order`), each a list of (stage kind, main set, paired sets):
  lbf          learn (R main, L paired), then forget (R' = R + L main, F paired)
  fbl          forget (R main, F paired), then learn (R main, L paired)
  simultaneous one stage with all three losses (R main, L and F paired); ours: the authors'
               combined training puts L into R's loader instead of a weighted term
  learn        the learn stage only; forget: the forget stage only (for layer studies)
How LBF's forget stage replays L (config `learn_replay`): "joined", L's images in R's loader
(R' = R + L, one CE; the authors' default), or "paired" (ours): L its own batch beside R and F,
weighted by weights.learn as in the learn stage, so L keeps the share of the loss it had
however the sizes of R and L compare.

The task is the model's (`kswap_jax.tasks`): a classifier (top-1, `acc_*`), a detector (COCO
box AP50 and AP, `ap50_*`, `ap_*`) or a segmenter (mIoU, `miou_*`); each set's loss is the
task's (cross-entropy, DETR's matched loss, per-pixel CE), the rest is the same.

Writes workdir/results.json (the task's metrics on the R, F and L test sets, and validation
sets when data.val_split is set, before training and after each stage), the per-block LoRA
norms after each stage (results.json "blocks", lora_blocks.png), accuracy.png, and the
swapped model (LoRA merged) in workdir/model.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from kswap_jax import builders, checkpoints, dense_metrics, heads, losses, metrics, recipe
from kswap_jax import lora as lora_lib
from kswap_jax import sharding, tasks, train, trees, workdir
from kswap_jax.data import pipeline, sources
from kswap_jax.errors import UserError
from kswap_jax.progress import say, table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

ORDERS = {
    "lbf": [("learn", "retain", ("learn",)), ("forget", "retain+learn", ("forget",))],
    "fbl": [("forget", "retain", ("forget",)), ("learn", "retain", ("learn",))],
    "simultaneous": [("swap", "retain", ("learn", "forget"))],
    "learn": [("learn", "retain", ("learn",))],
    "forget": [("forget", "retain", ("forget",))],
}
LEARN_REPLAY = ("joined", "paired")
HEAD_MODES = {"train": "head/.*", "frozen": ""}  # head -> regex of the trained params
# Loss weights and the bound, all arrays in state["hparams"] (a study may vary them).
HPARAMS = ("learn", "retain_in_learn", "retain", "forget", "bound", "sparse")
SETS = ("retain", "forget", "learn")


def plan(order: str, learn_replay: str = "joined"):
  """The order's stages, [(kind, main set, paired sets)], with L replayed as `learn_replay`
  says where a stage trains on R' = R + L."""
  if order not in ORDERS:
    raise UserError(f"order={order!r} is not allowed; use one of {sorted(ORDERS)}")
  if learn_replay not in LEARN_REPLAY:
    raise UserError(f"learn_replay={learn_replay!r} is not allowed; use one of "
                    f"{list(LEARN_REPLAY)}")
  if learn_replay == "joined":
    return ORDERS[order]
  return [(kind, "retain", ("learn", *paired)) if main == "retain+learn" else
          (kind, main, paired) for kind, main, paired in ORDERS[order]]


def classification_loss(logits: jax.Array, batch: dict, name: str) -> jax.Array:
  """A set's loss for a classifier: CE of logits (B, K) and batch["labels"] (B,)."""
  del name
  return losses.cross_entropy(logits, batch["labels"])


def stage_loss(net: train.Network, kind: str, group: str,
               set_loss=classification_loss) -> train.LossFn:
  """loss_fn(trainable, frozen, hparams, batches, rng) for a stage kind.

  batches: {"retain": b, "learn": b, "forget": b} (those the stage pairs), each
  {"images": uint8 (B, H, W, C), "labels": int32 (B,)} and a dense task's targets. One
  forward pass over all of them; set_loss(outputs of set n, batches[n], n) -> CE(n), a
  dense task's loss in its place (`tasks.Dense.set_loss`).
    learn:  learn * CE(L) + retain_in_learn * CE(R) + sparse * S
    forget: retain * CE(R') + forget * relu(bound - CE(F)) + sparse * S
            (+ learn * CE(L) where L is a paired set: learn_replay="paired")
    swap:   learn * CE(L) + retain * CE(R) + forget * relu(bound - CE(F)) + sparse * S
  """

  def loss_fn(trainable, frozen, hp, batches, rng):
    names = sorted(batches)
    images = jnp.concatenate([batches[n]["images"] for n in names])
    outputs = net.apply(trees.combine(frozen, trainable["params"]), trainable["lora"], images,
                        train=True, rng=rng)
    ce, start = {}, 0
    for n in names:
      size = batches[n]["labels"].shape[0]
      part = jax.tree.map(lambda x, start=start, size=size: x[start:start + size], outputs)
      ce[n] = set_loss(part, batches[n], n)
      start += size
    sparse = losses.group_sparse(trainable["lora"], group)
    total = hp["sparse"] * sparse
    if "learn" in ce:
      total += hp["learn"] * ce["learn"]
    if kind == "learn":
      total += hp["retain_in_learn"] * ce["retain"]
    else:
      total += hp["retain"] * ce["retain"]
      total += hp["forget"] * jax.nn.relu(hp["bound"] - ce["forget"])
    return total, {**{f"ce_{n}": v for n, v in ce.items()}, "sparse": sparse}

  return loss_fn


def block_analysis(lora, scale: float) -> list[dict]:
  """Per block: sum of the Frobenius norms of its LoRA tensors, and of |scale * A B|.

  Blocks are numbered encoder first; a dense model's decoder blocks follow its encoder's."""
  rows: dict[tuple[str, int], dict] = {}
  for path, ab in lora_lib.layers(lora).items():
    kind, i = re.search(r"(en|de)coderblock_(\d+)", path).groups()
    r = rows.setdefault((kind, int(i)), {"lora_norm": 0.0, "delta_norm": 0.0})
    r["lora_norm"] += float(jnp.linalg.norm(ab["A"]) + jnp.linalg.norm(ab["B"]))
    r["delta_norm"] += float(np.linalg.norm(np.asarray(scale * ab["A"] @ ab["B"])))
  order = sorted(rows, key=lambda k: (k[0] == "de", k[1]))
  return [{"block": b, **rows[k]} for b, k in enumerate(order)]


class Recipe(recipe.Recipe):
  """Knowledge Swapping: a LoRA (and the head, with head="train") through the order's stages.

  A study varies the seed (new head columns, LoRA init, dropout), lr, weight decay and the
  loss weights; its score is Acc_R + Acc_L - Acc_F on validation, and a member whose val Acc_R
  fell more than config.select_retain_drop points below the pretrained model's ranks below
  every member that kept it (`score`; ours: the swap's aim is to keep R first).
  """
  name = "swap"
  sweepable = ("seed", "train.lr", "train.weight_decay", *(f"weights.{k}" for k in HPARAMS))
  score_text = "val Acc_R + val Acc_L - val Acc_F"
  columns = ("acc_r", "acc_f", "acc_l", "val_acc_r", "val_acc_f", "val_acc_l")
  pareto = (("acc_r", "Acc_R"), ("acc_f", "Acc_F"), ("acc_l", "Acc_L"))

  def __init__(self, config, run_dir, init, mesh):
    super().__init__(config, run_dir, init, mesh)
    plan(config.order, config.learn_replay)
    if config.head not in HEAD_MODES:
      raise UserError(f"head={config.head!r} is not allowed; use one of {sorted(HEAD_MODES)}")
    self.params, self.model_cfg, labels = builders.initial_model(config, init)
    self.task = tasks.of(self.model_cfg)
    self.metrics = self.task.metrics if self.task else ("acc",)
    if self.task:  # its headline metric in the study table, the Pareto plot and the score
      m = self.metrics[0]
      self.columns = (*(f"{m}_{s}" for s in "rfl"), *(f"val_{m}_{s}" for s in "rfl"))
      self.pareto = tuple((f"{m}_{s}", f"{m.upper()}_{s.upper()}") for s in "rfl")
      self.score_text = "val {0}_R + val {0}_L - val {0}_F".format(m.upper())
    if config.select_retain_drop < 100:
      self.score_text += (f"; below all others where val {self.metrics[0].upper()}_R fell more "
                          f"than {config.select_retain_drop:g} points below the pretrained's")
    data, learn = config.data, config.sets.learn
    src = builders.source(data, learn.dataset, builders.split_of(data, learn, "train"))
    new_ids = sources.parse_classes(learn.classes, src.class_names, "sets.learn.classes")
    self.num_new = len(new_ids)
    self.labels = labels.extend(learn.dataset, new_ids, src.class_names)
    self.model_cfg.num_classes = len(self.labels)
    splits = ("train", "test", "val") if data.get("val_split") else ("train", "test")
    make = self.task.example_set if self.task else builders.example_set
    self.sets = {name: {which: make(
        data, config.sets[name], builders.split_of(data, config.sets[name], which),
        self.labels, f"sets.{name}", subset=which == "train") for which in splits}
                 for name in SETS}
    for a, b in (("retain", "forget"), ("retain", "learn"), ("forget", "learn")):
      both = set(self.sets[a]["test"].classes()) & set(self.sets[b]["test"].classes())
      if both:
        raise UserError(f"sets.{a} and sets.{b} share classes {sorted(both)}; make them "
                        "disjoint")
    self.net = builders.network(config, self.model_cfg)
    self.counts = train.correct_counts(self.net, len(self.labels))

  def initial_state(self, config):
    """Head grown by the learn classes, a new LoRA, rng and hparams from `config`."""
    params = heads.grow_head(self.params, self.num_new, jax.random.key(config.seed + 1))
    lcfg, tcfg = config.lora, config.train
    lora = lora_lib.init(jax.random.key(config.seed + 2), params, rank=lcfg.rank,
                         targets=lcfg.targets, a_init=lcfg.a_init)
    hparams = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay,
               **{k: config.weights[k] for k in HPARAMS}}
    return train.init_state(params, lora, HEAD_MODES[config.head], hparams, config.seed,
                            self.tx, self.rng_impl)

  def stages(self):
    tcfg, seed, put = self.config.train, self.config.seed, sharding.data_sharding(self.mesh)
    train_set = {n: s["train"] for n, s in self.sets.items()}
    join, get = ((self.task.concat, self.task.batch) if self.task else
                 (pipeline.concat, pipeline.batch))
    set_loss = self.task.set_loss if self.task else classification_loss
    out = []
    for kind, main, paired in plan(self.config.order, self.config.learn_replay):
      main_set = (join(train_set["retain"], train_set["learn"], "retain+learn")
                  if main == "retain+learn" else train_set[main])
      main_sampler = pipeline.EpochSampler(len(main_set), tcfg.batch_size, seed)
      samplers = {p: pipeline.EpochSampler(len(train_set[p]), tcfg.batch_size, seed + 7)
                  for p in paired}

      def batches(s, main_set=main_set, main_sampler=main_sampler, samplers=samplers):
        out = {"retain": get(main_set, main_sampler.positions(s), put)}
        for p, smp in samplers.items():
          out[p] = get(train_set[p], smp.positions(s), put)
        return out

      per_epoch = main_sampler.steps_per_epoch
      out.append(recipe.Stage(
          kind, tcfg.epochs[kind] * per_epoch,
          stage_loss(self.net, kind, self.config.sparse_group, set_loss), batches,
          end_ratio=lambda c: c.train.lr_end / c.train.lr, steps_per_epoch=per_epoch,
          end=lambda m, s, kind=kind: self.evaluate(m, s, kind)))
    return out

  def start(self, member, state):
    n_train, n_all = lora_lib.count(state["trainable"]), lora_lib.count(train.full_params(state))
    if member.export:
      say(f"swap ({self.config.order}): R {len(self.sets['retain']['train'])} / F "
          f"{len(self.sets['forget']['train'])} / L {len(self.sets['learn']['train'])} train "
          f"images; trainable {n_train:,} of "
          f"{n_all + lora_lib.count(state['trainable']['lora']):,} parameters "
          f"({100 * n_train / n_all:.2f}%)")
    if not any(r["after"] == "pretrained" for r in member.results.get("evals", [])):
      self.evaluate(member, state, "pretrained")

  def evaluate(self, member, state, when: str) -> None:
    """The task's metrics on each set's test (and validation) split, and the LoRA per block."""
    params, lora = train.full_params(state), state["trainable"]["lora"]
    row = {"after": when}
    for name, splits in self.sets.items():
      for which, prefix in (("test", ""), ("val", "val_")):
        if which in splits and self.task:
          # Each set on its own images, as the authors evaluate their remain, forget and learn
          # sets (KnowledgeSwapping object-detection/swapping_fltf_ddp.py:372-374).
          per = self.task.per_class(self.net, params, lora, splits[which], len(self.labels),
                                    self.config.data.eval_batch_size, self.mesh)
          row.update({f"{prefix}{m}_{name[0]}": dense_metrics.set_mean(
              per[m], splits[which].classes()) for m in self.metrics})
        elif which in splits:
          correct, count = train.evaluate(self.counts, params, lora, splits[which],
                                          self.config.data.eval_batch_size, self.mesh)
          row[f"{prefix}acc_{name[0]}"] = metrics.set_accuracy(correct, count)
    results = member.results
    results["evals"] = [r for r in results.get("evals", []) if r["after"] != when] + [row]
    results.setdefault("blocks", {})[when] = block_analysis(lora, self.net.lora_scale)
    member.save()
    if member.export:
      say(self.report(results))

  @staticmethod
  def report(results):
    keys = [k for k in results["evals"][0] if k != "after" and not k.startswith("val_")]
    return table(results["evals"], ["after", *keys])

  def released(self, state):
    return lora_lib.merge(train.full_params(state), state["trainable"]["lora"],
                          self.net.lora_scale)

  def finish(self, member, state):
    checkpoints.export_model(member.path("model"), self.released(state), self.model_cfg,
                             self.labels.to_json())
    if jax.process_index() == 0:
      plot(member.results, member.dir, self.metrics[0])

  def row(self, member):
    evals = member.results["evals"]
    pretrained = next(r for r in evals if r["after"] == "pretrained")
    key = f"val_{self.metrics[0]}_r"
    return {**{k: evals[-1][k] for k in self.columns},
            **({f"{key}_pretrained": pretrained[key]} if key in pretrained else {})}

  def score(self, row):
    """val R + L - F; -300 - the shortfall where val R fell more than select_retain_drop
    below the pretrained model's (R + L - F is never below -100)."""
    m = self.metrics[0]
    total = row[f"val_{m}_r"] + row[f"val_{m}_l"] - row[f"val_{m}_f"]
    short = (row.get(f"val_{m}_r_pretrained", -np.inf) - self.config.select_retain_drop
             - row[f"val_{m}_r"])
    return total if not short > 0 else -300.0 - short

  def evaluate_model(self, member, state):
    """Acc_R / Acc_F / Acc_L (and their validation values) of the model."""
    self.evaluate(member, state, "model")
    return self.report(member.results)

  def mia_sets(self, stage):
    """R's train set (members) and test set (non-members); F's train set (target); None for
    a dense task (the attack reads class logits)."""
    del stage
    if self.task:
      return None
    return {"member": self.sets["retain"]["train"], "nonmember": self.sets["retain"]["test"],
            "target": self.sets["forget"]["train"]}


def plot(results: dict, run_dir: str, metric: str = "acc") -> None:
  """accuracy.png (`metric` of R/F/L after each stage) and lora_blocks.png (per-block norms)."""
  evals = results["evals"]
  fig, ax = plt.subplots(figsize=(5, 3.2))
  x = np.arange(len(evals))
  for i, name in enumerate(SETS):
    ax.bar(x + (i - 1) * 0.27, [r[f"{metric}_{name[0]}"] for r in evals], 0.27, label=name)
  ax.set_xticks(x, [r["after"] for r in evals])
  ax.set_ylabel(f"test {'top-1' if metric == 'acc' else metric.upper()} (%)")
  ax.set_ylim(0, 105)
  ax.legend(fontsize=8)
  ax.set_title("accuracy before and after each stage")
  fig.tight_layout()
  workdir.save_figure(fig, f"{run_dir}/accuracy.png")
  plt.close(fig)
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
  for when, rows in results["blocks"].items():
    if when == "pretrained":
      continue
    blocks = [r["block"] for r in rows]
    axes[0].plot(blocks, [r["lora_norm"] for r in rows], "o-", label=f"after {when}")
    axes[1].plot(blocks, [r["delta_norm"] for r in rows], "o-", label=f"after {when}")
  axes[0].set_title("sum of |A|, |B| norms per block")
  axes[1].set_title("|scale * A B| per block")
  for a in axes:
    a.set_xlabel("transformer block")
    a.legend(fontsize=8)
  fig.tight_layout()
  workdir.save_figure(fig, f"{run_dir}/lora_blocks.png")
  plt.close(fig)
