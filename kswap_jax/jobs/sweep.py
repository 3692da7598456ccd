"""`sweep`: many runs of one method (now: `swap`) trained together as one vmapped program.

Members are the base config with the values of `members` / `grid` set (see kswap_jax.sweep).
They share the pretrained model, the data and its order (from `base.seed`); `seed` changes
only the new head columns, the LoRA init and the dropout rng. Members train in chunks of
`members_per_chunk` (0: all at once; -1: as many as fit 75% of a device's memory, estimated
from XLA's memory analysis), each chunk resumable from workdir/chunk_<i>/. A chunk's members
are split over the mesh axis `sweep` (`mesh.sweep` devices, each also splitting the batch
over `mesh.data`).

Writes workdir/sweep.json (one row per member: its values, top-1 on the R, F and L test and
validation sets after the last stage, and the selection score Acc_R + Acc_L - Acc_F on
validation), workdir/pareto.png (test Acc_F vs Acc_R, colour Acc_L) and the best member's
model (LoRA merged) in workdir/best/model, usable as `init.checkpoint` of other jobs.
"""
from __future__ import annotations

import functools
import os

import jax
import matplotlib
import ml_collections
import numpy as np

from kswap_jax import builders, loop, sharding, swap, sweep, train, workdir
from kswap_jax import lora as lora_lib
from kswap_jax.errors import UserError
from kswap_jax.jobs import swap as swap_job
from kswap_jax.progress import say, table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

SETS = ("retain", "forget", "learn")


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  """Trains every member; returns {"members": rows, "best": index, "trainable": per member}.

  "trainable" (each member's final {"lora", "params"}, host arrays) is not saved.
  """
  workdir.check_config(run_dir, config)
  assignments = sweep.expand(config.get("grid"), config.get("members"))
  sweep.check_keys(assignments, config.method)
  base = config.base
  if config.mesh.get("rules"):
    raise UserError("a sweep places its stacked state by member (mesh.sweep); remove mesh.rules")
  configs = [sweep.member_config(base, a) for a in assignments]
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
  devices = mesh.shape.get("sweep", 1)
  net = builders.network(base, model_cfg)
  tx = train.make_optimizer()

  def initial_state(i):
    s = swap_job.initial_state(configs[i], params, num_new, net, tx)
    s["hparams"]["end_ratio"] = np.float32(configs[i].train.lr_end / configs[i].train.lr)
    return s

  state_sharding = sharding.member_shardings(initial_state(0), mesh, sweep.STATE_AXES)
  steps, stages = [], []
  for kind, num_steps, per_epoch, batches in swap_job.stage_inputs(
      base, sets, sharding.data_sharding(mesh)):
    steps.append(sweep.vmap_step(_member_step(net, base, kind, tx, num_steps, per_epoch)))
    stages.append(loop.Stage(kind, num_steps, sharding.compile_step(
        steps[-1], mesh, state_sharding, gather=False), batches))
  count_fn = _member_counts(net, len(labels))
  size = config.members_per_chunk
  if size < 0:
    size = _fitting_chunk(steps, [st.batches(0) for st in stages], initial_state, len(configs),
                          devices)
  if (size or len(configs)) % devices:
    raise UserError(f"chunks of {size or len(configs)} members cannot split over mesh.sweep="
                    f"{devices} devices; make members_per_chunk (or the member count) a "
                    f"multiple of {devices}")
  say(f"sweep ({config.method}, {base.order}): {len(configs)} members in chunks of "
      f"{size or len(configs)}, {devices} member group(s) side by side")

  rows, trainable = [], []
  for c, idx in enumerate(sweep.chunks(len(configs), size)):
    state = jax.device_put(sweep.stack_states([initial_state(i) for i in idx]), state_sharding)
    chunk_dir = os.path.join(run_dir, f"chunk_{c}")
    ckpts = workdir.Checkpoints(os.path.join(chunk_dir, "checkpoints"),
                                config.checkpoint.every_steps, config.checkpoint.keep)
    state = loop.run(state, stages, ckpts, chunk_dir, config.log_every)
    accs = {f"{prefix}acc_{n[0]}": _accuracy(count_fn, state, examples, base, mesh)
            for prefix, pool in pools.items() for n, examples in pool.items()}
    for j, i in enumerate(idx):
      row = {"member": i, **assignments[i], **{k: float(v[j]) for k, v in accs.items()}}
      rows.append({**row, "score": sweep.score(row)})
      trainable.append(jax.device_get(sweep.member(state["trainable"], j)))

  best = max(range(len(rows)), key=lambda i: rows[i]["score"])
  results = {"members": rows, "best": best, "score": "val Acc_R + val Acc_L - val Acc_F"}
  workdir.write_json(os.path.join(run_dir, "sweep.json"), results)
  keys = list(dict.fromkeys(k for a in assignments for k in a))
  say(table(rows, ["member", *keys, "acc_r", "acc_f", "acc_l", "val_acc_r", "val_acc_f",
                   "val_acc_l", "score"], floatfmt="{:.4g}"))
  say(f"best (validation score): member {best} {assignments[best]}")
  frozen = state["params"]
  merged = lora_lib.merge(train.combine(frozen, trainable[best]["params"]),
                          trainable[best]["lora"], net.lora_scale)
  workdir.export_model(os.path.join(run_dir, "best", "model"), merged, model_cfg,
                       labels.to_json(), extra={"sweep_member": rows[best]})
  if workdir.is_main():
    _pareto_plot(rows, best, os.path.join(run_dir, "pareto.png"))
  return {**results, "trainable": trainable}


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


