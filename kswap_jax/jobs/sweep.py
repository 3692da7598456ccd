"""`sweep`: many runs of one method (`swap`, `dispose` or `forget`) trained as one vmapped program.

Members are the base config with the values of `members` / `grid` set (see kswap_jax.sweep).
They share the pretrained model, the data and its order (from `base.seed`). Values of keys
outside `sweep.SWEEPABLE` (rank, batch size, order, method, ...) split the members into
groups, each trained as its own program in workdir/group_<g>/, one after another. Members train in
chunks of `members_per_chunk` (0: all at once; -1: as many as fit 75% of a device's memory limit,
estimated from XLA's memory analysis), each chunk resumable from workdir/chunk_<i>/. A
chunk's members are split over the mesh axis `sweep` (`mesh.sweep` devices, each also
splitting the batch over `mesh.data`).

swap: `seed` changes only the new head columns, the LoRA init and the dropout rng. Rows hold
top-1 on the R, F and L test and validation sets after the last stage; the score is
Acc_R + Acc_L - Acc_F on validation; pareto.png plots test Acc_F against Acc_R.
dispose: one transfer stage is shared (workdir/transfer/), then each member's dispose stage
(its lr and loss weights); every PL attack of `pl.attacks` then runs on each member's released
model, against the unscrubbed and random models attacked once. Rows hold target and
source-head accuracy (test and validation), and per attack the PL accuracy of the member and
of the two reference models, and the leakage; the score is validation target accuracy -
100 x mean leakage; pareto.png plots leakage against target accuracy.
forget: every task of every member runs vmapped; each task merges a member's chosen LoRA
into its own copy of the LoRA-target kernels (`member_params`, the rest stays shared), and
each member keeps its own best LoRA per task (validation H) and its own class prototypes.
Rows hold per-task test Acc_r / Acc_f / Acc_o / H and validation H (`tasks`), the last task's
accuracies and the accuracy on every forgotten class; the score is the mean validation H over
tasks; pareto.png plots the accuracy on forgotten classes against Acc_r.

Writes workdir/sweep.json (one row per member), workdir/pareto.png and the best member's
model (LoRA merged) in workdir/best/model, usable as `init.checkpoint` of other jobs.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable

import jax
import matplotlib
import ml_collections
import numpy as np

from kswap_jax import builders, continual, dtl, loop, sharding, swap, sweep, train, workdir
from kswap_jax import lora as lora_lib
from kswap_jax.data import pipeline
from kswap_jax.errors import UserError
from kswap_jax.jobs import dispose as dispose_job
from kswap_jax.jobs import forget as forget_job
from kswap_jax.jobs import swap as swap_job
from kswap_jax.metrics import h_mean, set_accuracy
from kswap_jax.progress import say, table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

SETS = ("retain", "forget", "learn")
ACCS_CF = ("acc_r", "acc_f", "acc_o")  # continual forgetting: retained, this task's, earlier


@dataclasses.dataclass
class _Trained:
  """A group's members after training: rows ("member": index in the group), model(j) -> the
  released params of member j, and each member's final trainable tree (swap, dispose)."""
  rows: list[dict]
  model: Callable[[int], dict]
  model_cfg: ml_collections.ConfigDict
  labels: pipeline.LabelSpace
  trainable: list | None = None


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  """Trains every member; returns {"members": rows, "best": index, "trainable": per member}.

  "trainable" (each member's final {"lora", "params"}, host arrays; swap and dispose) is not
  saved.
  """
  assignments = sweep.expand(config.get("grid"), config.get("members"))
  groups = sweep.groups(assignments, config.method, config.base)
  if config.mesh.get("rules"):
    raise UserError("a sweep places its stacked state by member (mesh.sweep); remove mesh.rules")
  workdir.check_config(run_dir, config)  # after the refusals: a corrected config may reuse it
  runner = {"swap": _run_swap, "dispose": _run_dispose, "forget": _run_forget}[config.method]
  bases = [sweep.member_config(config.base, fixed) for fixed, _ in groups]
  if len(groups) > 1:
    _share_pretraining(config.base, bases, run_dir)
  rows, trained = [None] * len(assignments), [None] * len(assignments)
  for g, ((fixed, idx), base) in enumerate(zip(groups, bases)):
    gcfg = ml_collections.ConfigDict(config.to_dict())
    gcfg.base = base
    gdir = run_dir if len(groups) == 1 else os.path.join(run_dir, f"group_{g}")
    if len(groups) > 1:
      say(f"group {g} of {len(groups)}: {fixed or 'base values'}, {len(idx)} members")
    out = runner(gcfg, gdir, [assignments[i] for i in idx],
                 [sweep.member_config(config.base, assignments[i]) for i in idx])
    for j, i in enumerate(idx):
      rows[i] = {**out.rows[j], "member": i}
      trained[i] = (out, j)
  results = _finish(run_dir, rows, assignments, config, trained)
  if trained[0][0].trainable is not None:
    results["trainable"] = [out.trainable[j] for out, j in trained]
  return results


