"""`pretrain`: train a ViT (from scratch or from a pretrained file) on a dataset's classes.

Produces the exported model (workdir/model) that the unlearning methods start from, with
per-class and overall test top-1 accuracy in workdir/results.json. The others run it on
demand: a config whose `init.checkpoint` is empty pretrains `init.pretrain` first.
An optional `head` section (kind, scale, margin, margin_at_eval; `heads.HeadNetwork`) trains a
CosFace head instead of the default linear one. With `model.task` "detection" or
"segmentation" it trains a dense model (`kswap_jax.tasks`) with the task's loss, and reports
its metrics (COCO box AP50 and AP, or mIoU) per class instead of top-1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from kswap_jax import builders, checkpoints, dense_metrics, heads, losses, metrics, recipe
from kswap_jax import sharding, tasks, train, trees
from kswap_jax.data import pipeline
from kswap_jax.models import vit
from kswap_jax.progress import say, table


class Recipe(recipe.Recipe):
  """All params trained with cross-entropy on `data.classes` (through `head`); one stage."""
  name = "pretrain"
  sweepable = ("seed", "train.lr", "train.weight_decay")
  score_text = "validation top-1"
  columns = ("test_accuracy", "val_accuracy")
  pareto = (("test_accuracy", "test top-1"), ("val_accuracy", "validation top-1"), None)

  def __init__(self, config, run_dir, init, mesh):
    super().__init__(config, run_dir, init, mesh)
    data = config.data
    self.task = tasks.of(config.model)
    self.labels = builders.label_space(data, data.dataset, data.classes, "data.classes")
    spec = ml_collections.ConfigDict(dict(dataset=data.dataset, classes=data.classes,
                                          fraction=data.get("fraction", 1.0),
                                          per_class=data.get("per_class", 0), seed=config.seed))
    make = self.task.example_set if self.task else builders.example_set
    self.sets = {"train": make(data, spec, data.train_split, self.labels, "train", subset=True),
                 "test": make(data, spec, data.test_split, self.labels, "test", subset=False)}
    if data.get("val_split"):
      self.sets["val"] = make(data, spec, data.val_split, self.labels, "val", subset=False)
    ckpt = config.init.get("checkpoint", "")
    self.model_cfg = ml_collections.ConfigDict(
        {**(builders.pretrained_defaults(ckpt) if ckpt else {}), **config.model})
    self.model_cfg.num_classes = len(self.labels)
    hcfg = config.get("head", ml_collections.ConfigDict())
    base = builders.network(config, self.model_cfg)
    self.model = base.model
    self.net = base if self.task else heads.HeadNetwork(
        base, hcfg.get("kind", "linear"), hcfg.get("scale", 64.0), hcfg.get("margin", 0.35))
    self.sampler = pipeline.EpochSampler(len(self.sets["train"]), config.train.batch_size,
                                         config.seed)
    self.counts = train.correct_counts(self.net, len(self.labels),
                                       pass_labels=hcfg.get("margin_at_eval", False))
    say(f"pretrain: {len(self.sets['train'])} train / {len(self.sets['test'])} test images, "
        f"{len(self.labels)} classes, ViT {config.model.variant}, {self.num_steps()} steps")

  def num_steps(self) -> int:
    return self.config.train.epochs * self.sampler.steps_per_epoch

  def initial_state(self, config):
    data = self.config.data
    params = vit.init_params(self.model, jax.random.key(config.seed),
                             (data.image_size, data.image_size, data.channels))
    # class centres xavier-uniform (a zero one has no direction)
    if getattr(self.net, "kind", "") == "cosface":
      params = heads.reset_head(params, len(self.labels), jax.random.key(config.seed + 1))
    if config.init.get("checkpoint"):
      params = builders.load_pretrained(config.init.checkpoint, params,
                                        tuple(config.init.get("dont_load", ())))
    tcfg = config.train
    return train.init_state(params, None, ".*",
                            {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay}, config.seed,
                            self.tx, self.rng_impl)

  def loss(self, trainable, frozen, hp, batches, rng):
    del hp
    if self.task:
      outputs = self.net.apply(trees.combine(frozen, trainable["params"]), None,
                               batches["images"], train=True, rng=rng)
      return self.task.set_loss(outputs, batches, "train"), {}
    logits = self.net.apply(trees.combine(frozen, trainable["params"]), None,
                            batches["images"], labels=batches["labels"], train=True, rng=rng)
    acc = jnp.mean(jnp.argmax(logits, -1) == batches["labels"])
    return losses.cross_entropy(logits, batches["labels"]), {"acc": acc}

  def stages(self):
    put = sharding.data_sharding(self.mesh)
    get = self.task.batch if self.task else pipeline.batch
    return [recipe.Stage(
        "pretrain", self.num_steps(), self.loss,
        lambda s: get(self.sets["train"], self.sampler.positions(s), put),
        end_ratio=lambda c: c.train.lr_end / c.train.lr,
        warmup_steps=self.config.train.get("warmup_steps", 0), end=self.evaluate)]

  def evaluate(self, member, state) -> None:
    params = train.full_params(state)
    bs = self.config.data.eval_batch_size
    if self.task:
      self.evaluate_dense(member, state, bs)
      return
    correct, count = train.evaluate(self.counts, params, None, self.sets["test"], bs, self.mesh)
    per_class = {self.labels.entries[k][2]: metrics.set_accuracy(correct, count, [k])
                 for k in range(len(self.labels))}
    member.results.update(test_accuracy=metrics.set_accuracy(correct, count),
                          per_class=per_class, steps=int(state["step"]),
                          train_examples=len(self.sets["train"]),
                          test_examples=len(self.sets["test"]))
    if "val" in self.sets:
      member.results["val_accuracy"] = metrics.set_accuracy(*train.evaluate(
          self.counts, params, None, self.sets["val"], bs, self.mesh))
    member.save()
    if member.export:
      say(self.report(member.results))

  def evaluate_dense(self, member, state, bs: int) -> None:
    """A dense task's metrics (percent) over all classes and per class (the headline one)."""
    params = train.full_params(state)
    k, all_classes = len(self.labels), range(len(self.labels))
    per = self.task.per_class(self.net, params, None, self.sets["test"], k, bs, self.mesh)
    m = self.task.metrics[0]
    member.results.update(
        metric=m, **{f"test_{x}": dense_metrics.set_mean(per[x], all_classes)
                     for x in self.task.metrics},
        per_class={self.labels.entries[c][2]: dense_metrics.set_mean(per[m], [c])
                   for c in all_classes},
        steps=int(state["step"]), train_examples=len(self.sets["train"]),
        test_examples=len(self.sets["test"]))
    if "val" in self.sets:
      per = self.task.per_class(self.net, params, None, self.sets["val"], k, bs, self.mesh)
      member.results[f"val_{m}"] = dense_metrics.set_mean(per[m], all_classes)
    member.save()
    if member.export:
      say(self.report(member.results))

  @staticmethod
  def report(results):
    m = results.get("metric", "accuracy")
    col = f"test {'top-1' if m == 'accuracy' else m.upper()} %"
    rows = [{"class": k, col: v} for k, v in results["per_class"].items()]
    rows.append({"class": "all", col: results[f"test_{m}"]})
    return table(rows, ["class", col])

  def finish(self, member, state):
    checkpoints.export_model(member.path("model"), self.released(state), self.model_cfg,
                             self.labels.to_json())

  def released(self, state):
    return train.full_params(state)

  def row(self, member):
    return {k: member.results.get(k, float("nan")) for k in self.columns}

  def score(self, row):
    return row["val_accuracy"]

  def evaluate_model(self, member, state):
    """Per-class and overall test top-1 of the model."""
    self.evaluate(member, state)
    return self.report(member.results)
