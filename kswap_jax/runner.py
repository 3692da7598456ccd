"""One runner for every run: trains N >= 1 members of a method's recipe (`kswap_jax.methods`).

`run(method, config, workdir)` is a single run, N = 1: its step is the plain compiled program
(`sharding.compile_step`, so `mesh.rules` can shard the params, FSDP style).
`evaluate(method, config, model)` measures a given model as a run of `method` would
(`kswap eval`). With `config.eval_mia`, a single run also measures membership inference on
each stage's forget set (`kswap_jax.mia`) before training and after every stage.
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

from kswap_jax import builders, checkpoints, config_lib, loop, methods, metrics_log, mia, recipe
from kswap_jax import paths, sharding
from kswap_jax import sweep as sweep_lib
from kswap_jax import train, trees, workdir
from kswap_jax.data import loader
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
  """Trains one member through `stages`, resuming from run_dir/checkpoints; its evaluations
  and losses go to the metrics stream of run_dir (`metrics_log`).

  settings: the config whose checkpoint, log_every, log and mesh.rules apply.
  """
  mesh = rec.mesh
  state = {**state, "stage": stages[0].numbers(member.config)}
  shardings = sharding.state_shardings(state, mesh, settings.mesh.get("rules", ()))
  state = jax.device_put(state, shardings, may_alias=False)  # steps donate it
  ckpts = checkpoints.Checkpoints(os.path.join(run_dir, "checkpoints"),
                                  settings.checkpoint.every_steps, settings.checkpoint.keep)
  log = metrics_log.MetricsLog(run_dir, settings)
  log.rewind(ckpts.latest_step())
  member.log = log.results
  rec.start(member, state)
  with_mia = member.config.get("eval_mia", False)
  if with_mia:
    measure_mia(rec, member, state, 0, "pretrained")
  placed = lambda s: jax.device_put(s, shardings)  # noqa: E731
  steps = _shared_steps(stages, lambda st: sharding.compile_step(
      train.make_step(st.loss, rec.tx, train.stage_schedule, rec.rng_impl, st.context), mesh,
      shardings))

  def loop_stage(i: int, st: recipe.Stage) -> loop.Stage:
    out = loop.Stage(st.name, st.num_steps, steps[i], st.batches)
    numbers = st.numbers(member.config)

    def begin(s):
      s = {**s, "stage": numbers}
      return placed(st.begin(member, s) if st.begin else s)

    out.begin = begin
    if st.select:
      out.after = lambda s, i: placed(st.select(member, s)) if st.select_at(i) else s

    def end(s):
      if st.end:
        st.end(member, s)
      if with_mia:
        measure_mia(rec, member, s, i, st.name)

    out.end = end
    return out

  return loop.run(state, [loop_stage(i, st) for i, st in enumerate(stages)], ckpts, run_dir,
                  settings.log_every, log=log, ahead=_ahead(rec))


def _shared_steps(stages: list[recipe.Stage], make) -> list:
  """make(stage) for each stage, called once per distinct (loss, context) pair: stages that
  differ only in their numbers (state["stage"]) share one step, so it compiles once."""
  made = {}
  for st in stages:
    if (st.loss, st.context) not in made:
      made[st.loss, st.context] = make(st)
  return [made[(st.loss, st.context)] for st in stages]


def _ahead(rec: recipe.Recipe) -> loader.Ahead:
  """How training batches are made ahead of the step: data.workers and data.prefetch of the
  run's config (`config_lib.READ_DEFAULTS` where unset)."""
  data = rec.config.data
  return loader.Ahead(*(data.get(k, config_lib.READ_DEFAULTS[k]) for k in ("workers",
                                                                          "prefetch")))


def measure_mia(rec: recipe.Recipe, member: recipe.Member, state: State, stage: int,
                after: str) -> None:
  """Membership inference on stage `stage`'s forget set (`rec.mia_sets`) against the model
  released from `state`, as row {"after": after, ...} of results["mia"] (once per `after`)."""
  sets = rec.mia_sets(stage)
  rows = member.results.get("mia", [])
  if sets is None or any(r["after"] == after for r in rows):
    return
  apply = lambda p, images: rec.net.apply(p, None, images)  # noqa: E731
  row = {"after": after, **mia.measure(apply, rec.released(state), sets,
                                       member.config.data.eval_batch_size, rec.mesh,
                                       member.config.seed)}
  member.results["mia"] = rows + [row]
  member.save()
  if member.export:
    say(table(member.results["mia"], ["after", "mia_efficacy", "mia_retain", "mia_test"],
              "{:.3f}"))