def _share_pretraining(base, bases, run_dir) -> None:
  """Groups whose init is the base's pretraining share one run of it in run_dir/pretrain."""
  if base.init.get("checkpoint") or "pretrain" not in base.init:
    return
  same = [b for b in bases if b.init.to_dict() == base.init.to_dict()]
  if same:
    builders.initial_model(base, run_dir)
    for b in same:
      b.init.checkpoint = os.path.join(run_dir, "pretrain")


def _run_swap(config, run_dir, assignments, configs) -> _Trained:
  base = config.base
  if base.head == "frozen" and len({c.seed for c in configs}) > 1:
    raise UserError("seed changes the new head columns, which head='frozen' shares between "
                    "members; sweep seed with head='train'")
  params, model_cfg, labels, sets, num_new = swap_job.prepare(base, run_dir)
  params = jax.device_get(params)  # host copy: each chunk's donated state gets fresh buffers
  val = {n: builders.example_set(base.data, base.sets[n],
                                 builders.split_of(base.data, base.sets[n], "val"), labels,
                                 f"sets.{n}", subset=False) for n in SETS}
  pools = {"": {n: sets[n][1] for n in SETS}, "val_": val}  # test, validation
  mesh = sharding.make_mesh(config.mesh)
  net = builders.network(base, model_cfg)
  tx = train.make_optimizer()

  def initial_state(i):
    s = swap_job.initial_state(configs[i], params, num_new, net, tx)
    s["hparams"]["end_ratio"] = np.float32(configs[i].train.lr_end / configs[i].train.lr)
    return s

  stages = [(kind, n, sweep.vmap_step(sweep.member_step(
      swap.stage_loss(net, kind, base.sparse_group), tx, net.rng_impl, n, per_epoch)), batches)
            for kind, n, per_epoch, batches in swap_job.stage_inputs(
                base, sets, sharding.data_sharding(mesh))]
  count_fn = sweep.member_counts(train.correct_counts(net, len(labels)))
  rows, trainable = [], []
  for idx, state in _train_chunks(config, run_dir, mesh, stages, initial_state, len(configs),
                                  f"{config.method}, {base.order}"):
    accs = {f"{prefix}acc_{n[0]}": _accuracy(count_fn, state, examples, base, mesh)
            for prefix, pool in pools.items() for n, examples in pool.items()}
    for j, i in enumerate(idx):
      row = {"member": i, **assignments[i], **{k: float(v[j]) for k, v in accs.items()}}
      rows.append({**row, "score": sweep.score(row)})
      trainable.append(jax.device_get(sweep.member(state["trainable"], j)))
    frozen = state["params"]

  def best_model(b):
    return lora_lib.merge(train.combine(frozen, trainable[b]["params"]), trainable[b]["lora"],
                          net.lora_scale)

  return _Trained(rows, best_model, model_cfg, labels, trainable)


