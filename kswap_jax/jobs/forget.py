"""`forget`: continual forgetting with GS-LoRA, GS-LoRA++ or a baseline (`config.method`).

  kswap forget --config configs/forget_digits.py --workdir runs/forget_digits
  kswap forget --config configs/forget_digits.py:method=gs_lora_pp --workdir runs/forget_pp

One loop stage per task. A stage's begin folds the previous task's chosen LoRA (and trained
params) into the model, measures that model ("before"), computes class prototypes if the
method uses them, and starts a fresh LoRA and optimizer state; its end merges the task's
chosen LoRA, exports the model to workdir/task_{t}/model and measures it on the test split.

Model selection (`select_best`): every `eval_every_epochs` epochs and at a task's last step the
current LoRA is scored by H on the validation split (data.val_split; R and F of the task) and
the best one is kept in the state (a LoRA whose H is below -1, one that made forgetting worse
than doing nothing, is never kept); otherwise a task ends with its last LoRA. The test split
is never used for selection.

Writes workdir/results.json (per task: Acc_r, Acc_f before and after, Acc_o, H, the pretrained
model's Acc_r, trainable share, LoRA group norms, and with select_best val_H, the validation H
of the model the task ends with) and workdir/groups.png.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

from kswap_jax import builders, continual, heads, loop, sharding, train, workdir
from kswap_jax import lora as lora_lib
from kswap_jax.data import pipeline, sources
from kswap_jax.errors import UserError
from kswap_jax.metrics import h_mean, set_accuracy
from kswap_jax.models import vit
from kswap_jax.progress import say, table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

COLUMNS = ["task", "forget", "acc_r_pre", "acc_r", "acc_f_before", "acc_f", "acc_o", "H",
           "trainable_%"]


def tasks_from_config(tcfg: ml_collections.ConfigDict,
                      labels: pipeline.LabelSpace) -> list[continual.Task]:
  """Explicit `forget` lists (ids or names of the model's classes), else the protocol."""
  names = [e[2] for e in labels.entries]
  if tcfg.get("forget"):
    return continual.explicit(
        [sources.parse_classes(f, names, f"tasks.forget[{t}]")
         for t, f in enumerate(tcfg.forget)], len(names))
  return continual.protocol(len(names), tcfg.per_task, tcfg.num_tasks,
                            tcfg.get("order_seed", continual.PROTOCOL_SEED))


def _example_set(config, labels: pipeline.LabelSpace, classes, split: str, name: str,
                 subset_cfg=None, seed: int = 0) -> pipeline.ExampleSet:
  """Examples of label-space `classes` from `split`; a fraction / k-shot subset if given."""
  spec = ml_collections.ConfigDict(dict(
      dataset=labels.entries[0][0], classes=[labels.entries[k][1] for k in classes],
      fraction=subset_cfg.fraction if subset_cfg else 1.0,
      per_class=subset_cfg.per_class if subset_cfg else 0, seed=seed))
  return builders.example_set(config.data, spec, split, labels, name,
                              subset=subset_cfg is not None)


def task_accuracies(correct: np.ndarray, count: np.ndarray,
                    task: continual.Task) -> dict[str, float]:
  """Acc_r, Acc_f, Acc_o (%) from per-class (correct, count), each (K,)."""
  return {"acc_r": set_accuracy(correct, count, task.retain),
          "acc_f": set_accuracy(correct, count, task.forget),
          "acc_o": set_accuracy(correct, count, task.old)}


@dataclasses.dataclass
class Forgetting:
  """What every task of a continual forgetting run shares, built by `prepare`.

  sets[t], samplers[t]: task t's (retain, forget) train ExampleSets and EpochSamplers;
  val_set (None without select_best) and test_set: every class of `labels`.
  """
  config: ml_collections.ConfigDict
  method: continual.Method
  mesh: jax.sharding.Mesh
  net: heads.HeadNetwork
  model_cfg: ml_collections.ConfigDict
  labels: pipeline.LabelSpace
  params: dict
  tasks: list
  sets: list
  samplers: list
  tx: Any
  val_set: pipeline.ExampleSet | None
  test_set: pipeline.ExampleSet
  counts: Callable
  emb_sums: Callable

  def steps(self, t: int) -> int:
    return self.config.train.epochs * self.samplers[t][0].steps_per_epoch

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

  def initial_state(self, config: ml_collections.ConfigDict) -> dict:
    """Task 0's state for `config` (this run's, or a sweep member's): its lr, weights, seed."""
    self.check_weights(config)
    tcfg, wcfg = config.train, config.weights
    hparams = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay,
               **{h: wcfg[h] for h in continual.HPARAMS if h != "beta"},
               "beta": continual.task_value(wcfg.beta, 0, "weights.beta")}
    state = train.init_state(self.params, self.new_lora(self.params, 0, config.seed),
                             self.method.trainable, hparams, config.seed, self.tx,
                             self.net.base.rng_impl)
    if self.config.select_best:
      state["best"] = {"trainable": jax.tree.map(jnp.copy, state["trainable"]),
                       "h": jnp.asarray(-1.0, jnp.float32)}
    if self.method.prototypes:
      state["protos"] = jnp.zeros((len(self.labels), self.embedding_dim()), jnp.float32)
    return state

  def check_weights(self, config: ml_collections.ConfigDict) -> None:
    """Refuses a per-task weights.beta list without a value for every task, before training."""
    for t in range(len(self.tasks)):
      continual.task_value(config.weights.beta, t, "weights.beta")

  def embedding_dim(self) -> int:
    data = self.config.data
    dummy = jnp.zeros((1, data.image_size, data.image_size, data.channels), jnp.uint8)
    return jax.eval_shape(lambda p: self.net.apply(p, None, dummy, return_embedding=True)[1],
                          self.params).shape[-1]

  def start(self, state: dict, params: dict, t: int, config: ml_collections.ConfigDict) -> dict:
    """Task t's state on the model `params` (the previous tasks' merged model) for `config`:
    re-initialised for from-scratch methods, fresh LoRA and optimizer, the task's beta and
    the model's class prototypes."""
    if self.method.from_scratch:
      data = self.config.data
      params = vit.init_params(self.net.base.model, jax.random.key(config.seed + 100 + t),
                               (data.image_size,) * 2 + (data.channels,))
    state = continual.start_task(
        state, params, self.new_lora(params, t, config.seed), self.method.trainable, self.tx,
        {"beta": continual.task_value(config.weights.beta, t, "weights.beta")})
    if self.method.prototypes:
      state["protos"] = self.prototypes(params, t)
    return state

  def prototypes(self, params, t: int) -> jax.Array:
    """(K, D) mean embedding per class of task t's train sets under `params`."""
    sums = n = 0
    for s in self.sets[t]:
      for b in pipeline.eval_batches(s, self.config.data.eval_batch_size,
                                     sharding.data_sharding(self.mesh)):
        ds, dn = self.emb_sums(params, b)
        sums, n = sums + ds, n + dn
    return continual.prototypes(sums, n)

  def loss(self, t: int) -> train.LossFn:
    tcfg = self.config.train
    return continual.make_loss(self.method, self.net, self.config.group,
                               tcfg.warmup_epochs * self.samplers[t][0].steps_per_epoch)

  def step(self, t: int) -> Callable:
    """Uncompiled update of task t; its lr decays per epoch to train.lr_end."""
    tcfg = self.config.train
    schedule = functools.partial(train.lr_factor, total_steps=self.steps(t),
                                 end_ratio=tcfg.lr_end / tcfg.lr,
                                 steps_per_epoch=self.samplers[t][0].steps_per_epoch)
    return with_context(train.make_step(self.loss(t), self.tx, schedule,
                                        self.net.base.rng_impl))

  def batches(self, t: int, s: int) -> tuple[int, dict]:
    """(s, {"retain": batch, "forget": batch}) of task t's step s, on the mesh."""
    (retain, forget), (rs, fs) = self.sets[t], self.samplers[t]
    put = sharding.data_sharding(self.mesh)
    return s, {"retain": pipeline.batch(retain, rs.positions(s), put),
               "forget": pipeline.batch(forget, fs.positions(s), put)}

  def eval_now(self, t: int, s: int) -> bool:
    """Whether model selection scores the LoRA after task t's step s (0-based)."""
    spe = self.samplers[t][0].steps_per_epoch
    return self.config.select_best and ((s + 1) % (self.config.eval_every_epochs * spe) == 0
                                        or s + 1 == self.steps(t))