def evaluate(method: str, config: ml_collections.ConfigDict, model: str,
             out_dir: str | None = None) -> dict:
  """Measures the model in `model` (an exported model, or a workdir: its model/, else its
  latest checkpoint's model) on the sets of `config`, a config of job `method`, with the
  job's own evaluation code; prints the job's table and writes eval.json to `out_dir`
  (default: `model`). Returns what eval.json holds.
  """
  cls = methods.get(method)
  config_lib.check(config)
  rec = cls(config, out_dir or model, _eval_init(config, model), sharding.make_mesh(config.mesh))
  initial = rec.initial_state(config)
  params = _model_params(rec, initial, model)
  like = train.full_params(initial)
  for path, leaf in trees.flatten(like).items():
    got = trees.flatten(params).get(path)
    if got is None or got.shape != leaf.shape:
      raise UserError(f"the model in {model} does not fit {method} with this config: param "
                      f"{path} is {None if got is None else got.shape}, the config's model "
                      f"{leaf.shape}; give the config the model was trained with")
  keep = lambda tree: trees.unflatten({p: trees.flatten(params)[p]  # noqa: E731
                                       for p in trees.flatten(tree)})
  state = {**initial, "params": keep(initial["params"]),
           "trainable": {"params": keep(initial["trainable"]["params"]),
                         "lora": jax.tree.map(jnp.zeros_like, initial["trainable"]["lora"])}}
  member = recipe.Member(config, "", export=False, results={})
  say(f"{method}: evaluating {model}")
  say(rec.evaluate_model(member, state))
  results = {"model": paths.absolute(model), "job": method, **member.results}
  if config.get("eval_mia", False):
    measure_mia(rec, member, state, -1, "model")
    results["mia"] = member.results["mia"]
  workdir.write_json(os.fspath(paths.of(out_dir or model) / "eval.json"), results)
  return results


def _eval_init(config: ml_collections.ConfigDict, model: str) -> str:
  """The model a run of `config` starts from, for `evaluate`: init.checkpoint, else the
  finished pretrain run beside `model` (a workdir's pretrain/, or its parent's)."""
  init = config.get("init", ml_collections.ConfigDict())
  if init.get("checkpoint") or "pretrain" not in init:
    return init.get("checkpoint", "")
  for d in (paths.of(model), paths.of(model).parent):
    if (d / "pretrain" / "model" / "model.json").exists():
      return os.fspath(d / "pretrain")
  raise UserError(f"this config starts from a pretrain run and {model} has none beside it "
                  "(pretrain/model); give the model the job started from with "
                  "--config.init.checkpoint=DIR")