def _run_dispose(config, run_dir, assignments, configs) -> _Trained:
  """One shared transfer stage, then the members' dispose stages vmapped, then PL attacks."""
  base = config.base
  mesh = sharding.make_mesh(config.mesh)
  d = dispose_job.prepare(base, run_dir, mesh)
  val = {n: (None, builders.example_set(base.data, base[n],
                                        builders.split_of(base.data, base[n], "val"),
                                        d.labels[n], n, subset=False))
         for n in ("target", "source")}
  transfer = loop.Stage("transfer", d.steps["transfer"],
                        sharding.compile_step(d.step("transfer"), mesh, d.state_sharding),
                        functools.partial(d.batches, with_source=False))
  ckpts = workdir.Checkpoints(os.path.join(run_dir, "transfer", "checkpoints"),
                              config.checkpoint.every_steps, config.checkpoint.keep)
  transferred = jax.device_get(loop.run(d.state, [transfer], ckpts,
                                        os.path.join(run_dir, "transfer"), config.log_every))
  attacks = dispose_job.pl_attackers(base, d.pl_cfg, mesh, d.sets["pl"])
  floor = dispose_job.pl_results(attacks, {"unscrubbed": d.released(transferred),
                                           "random": d.random_model()})

  def initial_state(i):
    c = configs[i]
    s = d.start_dispose(transferred, c.train.lr.dispose,
                        {k: c.weights[k] for k in dtl.HPARAMS})
    s["hparams"]["end_ratio"] = np.float32(c.train.lr_end / c.train.lr.dispose)
    return s

  # The transfer stage is done in every chunk's state; the loop starts at the dispose stage.
  stages = [("transfer", d.steps["transfer"], None, None),
            ("dispose", d.steps["dispose"], sweep.vmap_step(sweep.member_step(
                d.loss("dispose"), d.tx, d.net.rng_impl, d.steps["dispose"],
                d.samplers[0].steps_per_epoch)),
             functools.partial(d.batches, with_source=d.method != "none"))]
  rows, trainable = [], []
  for idx, state in _train_chunks(config, run_dir, mesh, stages[1:], initial_state,
                                  len(configs), f"{config.method}, {d.method}",
                                  done=stages[:1]):
    for j, i in enumerate(idx):
      one = {**state, "trainable": sweep.member(state["trainable"], j)}
      row = {"member": i, **assignments[i], **d.accuracies(one),
             **{f"val_{k}": v for k, v in d.accuracies(one, sets=val).items()}}
      scrubbed = d.released(one)
      for variant, attack in attacks.items():
        pl = attack(scrubbed)
        row.update({f"pl_{variant}": pl, f"pl_unscrubbed_{variant}": floor[variant]["unscrubbed"],
                    f"pl_random_{variant}": floor[variant]["random"]})
        row[f"leakage_{variant}"] = dtl.leakage(pl, floor[variant]["unscrubbed"],
                                                floor[variant]["random"])
      leaks = [row[f"leakage_{v}"] for v in attacks if row[f"leakage_{v}"] == row[f"leakage_{v}"]]
      row["leakage"] = float(np.mean(leaks)) if leaks else float("nan")
      row["score"] = row["val_target_acc"] - (100 * row["leakage"] if leaks else 0.0)
      rows.append(row)
      trainable.append(jax.device_get(one["trainable"]))
    frozen = state["params"]

  def best_model(b):
    return d.released({"params": frozen, "trainable": trainable[b]})

  return _Trained(rows, best_model, d.tgt_cfg, d.labels["target"], trainable)


