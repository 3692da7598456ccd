"""One runner for every run: trains N >= 1 members of a method's recipe (`kswap_jax.methods`).

`run(method, config, workdir)` is a single run, N = 1: its step is the plain compiled program
(`sharding.compile_step`, so `mesh.rules` can shard the params, FSDP style).
`sweep(config, workdir)` is a study: the members of `config.grid` / `config.members` over
`config.base`, stacked along a leading axis and trained as one vmapped program
(`kswap_jax.sweep`), in chunks, split over the mesh axis `sweep`. Both resume from the latest
checkpoint, and both call the same recipe hooks, on one member's state at a time, so a study's
member computes what its single run computes.

A study's workdir:

  pretrain/                     the base's pretraining (when init.checkpoint is empty), shared
  [group_<g>/]                  one per value of keys outside the recipe's `sweepable`
    <stage>/                    the recipe's shared stages (e.g. dispose's transfer), run once
    chunk_<c>/checkpoints/      a chunk of members: stacked train state
    chunk_<c>/member_<i>/results.json   member i's results, as its single run writes them
  sweep.json, pareto.png        one row per member, its score; best/model: the best member
"""
from __future__ import annotations

import copy
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kswap_jax import builders, checkpoints, config_lib, loop, methods, recipe, sharding
from kswap_jax import sweep as sweep_lib
from kswap_jax import train, workdir
from kswap_jax.errors import UserError
from kswap_jax.progress import say, table

State = train.State


def run(method: str, config: ml_collections.ConfigDict, run_dir: str) -> dict:
  """A single run of `method` in `run_dir`; returns its results (results.json).

  Refuses bad input before any work, and records config.json only once the config has passed
  every check; a finished run is reported, not run again.
  """
  cls = methods.get(method)
  config_lib.check(config)
  with workdir.lock(workdir.open_dir(run_dir)):
    workdir.check_config(run_dir, config, record=False)
    if workdir.finished(run_dir):
      results = workdir.read_json(os.path.join(run_dir, "results.json"), {})
      say(f"{method}: the run in {run_dir} has finished (results.json there):\n"
          f"{cls.report(results)}")
      return results
    builders.check_sets(config)
    init = ensure_init(config, os.path.join(run_dir, "pretrain"))
    rec = cls(config, run_dir, init, sharding.make_mesh(config.mesh))
    rec.check(config)
    workdir.check_config(run_dir, config)
    member = _member(config, run_dir, export=True)
    state = _train_one(rec, member, rec.stages(), rec.initial_state(config), run_dir, config)
    rec.finish(member, state)
    workdir.mark_finished(run_dir)
  return member.results


def ensure_init(config: ml_collections.ConfigDict, pretrain_dir: str) -> str:
  """The model a run starts from: init.checkpoint, or else the pretrain run of init.pretrain
  in `pretrain_dir` (trained there first, reported when done); "" when the config names none."""
  init = config.get("init", ml_collections.ConfigDict())
  if init.get("checkpoint"):
    return init.checkpoint
  if "pretrain" not in init:
    return ""
  run("pretrain", init.pretrain, pretrain_dir)
  return pretrain_dir


def _member(config, directory: str, export: bool, results: dict | None = None) -> recipe.Member:
  """A member whose results continue its results.json, else start from `results`."""
  saved = workdir.read_json(os.path.join(directory, "results.json"))
  return recipe.Member(config, directory, export,
                       saved if saved is not None else copy.deepcopy(results or {}))


def _train_one(rec: recipe.Recipe, member: recipe.Member, stages: list[recipe.Stage],
               state: State, run_dir: str, settings: ml_collections.ConfigDict) -> State:
  """Trains one member through `stages`, resuming from run_dir/checkpoints.

  settings: the config whose checkpoint, log_every and mesh.rules apply.
  """
  mesh = rec.mesh
  shardings = sharding.state_shardings(state, mesh, settings.mesh.get("rules", ()))
  state = jax.device_put(state, shardings, may_alias=False)  # steps donate it
  rec.start(member, state)
  placed = lambda s: jax.device_put(s, shardings)  # noqa: E731

  def loop_stage(st: recipe.Stage) -> loop.Stage:
    step = train.make_step(st.loss, rec.tx, st.schedule(st.end_ratio(member.config)),
                           rec.rng_impl, st.context)
    out = loop.Stage(st.name, st.num_steps, sharding.compile_step(step, mesh, shardings),
                     st.batches)
    if st.begin:
      out.begin = lambda s: placed(st.begin(member, s))
    if st.select:
      out.after = lambda s, i: placed(st.select(member, s)) if st.select_at(i) else s
    if st.end:
      out.end = lambda s: st.end(member, s)
    return out

  ckpts = checkpoints.Checkpoints(os.path.join(run_dir, "checkpoints"),
                                  settings.checkpoint.every_steps, settings.checkpoint.keep)
  return loop.run(state, [loop_stage(st) for st in stages], ckpts, run_dir, settings.log_every)