def _model_params(rec: recipe.Recipe, initial: State, model: str) -> dict:
  """The params of an exported model, or of the model released from a workdir's latest
  checkpoint (restored onto `initial`)."""
  if any((d / "model.json").exists() for d in (paths.of(model), paths.of(model) / "model")):
    return checkpoints.load_model(model)[0]
  restored = None
  if (paths.of(model) / "checkpoints").is_dir():
    ckpts = checkpoints.Checkpoints(os.fspath(paths.of(model) / "checkpoints"), 1, 1)
    try:
      restored = ckpts.restore({**initial, "stage": rec.stages()[-1].numbers(rec.config)})
    finally:
      ckpts.close()
  if restored is None:
    raise UserError(f"no exported model and no checkpoint at {model!r} (expected model.json, "
                    "model/model.json or checkpoints/ there)")
  return rec.released(restored)


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
  # A base value that every member replaces changes no result (e.g. a new default of a field
  # the grid sweeps): a finished study stays valid, an interrupted one resumes. Not the seed:
  # the recipes read the members' shared data order from the base's.
  unused = {f"base.{k}" for k in set.intersection(*(set(a) for a in assignments))} - {
      "base.seed"}
  with workdir.lock(workdir.open_dir(run_dir)):
    workdir.check_config(run_dir, config, record=False, unused=unused)
    if workdir.finished(run_dir):
      results = workdir.read_json(os.path.join(run_dir, "sweep.json"))
      say(f"sweep: the study in {run_dir} has finished (sweep.json there); best: member "
          f"{results['best']}")
      return results
    builders.check_sets(config.base)
    workdir.check_config(run_dir, config, unused=unused)
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
    results = {"members": rows, "best": b, "score": rec.score_text}
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
    states = [{**s, "stage": rest[0].numbers(configs[i])} for s, i in zip(states, idx)]
    return sweep_lib.stack_states(states, rec.member_params)

  mesh, idx = rec.mesh, list(configs)
  devices = mesh.shape.get("sweep", 1)
  if len(idx) % devices:
    raise UserError(f"{len(idx)} members cannot split over mesh.sweep={devices} devices; give a "
                    f"multiple of {devices} members or a smaller mesh.sweep")
  one = stacked(idx[:1])
  state_sharding = sharding.member_shardings(one, mesh, sweep_lib.axes(one))
  steps = _shared_steps(rest, lambda st: _member_step(rec, st))
  size = settings.members_per_chunk
  if size < 0:
    size = _fitting_chunk(steps, [st.batches(0) for st in rest], stacked, idx, devices)
  if (size or len(idx)) % devices:
    raise UserError(f"chunks of {size or len(idx)} members cannot split over mesh.sweep="
                    f"{devices} devices; make members_per_chunk (or the member count) a "
                    f"multiple of {devices}")
  say(f"sweep ({rec.name}): {len(idx)} members in chunks of {size or len(idx)}, {devices} "
      f"member group(s) side by side")
  compiled = {id(s): sharding.compile_step(s, mesh, state_sharding, gather=False) for s in steps}
  for c, chunk in enumerate(sweep_lib.chunks(len(idx), size)):
    chunk_dir = os.path.join(gdir, f"chunk_{c}")
    members = [_member(configs[idx[j]], os.path.join(chunk_dir, f"member_{idx[j]}"), False,
                       start) for j in chunk]
    state = jax.device_put(stacked([idx[j] for j in chunk]), state_sharding, may_alias=False)
    for j, m in enumerate(members):
      rec.start(m, sweep_lib.member_state(state, j))
    loop_stages = ([loop.Stage(st.name, st.num_steps, None, None) for st in prefix]
                   + [_chunk_stage(rec, st, compiled[id(step)], members, state_sharding)
                      for st, step in zip(rest, steps)])
    ckpts = checkpoints.Checkpoints(os.path.join(chunk_dir, "checkpoints"),
                                    settings.checkpoint.every_steps, settings.checkpoint.keep)
    state = loop.run(state, loop_stages, ckpts, chunk_dir, settings.log_every,
                     stop_nonfinite=False, ahead=_ahead(rec))
    for j, m in enumerate(members):
      yield idx[chunk[j]], m, sweep_lib.member_state(state, j)


def _member_step(rec: recipe.Recipe, st: recipe.Stage):
  """A stage's vmapped step over stacked members (each with its own state["stage"])."""
  return sweep_lib.vmap_step(train.make_step(st.loss, rec.tx, train.stage_schedule,
                                             rec.rng_impl, st.context))


def _chunk_stage(rec: recipe.Recipe, st: recipe.Stage, step, members: list[recipe.Member],
                 state_sharding) -> loop.Stage:
  """A loop stage over a chunk's stacked state whose hooks see one member at a time."""

  def each(hook, state: State) -> State:
    # The members' own entries come to the host in one transfer and are sliced there: slicing
    # device arrays dispatches one op per leaf and member (a third of a digits study's time).
    host = {**jax.device_get({k: v for k, v in state.items() if k != "params"}),
            "params": state["params"]}
    states = [hook(m, sweep_lib.member_state(host, j)) for j, m in enumerate(members)]
    return jax.device_put(sweep_lib.stack_states(states, rec.member_params), state_sharding,
                          may_alias=False)

  def begin(state):
    numbers = jax.tree.map(lambda *v: np.stack(v), *[st.numbers(m.config) for m in members])
    state = {**state, "stage": numbers}
    return each(st.begin, state) if st.begin else jax.device_put(state, state_sharding)

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