def _member_step(net: train.Network, base: ml_collections.ConfigDict, kind: str, tx,
                 steps: int, per_epoch: int):
  """One member's update; its lr schedule ends at lr_end (hparams["end_ratio"] = lr_end / lr)."""
  loss_fn = swap.stage_loss(net, kind, base.sparse_group)

  def step(state, batches):
    schedule = functools.partial(train.lr_factor, total_steps=steps, steps_per_epoch=per_epoch,
                                 end_ratio=state["hparams"]["end_ratio"])
    return train.make_step(loss_fn, tx, schedule, net.rng_impl)(state, batches)

  return step


def _member_counts(net: train.Network, num_classes: int):
  """Jitted (frozen, stacked trainable, batch) -> per-member (correct, count), each (N, K)."""
  counts = train.correct_counts(net, num_classes)
  return jax.jit(jax.vmap(lambda frozen, t, b: counts(train.combine(frozen, t["params"]),
                                                      t["lora"], b), in_axes=(None, 0, None)))


def _accuracy(count_fn, state, examples, base, mesh) -> np.ndarray:
  """Top-1 (%) of each member on `examples`, (N,)."""
  correct, count = train.evaluate(count_fn, state["params"], state["trainable"], examples,
                                  base.data.eval_batch_size, mesh)
  return 100 * correct.sum(-1) / count.sum(-1)


def _pareto_plot(rows: list[dict], best: int, path: str) -> None:
  """Test Acc_F vs Acc_R per member (colour Acc_L), the Pareto front and the chosen member."""
  r, f, l = (np.array([row[k] for row in rows]) for k in ("acc_r", "acc_f", "acc_l"))
  front = np.flatnonzero(sweep.pareto_front(r, f))
  front = front[np.argsort(r[front])]
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.plot(r[front], f[front], "-", color="grey", lw=1, label="Pareto front")
  points = ax.scatter(r, f, c=l, cmap="viridis", s=30)
  ax.scatter(r[best], f[best], s=160, facecolors="none", edgecolors="red",
             label="best on validation")
  fig.colorbar(points, ax=ax, label="Acc_L (test %)")
  ax.set_xlabel("Acc_R (test %)")
  ax.set_ylabel("Acc_F (test %)")
  ax.legend(fontsize=8)
  ax.set_title(f"{len(rows)} members: retain vs forget")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