def _run_forget(config, run_dir, assignments, configs) -> _Trained:
  """Continual forgetting: the members' tasks vmapped, each member with its own merged model
  and its own best-LoRA selection (validation H, `select_best`)."""
  base = config.base
  mesh = sharding.make_mesh(config.mesh)
  f = forget_job.prepare(base, run_dir, mesh, with_val=True)
  for c in configs:
    f.check_weights(c)
  # The kernels a task's LoRA merge changes are each member's own; other frozen params stay
  # shared (trained params are per member in "trainable").
  own_regex = f"(?:{base.lora.targets})/kernel" if f.method.lora else ""
  counts = sweep.member_counts(f.counts)

  def split(state):
    shared, own = train.partition(state["params"], own_regex)
    return {**state, "params": shared, "member_params": own}

  def initial_state(i):
    s = f.initial_state(configs[i])
    s["hparams"]["end_ratio"] = np.float32(configs[i].train.lr_end / configs[i].train.lr)
    return split(s)

  @jax.jit
  @functools.partial(jax.vmap, in_axes=(None, 0, 0))
  def fold(shared, own, chosen):
    """Each member's own kernels with its chosen LoRA merged in."""
    merged = lora_lib.merge(train.combine(shared, own), chosen["lora"], f.net.lora_scale)
    return train.partition(merged, own_regex)[1]

  def task_accs(params, model, examples, task) -> list[dict]:
    """Each member's Acc_r / Acc_f / Acc_o (and its per-class counts) on `examples`."""
    correct, count = train.evaluate(counts, params, model, examples,
                                    base.data.eval_batch_size, mesh)
    return [{**forget_job.task_accuracies(c, n, task), "counts": (c, n)}
            for c, n in zip(correct, count)]

  def merged(state):
    """((shared, each member's merged kernels), trainable of the merged models)."""
    chosen = continual.chosen(state)
    return ((state["params"], fold(state["params"], state["member_params"], chosen)),
            {"params": chosen["params"], "lora": {}})

  state_sharding = sharding.member_shardings(initial_state(0), mesh, sweep.STATE_AXES)
  recs = {}  # first member of a chunk -> its per-task rows

  def chunk_stages(idx, chunk_dir, stages):
    path = os.path.join(chunk_dir, "results.json")
    rec = recs[idx.start] = workdir.read_json(path, {"tasks": {}})  # task -> member -> row

    def begin(state, t, task):
      params, model = merged(state)
      test, val = (task_accs(params, model, s, task) for s in (f.test_set, f.val_set))
      rec["tasks"][str(t)] = {str(j): {**{f"{k}_before": test[j][k] for k in ACCS_CF},
                                       **{f"val_{k}_before": val[j][k] for k in ACCS_CF}}
                              for j in range(len(idx))}
      workdir.write_json(path, rec)
      shared, own = params
      states = []
      for j, i in enumerate(idx):
        one = {k: sweep.member(v, j) if sweep.STATE_AXES[k] == 0 else v
               for k, v in state.items() if k != "member_params"}
        full = train.combine(train.combine(shared, sweep.member(own, j)),
                             sweep.member(model["params"], j))
        states.append(split(f.start({**one, "params": full}, full, t, configs[i])))
      return jax.device_put(sweep.stack_states(states), state_sharding)

    def end(state, t, task):
      params, model = merged(state)
      test, val = (task_accs(params, model, s, task) for s in (f.test_set, f.val_set))
      gone = task.old + task.forget
      for j in range(len(idx)):
        r = rec["tasks"][str(t)][str(j)]
        r.update({k: test[j][k] for k in ACCS_CF},
                 acc_forgotten=set_accuracy(*test[j]["counts"], gone),
                 H=h_mean(test[j]["acc_r"], r["acc_f_before"], test[j]["acc_f"]),
                 val_H=h_mean(val[j]["acc_r"], r["val_acc_f_before"], val[j]["acc_f"]))
      workdir.write_json(path, rec)
      say(table([{"member": i, **rec["tasks"][str(t)][str(j)]} for j, i in enumerate(idx)],
                ["member", "acc_r", "acc_f_before", "acc_f", "acc_o", "H", "val_H"]))

    def select(state, batches, *, t, task, step_fn):
      s, data = batches
      state, metrics = step_fn(state, data)
      if f.eval_now(t, s):
        accs = task_accs((state["params"], state["member_params"]), state["trainable"],
                         f.val_set, task)
        h = [h_mean(a["acc_r"], rec["tasks"][str(t)][str(j)]["val_acc_f_before"], a["acc_f"])
             for j, a in enumerate(accs)]
        state = jax.device_put(continual.keep_best(state, h), state_sharding)
      return state, metrics

    return [dataclasses.replace(st, step=functools.partial(select, t=t, task=task,
                                                           step_fn=st.step),
                                batches=functools.partial(f.batches, t),
                                begin=functools.partial(begin, t=t, task=task),
                                end=functools.partial(end, t=t, task=task))
            for t, (task, st) in enumerate(zip(f.tasks, stages))]

  stages = [(f"task {t}", f.steps(t), sweep.vmap_step(sweep.with_member_params(
      forget_job.with_context(sweep.member_step(f.loss(t), f.tx, f.net.base.rng_impl,
                                                f.steps(t),
                                                f.samplers[t][0].steps_per_epoch)))),
             lambda s, t=t: f.batches(t, s)[1]) for t in range(len(f.tasks))]
  rows, models = [], []
  for idx, state in _train_chunks(config, run_dir, mesh, stages, initial_state, len(configs),
                                  f"{config.method}, {base.method}", chunk_stages=chunk_stages):
    rec = recs[idx.start]
    (shared, own), model = jax.device_get(merged(state))
    for j, i in enumerate(idx):
      tasks = [rec["tasks"][str(t)][str(j)] for t in range(len(f.tasks))]
      last = tasks[-1]
      rows.append({"member": i, **assignments[i],
                   **{k: last[k] for k in (*ACCS_CF, "acc_forgotten")},
                   "H": float(np.mean([r["H"] for r in tasks])),
                   "val_H": float(np.mean([r["val_H"] for r in tasks])),
                   "score": float(np.mean([r["val_H"] for r in tasks])), "tasks": tasks})
      models.append(train.combine(train.combine(shared, sweep.member(own, j)),
                                  sweep.member(model["params"], j)))

  return _Trained(rows, lambda j: models[j], f.model_cfg, f.labels)