def sweep(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  """Trains every member of a study; returns {"members": rows, "best": index, "score": how it
  ranks, "trainable": each member's final {"lora", "params"} (host arrays, not saved)}.

  A member whose training diverged (non-finite params) gets score -inf and "diverged" in its
  row, and is never the best; the others go on.
  """
  cls = methods.get(config.method)
  config_lib.check(config)
  assignments = sweep_lib.expand(config.get("grid"), config.get("members"))
  groups = sweep_lib.groups(assignments, cls.sweepable, config.base)
  for a in assignments:
    config_lib.check(sweep_lib.member_config(config.base, a))
  if config.mesh.get("rules"):
    raise UserError("a sweep places its stacked state by member (mesh.sweep); remove mesh.rules")
  rows, trainable, best = [None] * len(assignments), [None] * len(assignments), None
  with workdir.lock(workdir.open_dir(run_dir)):
    workdir.check_config(run_dir, config, record=False)
    if workdir.finished(run_dir):
      results = workdir.read_json(os.path.join(run_dir, "sweep.json"))
      say(f"sweep: the study in {run_dir} has finished (sweep.json there); best: member "
          f"{results['best']}")
      return results
    builders.check_sets(config.base)
    workdir.check_config(run_dir, config)
    for g, (fixed, idx) in enumerate(groups):
      base = sweep_lib.member_config(config.base, fixed)
      gdir = run_dir if len(groups) == 1 else os.path.join(run_dir, f"group_{g}")
      if len(groups) > 1:
        say(f"group {g} of {len(groups)}: {fixed or 'base values'}, {len(idx)} members")
      shared_init = base.init.to_dict() == config.base.init.to_dict()
      init = ensure_init(base, os.path.join(run_dir if shared_init else gdir, "pretrain"))
      rec = cls(base, gdir, init, sharding.make_mesh(config.mesh))
      configs = {i: sweep_lib.member_config(config.base, assignments[i]) for i in idx}
      for c in configs.values():
        rec.check(c)
      for i, member, state in _train_members(rec, configs, gdir, config):
        released = rec.released(state)
        finite = bool(loop.all_finite((released, state["trainable"])))
        released = jax.device_get(released)
        row = {"member": i, **assignments[i], **rec.row(member)}
        score = rec.score(row)
        if not finite:
          row["diverged"], score = True, -np.inf
        rows[i] = {**row, "score": score if score == score else -np.inf}
        trainable[i] = jax.device_get(state["trainable"])
        if best is None or (rows[i]["score"], -i) > (best[0], -best[1]):
          best = (rows[i]["score"], i, released, rec)
    _, b, params, rec = best
    results = {"members": rows, "best": b, "score": cls.score_text}
    workdir.write_json(os.path.join(run_dir, "sweep.json"), results)
    keys = list(dict.fromkeys(k for a in assignments for k in a))
    say(table(rows, ["member", *keys, *rec.columns, "score"], floatfmt="{:.4g}"))
    if best[0] == -np.inf:
      raise UserError(f"every member of the study diverged or scored nothing (sweep.json in "
                      f"{run_dir}); lower the learning rates or loss weights")
    say(f"best (validation score): member {b} {assignments[b]}")
    checkpoints.export_model(os.path.join(run_dir, "best", "model"), params, rec.model_cfg,
                             rec.labels.to_json(), extra={"sweep_member": rows[b]})
    if workdir.is_main():
      sweep_lib.pareto_plot(rows, b, os.path.join(run_dir, "pareto.png"), *rec.pareto)
    workdir.mark_finished(run_dir)
  return {**results, "trainable": trainable}


def _train_members(rec: recipe.Recipe, configs: dict[int, ml_collections.ConfigDict],
                   gdir: str, settings: ml_collections.ConfigDict,
                   ) -> Iterator[tuple[int, recipe.Member, State]]:
  """Yields (member index, Member, its final one-member state) for a group's members.

  The recipe's leading shared stages run once, as a single run in gdir/<first stage>; the
  members start from its final state and results. The rest train chunk by chunk.
  """
  stages = rec.stages()
  k = next((n for n, st in enumerate(stages) if not st.shared), len(stages))
  prefix, rest = stages[:k], stages[k:]
  if not rest:
    raise UserError(f"every stage of {rec.name} is shared by a study's members; nothing varies")
  initial, start = rec.initial_state, None
  if prefix:
    pdir = os.path.join(gdir, prefix[0].name)
    first = _member(rec.config, pdir, export=True)
    shared = jax.device_get(_train_one(rec, first, prefix, rec.initial_state(rec.config), pdir,
                                       settings))
    initial, start = (lambda c: shared), first.results

  def stacked(idx) -> State:
    states = [initial(configs[i]) for i in idx]
    states = [{**s, "hparams": {**s["hparams"],
                                "end_ratio": np.float32(rest[0].end_ratio(configs[i]))}}
              for s, i in zip(states, idx)]
    return sweep_lib.stack_states(states, rec.member_params)

  mesh, idx = rec.mesh, list(configs)
  devices = mesh.shape.get("sweep", 1)
  if len(idx) % devices:
    raise UserError(f"{len(idx)} members cannot split over mesh.sweep={devices} devices; give a "
                    f"multiple of {devices} members or a smaller mesh.sweep")
  one = stacked(idx[:1])
  state_sharding = sharding.member_shardings(one, mesh, sweep_lib.axes(one))
  steps = [_member_step(rec, st) for st in rest]
  size = settings.members_per_chunk
  if size < 0:
    size = _fitting_chunk(steps, [st.batches(0) for st in rest], stacked, idx, devices)
  if (size or len(idx)) % devices:
    raise UserError(f"chunks of {size or len(idx)} members cannot split over mesh.sweep="
                    f"{devices} devices; make members_per_chunk (or the member count) a "
                    f"multiple of {devices}")
  say(f"sweep ({rec.name}): {len(idx)} members in chunks of {size or len(idx)}, {devices} "
      f"member group(s) side by side")
  compiled = [sharding.compile_step(s, mesh, state_sharding, gather=False) for s in steps]
  for c, chunk in enumerate(sweep_lib.chunks(len(idx), size)):
    chunk_dir = os.path.join(gdir, f"chunk_{c}")
    members = [_member(configs[idx[j]], os.path.join(chunk_dir, f"member_{idx[j]}"), False,
                       start) for j in chunk]
    state = jax.device_put(stacked([idx[j] for j in chunk]), state_sharding, may_alias=False)
    for j, m in enumerate(members):
      rec.start(m, sweep_lib.member_state(state, j))
    loop_stages = ([loop.Stage(st.name, st.num_steps, None, None) for st in prefix]
                   + [_chunk_stage(rec, st, step, members, state_sharding)
                      for st, step in zip(rest, compiled)])
    ckpts = checkpoints.Checkpoints(os.path.join(chunk_dir, "checkpoints"),
                                    settings.checkpoint.every_steps, settings.checkpoint.keep)
    state = loop.run(state, loop_stages, ckpts, chunk_dir, settings.log_every,
                     stop_nonfinite=False)
    for j, m in enumerate(members):
      yield idx[chunk[j]], m, sweep_lib.member_state(state, j)


def _member_step(rec: recipe.Recipe, st: recipe.Stage):
  """A stage's vmapped step over stacked members; each member's lr schedule ends at its own
  hparams["end_ratio"]."""

  def one(state, batches):
    schedule = st.schedule(state["hparams"]["end_ratio"])
    return train.make_step(st.loss, rec.tx, schedule, rec.rng_impl, st.context)(state, batches)

  return sweep_lib.vmap_step(one)


def _chunk_stage(rec: recipe.Recipe, st: recipe.Stage, step, members: list[recipe.Member],
                 state_sharding) -> loop.Stage:
  """A loop stage over a chunk's stacked state whose hooks see one member at a time."""

  def each(hook, state: State) -> State:
    states = [hook(m, sweep_lib.member_state(state, j)) for j, m in enumerate(members)]
    return jax.device_put(sweep_lib.stack_states(states, rec.member_params), state_sharding,
                          may_alias=False)

  def begin(state):
    if st.begin:
      state = each(st.begin, state)
    ratios = jnp.asarray([st.end_ratio(m.config) for m in members], jnp.float32)
    return jax.device_put({**state, "hparams": {**state["hparams"], "end_ratio": ratios}},
                          state_sharding)

  out = loop.Stage(st.name, st.num_steps, step, st.batches, begin=begin)
  if st.select:
    out.after = lambda s, i: each(st.select, s) if st.select_at(i) else s
  if st.end:
    out.end = lambda s: [st.end(m, sweep_lib.member_state(s, j)) for j, m in enumerate(members)]
  return out


def _fitting_chunk(steps, batches, stacked, idx: list[int], devices: int) -> int:
  """Members per chunk that fit device memory, from XLA's memory analysis of each stage's
  step compiled for 1 and 2 members (75% of the device's memory is the budget)."""
  need = []
  for m in (1, 2):
    state = jax.device_get(stacked([idx[j % len(idx)] for j in range(m)]))  # uncommitted
    need.append(max(sweep_lib.compiled_bytes(jax.jit(step, donate_argnums=0).lower(
        state, b).compile()) for step, b in zip(steps, batches)))
  budget = int(0.75 * sweep_lib.device_memory_bytes(jax.devices()[0]))
  size = sweep_lib.fit_members(*need, len(idx), budget, devices)
  say(f"memory: {need[0] / 2**20:.0f} MiB for one member, +{(need[1] - need[0]) / 2**20:.0f} "
      f"MiB per further member, budget {budget / 2**30:.1f} GiB per device -> chunks of {size}")
  return size