def with_context(step: Callable) -> Callable:
  """A step whose loss also reads batches["ctx"]: the stage step and the class prototypes."""

  def stepped(state, data):
    ctx = {"stage_step": state["stage_step"]}
    if "protos" in state:
      ctx["protos"] = state["protos"]
    return step(state, {**data, "ctx": ctx})

  return stepped


def prepare(config: ml_collections.ConfigDict, run_dir: str,
            mesh: jax.sharding.Mesh | None = None, with_val: bool = False) -> Forgetting:
  """Loads (or pretrains) the model, builds the tasks and their data on `mesh` (default: the
  mesh of config.mesh); the validation set with select_best or `with_val`."""
  method = continual.get_method(config.method)
  params, model_cfg, labels = builders.initial_model(config, run_dir)
  if len({e[0] for e in labels.entries}) != 1:
    raise UserError(f"the model's classes come from several datasets "
                    f"{sorted({e[0] for e in labels.entries})}; forget needs one")
  tasks = tasks_from_config(config.tasks, labels)
  mesh = mesh or sharding.make_mesh(config.mesh)
  hcfg = config.head
  net = heads.HeadNetwork(builders.network(config, model_cfg), hcfg.kind, hcfg.scale,
                          hcfg.margin)
  k = len(labels)
  everything = range(k)
  sets, samplers = [], []
  for t, task in enumerate(tasks):
    sets.append(tuple(
        _example_set(config, labels, classes, config.data.train_split, f"{name}_{t}",
                     config.sets[name], config.seed + t)
        for name, classes in (("retain", task.retain), ("forget", task.forget))))
    samplers.append((pipeline.EpochSampler(len(sets[t][0]), config.train.batch_size,
                                           config.seed + t),
                     pipeline.EpochSampler(len(sets[t][1]), config.train.batch_size,
                                           config.seed + 1000 + t)))

  @jax.jit
  def emb_sums(params, batch):
    _, emb = net.apply(params, None, batch["images"], return_embedding=True)
    return continual.class_sums(emb, batch["labels"], batch["mask"], k)

  return Forgetting(
      config, method, mesh, net, model_cfg, labels, params, tasks, sets, samplers,
      train.make_optimizer(),
      _example_set(config, labels, everything, config.data.val_split, "val")
      if config.select_best or with_val else None,
      _example_set(config, labels, everything, config.data.test_split, "test"),
      train.correct_counts(net, k, pass_labels=hcfg.margin_at_eval), emb_sums)


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  workdir.check_config(run_dir, config)
  f = prepare(config, run_dir)
  state = f.initial_state(config)
  state_sharding = sharding.state_shardings(state, f.mesh, config.mesh.get("rules", ()))
  state = jax.device_put(state, state_sharding)
  model_size = lora_lib.count(f.params)
  labels = f.labels

  path = os.path.join(run_dir, "results.json")
  results = workdir.read_json(path, {"method": config.method, "tasks": []})
  if "pretrained" not in results:
    correct, count = f.measure(f.params, None, f.test_set)
    results["pretrained"] = {"correct": correct, "count": count}
  pre = {key: np.asarray(v) for key, v in results["pretrained"].items()}

  def row(t: int) -> dict:
    return next(r for r in results["tasks"] if r["task"] == t)

  def save_row(new: dict) -> None:
    results["tasks"] = sorted([r for r in results["tasks"] if r["task"] != new["task"]]
                              + [new], key=lambda r: r["task"])
    workdir.write_json(path, results)

  def begin(state, t, task):
    params = continual.merged_model(state, f.net.lora_scale)
    r = {"task": t, "forget": ",".join(labels.entries[c][2] for c in task.forget),
         "forget_ids": list(task.forget), "retain_ids": list(task.retain),
         "old_ids": list(task.old),
         "acc_r_pre": set_accuracy(pre["correct"], pre["count"], task.retain)}
    sets = {"": f.test_set, **({"val_": f.val_set} if config.select_best else {})}
    for prefix, examples in sets.items():
      accs = task_accuracies(*f.measure(params, None, examples), task)
      r.update({f"{prefix}{key}_before": v for key, v in accs.items()})
    save_row(r)
    return jax.device_put(f.start(state, params, t, config), state_sharding)

  def end(state, t, task):
    params = continual.merged_model(state, f.net.lora_scale)
    workdir.export_model(os.path.join(run_dir, f"task_{t}", "model"), params, f.model_cfg,
                         labels.to_json(), {"task": t, "forgotten": list(task.old + task.forget)})
    r = {**row(t), **task_accuracies(*f.measure(params, None, f.test_set), task)}
    n = lora_lib.count(continual.chosen(state))
    r.update(H=h_mean(r["acc_r"], r["acc_f_before"], r["acc_f"]), trainable=n,
             **{"trainable_%": 100.0 * n / model_size})
    if config.select_best:
      val = task_accuracies(*f.measure(params, None, f.val_set), task)
      r["val_H"] = h_mean(val["acc_r"], r["val_acc_f_before"], val["acc_f"])
    if f.method.lora:
      r["groups"] = continual.group_report(continual.chosen(state)["lora"], config.group)
    save_row(r)
    say(table(results["tasks"], COLUMNS))
    if jax.process_index() == 0 and f.method.lora:
      plot_groups(results["tasks"], config.group, os.path.join(run_dir, "groups.png"))

  def select(state, batches, *, t, task, step_fn):
    s, data = batches
    state, metrics = step_fn(state, data)
    if f.eval_now(t, s):
      a = task_accuracies(*f.measure(train.full_params(state), state["trainable"]["lora"],
                                     f.val_set), task)
      h = h_mean(a["acc_r"], row(t)["val_acc_f_before"], a["acc_f"])
      state = jax.device_put(continual.keep_best(state, h), state_sharding)
    return state, metrics

  stages = []
  for t, task in enumerate(f.tasks):
    step = functools.partial(select, t=t, task=task,
                             step_fn=sharding.compile_step(f.step(t), f.mesh, state_sharding))
    stages.append(loop.Stage(f"task {t}", f.steps(t), step, functools.partial(f.batches, t),
                             begin=functools.partial(begin, t=t, task=task),
                             end=functools.partial(end, t=t, task=task)))
    retain, forget = f.sets[t]
    say(f"task {t}: forget {len(task.forget)} classes ({len(forget)} images), retain "
        f"{len(task.retain)} ({len(retain)} images), {f.steps(t)} steps")

  say(f"forget ({config.method}): {len(f.tasks)} tasks, {len(labels)} classes, ViT "
      f"{f.model_cfg.variant}, {config.head.kind} head")
  ckpts = workdir.Checkpoints(os.path.join(run_dir, "checkpoints"),
                              config.checkpoint.every_steps, config.checkpoint.keep)
  loop.run(state, stages, ckpts, run_dir, config.log_every)
  return results


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
  fig.savefig(path, dpi=120)
  plt.close(fig)