def _train_chunks(config, run_dir, mesh, stages, initial_state, n: int, what: str, done=(),
                  chunk_stages=None):
  """Yields (member indices, trained stacked state) per chunk of members.

  stages: (name, steps, vmapped step, batches) to train; done: stages every member state has
  already finished (their steps count in state["step"]); chunk_stages(idx, chunk_dir,
  loop stages) -> loop stages: a chunk's own begin / end / step hooks around the compiled steps.
  """
  devices = mesh.shape.get("sweep", 1)
  if n % devices:
    raise UserError(f"{n} members cannot split over mesh.sweep={devices} devices; give a "
                    f"multiple of {devices} members or a smaller mesh.sweep")
  state_sharding = sharding.member_shardings(initial_state(0), mesh, sweep.STATE_AXES)
  size = config.members_per_chunk
  if size < 0:
    size = _fitting_chunk([st[2] for st in stages], [st[3](0) for st in stages], initial_state,
                          n, devices)
  if (size or n) % devices:
    raise UserError(f"chunks of {size or n} members cannot split over mesh.sweep={devices} "
                    f"devices; make members_per_chunk (or the member count) a multiple of "
                    f"{devices}")
  say(f"sweep ({what}): {n} members in chunks of {size or n}, {devices} member group(s) side "
      f"by side")
  loop_stages = ([loop.Stage(name, steps, None, None) for name, steps, *_ in done]
                 + [loop.Stage(name, steps, sharding.compile_step(step, mesh, state_sharding,
                                                                   gather=False), batches)
                    for name, steps, step, batches in stages])
  for c, idx in enumerate(sweep.chunks(n, size)):
    state = jax.device_put(sweep.stack_states([initial_state(i) for i in idx]), state_sharding)
    chunk_dir = os.path.join(run_dir, f"chunk_{c}")
    ckpts = workdir.Checkpoints(os.path.join(chunk_dir, "checkpoints"),
                                config.checkpoint.every_steps, config.checkpoint.keep)
    own = chunk_stages(idx, chunk_dir, loop_stages) if chunk_stages else loop_stages
    yield idx, loop.run(state, own, ckpts, chunk_dir, config.log_every)


def _report(config) -> tuple:
  """(score text, table columns, Pareto x, y, colour as (row key, label)) of a method."""
  if config.method == "swap":
    return ("val Acc_R + val Acc_L - val Acc_F",
            ["acc_r", "acc_f", "acc_l", "val_acc_r", "val_acc_f", "val_acc_l"],
            ("acc_r", "Acc_R"), ("acc_f", "Acc_F"), ("acc_l", "Acc_L"))
  if config.method == "dispose":
    return ("val target acc - 100 x mean PL leakage",
            ["target_acc", "source_acc", "val_target_acc",
             *(f"pl_{v}" for v in config.base.pl.attacks), "leakage"],
            ("target_acc", "target accuracy"), ("leakage", "PL leakage"), None)
  return ("mean val H over tasks", ["acc_r", "acc_f", "acc_o", "acc_forgotten", "H", "val_H"],
          ("acc_r", "Acc_r"), ("acc_forgotten", "Acc on all forgotten classes"),
          ("H", "mean H"))


