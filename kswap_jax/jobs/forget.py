"""`forget`: continual forgetting with GS-LoRA, GS-LoRA++ or a baseline (`config.method`).

  kswap forget --config configs/forget_digits.py --workdir runs/forget_digits
  kswap forget --config configs/forget_digits.py:method=gs_lora_pp --workdir runs/forget_pp

One loop stage per task. A stage's begin folds the previous task's chosen LoRA (and trained
params) into the model, measures that model ("before"), computes class prototypes if the
method uses them, and starts a fresh LoRA and optimizer state; its end merges the task's
chosen LoRA, exports the model to workdir/task_{t}/model and measures it on the test split.

Model selection (`select_best`): every `eval_every_epochs` epochs and at a task's last step the
current LoRA is scored by H on the validation split (data.val_split; R and F of the task) and
the best one is kept in the state; otherwise a task ends with its last LoRA. The test split is
never used for selection.

Writes workdir/results.json (per task: Acc_r, Acc_f before and after, Acc_o, H, the pretrained
model's Acc_r, trainable share, LoRA group norms) and workdir/groups.png.
"""
from __future__ import annotations

import functools
import os

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


def _accs(correct: np.ndarray, count: np.ndarray, task: continual.Task) -> dict[str, float]:
  return {"acc_r": set_accuracy(correct, count, task.retain),
          "acc_f": set_accuracy(correct, count, task.forget),
          "acc_o": set_accuracy(correct, count, task.old)}


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  workdir.check_config(run_dir, config)
  method = continual.get_method(config.method)
  params, model_cfg, labels = builders.initial_model(config, run_dir)
  if len({e[0] for e in labels.entries}) != 1:
    raise UserError(f"the model's classes come from several datasets "
                    f"{sorted({e[0] for e in labels.entries})}; forget needs one")
  tasks = tasks_from_config(config.tasks, labels)
  mesh = sharding.make_mesh(config.mesh)
  hcfg, lcfg, tcfg, wcfg = config.head, config.lora, config.train, config.weights
  net = heads.HeadNetwork(builders.network(config, model_cfg), hcfg.kind, hcfg.scale,
                          hcfg.margin)
  k = len(labels)
  everything = range(k)
  val_set = (_example_set(config, labels, everything, config.data.val_split, "val")
             if config.select_best else None)
  test_set = _example_set(config, labels, everything, config.data.test_split, "test")
  counts = train.correct_counts(net, k, pass_labels=hcfg.margin_at_eval)
  batch_sharding = sharding.data_sharding(mesh)

  def measure(params, lora, examples):
    return train.evaluate(counts, params, lora, examples, config.data.eval_batch_size, mesh)

  @jax.jit
  def emb_sums(params, batch):
    _, emb = net.apply(params, None, batch["images"], return_embedding=True)
    return continual.class_sums(emb, batch["labels"], batch["mask"], k)

  def protos(params, sets):
    sums = n = 0
    for s in sets:
      for b in pipeline.eval_batches(s, config.data.eval_batch_size, batch_sharding):
        ds, dn = emb_sums(params, b)
        sums, n = sums + ds, n + dn
    return continual.prototypes(sums, n)

  def new_lora(params, t):
    if not method.lora:
      return {}
    return lora_lib.init(jax.random.fold_in(jax.random.key(config.seed + 2), t), params,
                         rank=lcfg.rank, targets=lcfg.targets,
                         a_init=lcfg.a_init_first if t == 0 else lcfg.a_init)

  tx = train.make_optimizer()
  hparams = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay,
             **{h: wcfg[h] for h in continual.HPARAMS if h != "beta"},
             "beta": continual.task_value(wcfg.beta, 0, "weights.beta")}
  state = train.init_state(params, new_lora(params, 0), method.trainable, hparams, config.seed,
                           tx, net.base.rng_impl)
  if config.select_best:
    state["best"] = {"trainable": jax.tree.map(jnp.copy, state["trainable"]),
                     "h": jnp.asarray(-1.0, jnp.float32)}
  if method.prototypes:
    dummy = jnp.zeros((1, config.data.image_size, config.data.image_size, config.data.channels),
                      jnp.uint8)
    dim = jax.eval_shape(lambda p: net.apply(p, None, dummy, return_embedding=True)[1],
                         params).shape[-1]
    state["protos"] = jnp.zeros((k, dim), jnp.float32)
  state_sharding = sharding.state_shardings(state, mesh, config.mesh.get("rules", ()))
  state = jax.device_put(state, state_sharding)
  model_size = lora_lib.count(params)

  path = os.path.join(run_dir, "results.json")
  results = workdir.read_json(path, {"method": config.method, "tasks": []})
  if "pretrained" not in results:
    correct, count = measure(params, None, test_set)
    results["pretrained"] = {"correct": correct, "count": count}
  pre = {key: np.asarray(v) for key, v in results["pretrained"].items()}

  def row(t: int) -> dict:
    return next(r for r in results["tasks"] if r["task"] == t)

  def save_row(new: dict) -> None:
    results["tasks"] = sorted([r for r in results["tasks"] if r["task"] != new["task"]]
                              + [new], key=lambda r: r["task"])
    workdir.write_json(path, results)

  def begin(state, t, task, train_sets):
    params = continual.merged_model(state, net.lora_scale)
    r = {"task": t, "forget": ",".join(labels.entries[c][2] for c in task.forget),
         "forget_ids": list(task.forget), "retain_ids": list(task.retain),
         "old_ids": list(task.old),
         "acc_r_pre": set_accuracy(pre["correct"], pre["count"], task.retain)}
    r.update({f"{key}_before": v for key, v in _accs(*measure(params, None, test_set),
                                                      task).items()})
    if config.select_best:
      r.update({f"val_{key}_before": v for key, v in _accs(*measure(params, None, val_set),
                                                           task).items()})
    save_row(r)
    if method.from_scratch:
      params = vit.init_params(net.base.model, jax.random.key(config.seed + 100 + t),
                               (config.data.image_size,) * 2 + (config.data.channels,))
    state = continual.start_task(
        state, params, new_lora(params, t), method.trainable, tx,
        {"beta": continual.task_value(wcfg.beta, t, "weights.beta")})
    if method.prototypes:
      state["protos"] = protos(params, train_sets)
    return jax.device_put(state, state_sharding)

  def end(state, t, task):
    params = continual.merged_model(state, net.lora_scale)
    workdir.export_model(os.path.join(run_dir, f"task_{t}", "model"), params, model_cfg,
                         labels.to_json(), {"task": t, "forgotten": list(task.old + task.forget)})
    r = {**row(t), **_accs(*measure(params, None, test_set), task)}
    n = lora_lib.count(continual.chosen(state))
    r.update(H=h_mean(r["acc_r"], r["acc_f_before"], r["acc_f"]), trainable=n,
             **{"trainable_%": 100.0 * n / model_size})
    if config.select_best:
      r["val_H"] = float(state["best"]["h"])
    if method.lora:
      r["groups"] = continual.group_report(continual.chosen(state)["lora"], config.group)
    save_row(r)
    say(table(results["tasks"], COLUMNS))
    if jax.process_index() == 0 and method.lora:
      plot_groups(results["tasks"], config.group, os.path.join(run_dir, "groups.png"))

  def select(state, batches, *, t, task, step_fn, eval_steps, total):
    s, data = batches
    state, metrics = step_fn(state, data)
    if config.select_best and ((s + 1) % eval_steps == 0 or s + 1 == total):
      a = _accs(*measure(train.full_params(state), state["trainable"]["lora"], val_set), task)
      h = h_mean(a["acc_r"], row(t)["val_acc_f_before"], a["acc_f"])
      state = jax.device_put(continual.keep_best(state, h), state_sharding)
    return state, metrics

  stages = []
  for t, task in enumerate(tasks):
    retain = _example_set(config, labels, task.retain, config.data.train_split, f"retain_{t}",
                          config.sets.retain, config.seed + t)
    forget = _example_set(config, labels, task.forget, config.data.train_split, f"forget_{t}",
                          config.sets.forget, config.seed + t)
    rs = pipeline.EpochSampler(len(retain), tcfg.batch_size, config.seed + t)
    fs = pipeline.EpochSampler(len(forget), tcfg.batch_size, config.seed + 1000 + t)
    spe = rs.steps_per_epoch
    steps = tcfg.epochs * spe
    schedule = functools.partial(train.lr_factor, total_steps=steps, end_ratio=tcfg.lr_end /
                                 tcfg.lr, steps_per_epoch=spe)
    inner = train.make_step(
        continual.make_loss(method, net, config.group, tcfg.warmup_epochs * spe), tx, schedule,
        net.base.rng_impl)

    def with_ctx(state, data, inner=inner):
      ctx = {"stage_step": state["stage_step"]}
      if "protos" in state:
        ctx["protos"] = state["protos"]
      return inner(state, {**data, "ctx": ctx})

    def batches(s, retain=retain, forget=forget, rs=rs, fs=fs):
      return s, {"retain": pipeline.batch(retain, rs.positions(s), batch_sharding),
                 "forget": pipeline.batch(forget, fs.positions(s), batch_sharding)}

    step = functools.partial(select, t=t, task=task,
                             step_fn=sharding.compile_step(with_ctx, mesh, state_sharding),
                             eval_steps=config.eval_every_epochs * spe, total=steps)
    stages.append(loop.Stage(
        f"task {t}", steps, step, batches,
        begin=functools.partial(begin, t=t, task=task, train_sets=(retain, forget)),
        end=functools.partial(end, t=t, task=task)))
    say(f"task {t}: forget {len(task.forget)} classes ({len(forget)} images), retain "
        f"{len(task.retain)} ({len(retain)} images), {steps} steps")

  say(f"forget ({config.method}): {len(tasks)} tasks, {k} classes, ViT {model_cfg.variant}, "
      f"{config.head.kind} head")
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
