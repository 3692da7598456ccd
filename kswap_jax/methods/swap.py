"""`swap`: from a pretrained ViT, forget F, retain R and learn L (Knowledge Swapping).

Orders (config `order`), each a list of (stage kind, main set, paired sets):
  lbf          learn (R main, L paired), then forget (R' = R + L main, F paired)
  fbl          forget (R main, F paired), then learn (R main, L paired)
  simultaneous one stage with all three losses (R main, L and F paired); ours: the authors'
               combined training puts L into R's loader instead of a weighted term
  learn        the learn stage only; forget: the forget stage only (for layer studies)

Writes workdir/results.json (top-1 on the R, F and L test sets, and validation sets when
data.val_split is set, before training and after each stage), the per-block LoRA norms after
each stage (results.json "blocks", lora_blocks.png), accuracy.png, and the swapped model (LoRA
merged) in workdir/model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from kswap_jax import builders, checkpoints, heads, losses, metrics, recipe, sharding, train
from kswap_jax import lora as lora_lib
from kswap_jax import trees, workdir
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
HEAD_MODES = {"train": "head/.*", "frozen": ""}  # head -> regex of the trained params
# Loss weights and the bound, all arrays in state["hparams"] (a study may vary them).
HPARAMS = ("learn", "retain_in_learn", "retain", "forget", "bound", "sparse")
SETS = ("retain", "forget", "learn")


def plan(order: str):
  if order not in ORDERS:
    raise UserError(f"order={order!r} is not allowed; use one of {sorted(ORDERS)}")
  return ORDERS[order]


def stage_loss(net: train.Network, kind: str, group: str) -> train.LossFn:
  """loss_fn(trainable, frozen, hparams, batches, rng) for a stage kind.

  batches: {"retain": b, "learn": b, "forget": b} (those the stage pairs), each
  {"images": uint8 (B, H, W, C), "labels": int32 (B,)}. One forward pass over all of them.
    learn:  learn * CE(L) + retain_in_learn * CE(R) + sparse * S
    forget: retain * CE(R') + forget * relu(bound - CE(F)) + sparse * S
    swap:   learn * CE(L) + retain * CE(R) + forget * relu(bound - CE(F)) + sparse * S
  """

  def loss_fn(trainable, frozen, hp, batches, rng):
    names = sorted(batches)
    images = jnp.concatenate([batches[n]["images"] for n in names])
    logits = net.apply(trees.combine(frozen, trainable["params"]), trainable["lora"], images,
                       train=True, rng=rng)
    ce, start = {}, 0
    for n in names:
      size = batches[n]["labels"].shape[0]
      ce[n] = losses.cross_entropy(logits[start:start + size], batches[n]["labels"])
      start += size
    sparse = losses.group_sparse(trainable["lora"], group)
    total = hp["sparse"] * sparse
    if kind in ("learn", "swap"):
      total += hp["learn"] * ce["learn"]
    if kind == "learn":
      total += hp["retain_in_learn"] * ce["retain"]
    else:
      total += hp["retain"] * ce["retain"]
      total += hp["forget"] * jax.nn.relu(hp["bound"] - ce["forget"])
    return total, {**{f"ce_{n}": v for n, v in ce.items()}, "sparse": sparse}

  return loss_fn


def block_analysis(lora, scale: float) -> list[dict]:
  """Per block: sum of the Frobenius norms of its LoRA tensors, and of |scale * A B|."""
  rows: dict[int, dict] = {}
  for path, ab in lora_lib.layers(lora).items():
    block = int(path.split("encoderblock_")[1].split("/")[0])
    r = rows.setdefault(block, {"block": block, "lora_norm": 0.0, "delta_norm": 0.0})
    r["lora_norm"] += float(jnp.linalg.norm(ab["A"]) + jnp.linalg.norm(ab["B"]))
    r["delta_norm"] += float(np.linalg.norm(np.asarray(scale * ab["A"] @ ab["B"])))
  return [rows[b] for b in sorted(rows)]


class Recipe(recipe.Recipe):
  """Knowledge Swapping: a LoRA (and the head, with head="train") through the order's stages.

  A study varies the seed (new head columns, LoRA init, dropout), lr, weight decay and the
  loss weights; its score is Acc_R + Acc_L - Acc_F on validation.
  """
  name = "swap"
  sweepable = ("seed", "train.lr", "train.weight_decay", *(f"weights.{k}" for k in HPARAMS))
  score_text = "val Acc_R + val Acc_L - val Acc_F"
  columns = ("acc_r", "acc_f", "acc_l", "val_acc_r", "val_acc_f", "val_acc_l")
  pareto = (("acc_r", "Acc_R"), ("acc_f", "Acc_F"), ("acc_l", "Acc_L"))

  def __init__(self, config, run_dir, init, mesh):
    super().__init__(config, run_dir, init, mesh)
    plan(config.order)
    if config.head not in HEAD_MODES:
      raise UserError(f"head={config.head!r} is not allowed; use one of {sorted(HEAD_MODES)}")
    self.params, self.model_cfg, labels = builders.initial_model(config, init)
    data, learn = config.data, config.sets.learn
    src = builders.source(data, learn.dataset, builders.split_of(data, learn, "train"))
    new_ids = sources.parse_classes(learn.classes, src.class_names, "sets.learn.classes")
    self.num_new = len(new_ids)
    self.labels = labels.extend(learn.dataset, new_ids, src.class_names)
    self.model_cfg.num_classes = len(self.labels)
    splits = ("train", "test", "val") if data.get("val_split") else ("train", "test")
    self.sets = {name: {which: builders.example_set(
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
    out = []
    for kind, main, paired in plan(self.config.order):
      main_set = (pipeline.concat(train_set["retain"], train_set["learn"], "retain+learn")
                  if main == "retain+learn" else train_set[main])
      main_sampler = pipeline.EpochSampler(len(main_set), tcfg.batch_size, seed)
      samplers = {p: pipeline.EpochSampler(len(train_set[p]), tcfg.batch_size, seed + 7)
                  for p in paired}

      def batches(s, main_set=main_set, main_sampler=main_sampler, samplers=samplers):
        out = {"retain": pipeline.batch(main_set, main_sampler.positions(s), put)}
        for p, smp in samplers.items():
          out[p] = pipeline.batch(train_set[p], smp.positions(s), put)
        return out

      per_epoch = main_sampler.steps_per_epoch
      out.append(recipe.Stage(
          kind, tcfg.epochs[kind] * per_epoch,
          stage_loss(self.net, kind, self.config.sparse_group), batches,
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
    """Top-1 on each set's test (and validation) split, and the LoRA per block."""
    params, lora = train.full_params(state), state["trainable"]["lora"]
    row = {"after": when}
    for name, splits in self.sets.items():
      for which, prefix in (("test", ""), ("val", "val_")):
        if which in splits:
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
    return table(results["evals"], ["after", "acc_r", "acc_f", "acc_l"])

  def released(self, state):
    return lora_lib.merge(train.full_params(state), state["trainable"]["lora"],
                          self.net.lora_scale)

  def finish(self, member, state):
    checkpoints.export_model(member.path("model"), self.released(state), self.model_cfg,
                             self.labels.to_json())
    if jax.process_index() == 0:
      plot(member.results, member.dir)

  def row(self, member):
    last = member.results["evals"][-1]
    return {k: last[k] for k in self.columns}

  def score(self, row):
    return row["val_acc_r"] + row["val_acc_l"] - row["val_acc_f"]

  def evaluate_model(self, member, state):
    """Acc_R / Acc_F / Acc_L (and their validation values) of the model."""
    self.evaluate(member, state, "model")
    return self.report(member.results)

  def mia_sets(self, stage):
    """R's train set (members) and test set (non-members); F's train set (target)."""
    del stage
    return {"member": self.sets["retain"]["train"], "nonmember": self.sets["retain"]["test"],
            "target": self.sets["forget"]["train"]}


def plot(results: dict, run_dir: str) -> None:
  """accuracy.png (R/F/L after each stage) and lora_blocks.png (per-block norms)."""
  evals = results["evals"]
  fig, ax = plt.subplots(figsize=(5, 3.2))
  x = np.arange(len(evals))
  for i, (key, name) in enumerate((("acc_r", "retain"), ("acc_f", "forget"),
                                   ("acc_l", "learn"))):
    ax.bar(x + (i - 1) * 0.27, [r[key] for r in evals], 0.27, label=name)
  ax.set_xticks(x, [r["after"] for r in evals])
  ax.set_ylabel("test top-1 (%)")
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