def _finish(run_dir, rows, assignments, config, trained) -> dict:
  """Writes sweep.json, prints the table, exports the best member and draws the Pareto plot.

  trained[i]: (the `_Trained` of member i's group, its index there)."""
  score, columns, x, y, colour = _report(config)
  best = max(range(len(rows)), key=lambda i: rows[i]["score"])
  results = {"members": rows, "best": best, "score": score}
  workdir.write_json(os.path.join(run_dir, "sweep.json"), results)
  keys = list(dict.fromkeys(k for a in assignments for k in a))
  say(table(rows, ["member", *keys, *columns, "score"], floatfmt="{:.4g}"))
  say(f"best (validation score): member {best} {assignments[best]}")
  out, j = trained[best]
  workdir.export_model(os.path.join(run_dir, "best", "model"), out.model(j), out.model_cfg,
                       out.labels.to_json(), extra={"sweep_member": rows[best]})
  if workdir.is_main():
    _pareto_plot(rows, best, os.path.join(run_dir, "pareto.png"), x, y, colour)
  return results


def _fitting_chunk(steps, batches, initial_state, n: int, devices: int) -> int:
  """Members per chunk that fit device memory, from XLA's memory analysis of each stage's
  step compiled for 1 and 2 members (75% of the device's memory is the budget)."""
  need = []
  for m in (1, 2):
    state = sweep.stack_states([initial_state(i % n) for i in range(m)])
    need.append(max(sweep.compiled_bytes(jax.jit(step, donate_argnums=0).lower(
        state, b).compile()) for step, b in zip(steps, batches)))
  budget = int(0.75 * sweep.device_memory_bytes(jax.devices()[0]))
  size = sweep.fit_members(*need, n, budget, devices)
  say(f"memory: {need[0] / 2**20:.0f} MiB for one member, +{(need[1] - need[0]) / 2**20:.0f} "
      f"MiB per further member, budget {budget / 2**30:.1f} GiB per device -> chunks of {size}")
  return size


def _accuracy(count_fn, state, examples, base, mesh) -> np.ndarray:
  """Top-1 (%) of each member on `examples`, (N,)."""
  correct, count = train.evaluate(count_fn, (state["params"], {}), state["trainable"],
                                  examples, base.data.eval_batch_size, mesh)
  return 100 * correct.sum(-1) / count.sum(-1)


def _pareto_plot(rows: list[dict], best: int, path: str, x: tuple[str, str],
                 y: tuple[str, str], colour: tuple[str, str] | None) -> None:
  """y (lower is better) against x (higher is better) per member, the Pareto front and the
  chosen member; x, y, colour: (row key, axis label)."""
  xs, ys = (np.array([row[k[0]] for row in rows], float) for k in (x, y))
  front = np.flatnonzero(sweep.pareto_front(xs, ys))
  front = front[np.argsort(xs[front])]
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.plot(xs[front], ys[front], "-", color="grey", lw=1, label="Pareto front")
  if colour:
    points = ax.scatter(xs, ys, c=[row[colour[0]] for row in rows], cmap="viridis", s=30)
    fig.colorbar(points, ax=ax, label=f"{colour[1]} (test %)")
  else:
    ax.scatter(xs, ys, s=30)
  ax.scatter(xs[best], ys[best], s=160, facecolors="none", edgecolors="red",
             label="best on validation")
  ax.set_xlabel(f"{x[1]} (test %)")
  ax.set_ylabel(y[1] if y[0] == "leakage" else f"{y[1]} (test %)")
  ax.legend(fontsize=8)
  ax.set_title(f"{len(rows)} members: {x[1]} vs {y[1]}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
