"""What a method tells the runner: a `Recipe` for one member of a run, made of `Stage`s.

A recipe is written for one member, a single training run of its method: the runner trains
N >= 1 members of it, a single run (N = 1, the plain compiled step) or a study (N members
stacked and vmapped, `kswap_jax.runner.sweep`). So a method is written once, and every method
can be swept. A recipe

- prepares the inputs its members share (data, network, the model it starts from) in
  `__init__`, for the base config of the run;
- builds a member's initial train state from that member's config (`initial_state`);
- lists its stages: loss, steps, batches, lr schedule, and hooks that see one member
  (`begin` / `end` / `select`, each given the `Member` and its one-member state);
- measures a member before training (`start`) and writes its exports and plots after
  (`finish`, single runs only);
- summarises a member for a study (`row`, `score`, `columns`, `pareto`) and names the config
  keys a study may vary within one program (`sweepable`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections

from kswap_jax import train, workdir
from kswap_jax.data import pipeline

State = train.State


@dataclasses.dataclass
class Member:
  """One member as a recipe's hooks see it.

  config: the member's config; dir: where its results.json lives ("": results kept in
  memory only); export: whether it writes models and plots (a single run; a study exports
  only its best member); results: the content of its results.json (a hook changes it, then
  calls `save`); log: called with the results at every save (the run's metrics stream).
  """
  config: ml_collections.ConfigDict
  dir: str
  export: bool
  results: dict
  log: Callable[[dict], None] | None = None

  def save(self) -> None:
    if self.dir:
      workdir.write_json(os.path.join(self.dir, "results.json"), self.results)
    if self.log:
      self.log(self.results)

  def path(self, *parts: str) -> str:
    return os.path.join(self.dir, *parts)


@dataclasses.dataclass
class Stage:
  """`num_steps` updates of `loss` on `batches(stage_step)` (the same for every member).

  The lr follows `train.lr_factor` over the stage, from the member's lr to `end_ratio(member
  config)` times it (per epoch when `steps_per_epoch`, after `warmup_steps` of warm-up).
  values: further numbers the loss reads (through `context`) from state["stage"]; the stage's
  numbers are arrays there (`numbers`), so stages with the same `loss` and `context` objects
  share one compiled step.
  context(state): what the loss reads from the state as batches["ctx"].
  begin(member, state) -> state: when the stage starts fresh; end(member, state): when it ends
  (may run again on resume); select(member, state) -> state after each step s with
  select_at(s) (model selection, weight averaging). shared: the stage depends on no key a
  study varies, so a study trains it once, in a run of its own, and its members start from
  the result.
  """
  name: str
  num_steps: int
  loss: train.LossFn
  batches: Callable[[int], Any]
  end_ratio: Callable[[ml_collections.ConfigDict], float]
  steps_per_epoch: int = 0
  warmup_steps: int = 0
  values: dict[str, int | float] = dataclasses.field(default_factory=dict)
  context: Callable[[State], Any] | None = None
  begin: Callable[[Member, State], State] | None = None
  end: Callable[[Member, State], None] | None = None
  select_at: Callable[[int], bool] | None = None
  select: Callable[[Member, State], State] | None = None
  shared: bool = False

  def numbers(self, config: ml_collections.ConfigDict) -> dict:
    """state["stage"] of a member `config` in this stage (`train.stage_numbers`)."""
    return train.stage_numbers(self.num_steps, self.warmup_steps, self.steps_per_epoch,
                               self.end_ratio(config), **self.values)


class Recipe:
  """Base of a method's recipe; `__init__` prepares what the members share.

  config: the run's (or a study group's) base config; init: the model it starts from (an
  exported model or a `.npz`; "" if the method makes its own); mesh: the device mesh.
  Subclasses set `model_cfg` and `labels` (what `released` models are exported with).
  """
  name = ""
  sweepable: tuple[str, ...] = ()   # config paths a study may vary within one program
  member_params = ""                # regex of frozen params a member's hooks change (merges)
  score_text = ""                   # how `score` ranks members, for the study's printout
  columns: tuple[str, ...] = ()     # row keys of the study table
  pareto: tuple = ()                # (x, y, colour or None), each (row key, axis label)
  model_cfg: ml_collections.ConfigDict
  labels: pipeline.LabelSpace

  def __init__(self, config: ml_collections.ConfigDict, run_dir: str, init: str,
               mesh: jax.sharding.Mesh):
    self.config, self.run_dir, self.init, self.mesh = config, run_dir, init, mesh
    self.tx = train.make_optimizer()
    self.rng_impl = config.get("rng_impl", "threefry2x32")

  def check(self, config: ml_collections.ConfigDict) -> None:
    """Refuses a member config before any training (default: accepts)."""

  def initial_state(self, config: ml_collections.ConfigDict) -> State:
    raise NotImplementedError

  def stages(self) -> list[Stage]:
    raise NotImplementedError

  def start(self, member: Member, state: State) -> None:
    """Runs before training, at every start; it looks at `member.results` for what it has
    measured already (default: nothing)."""

  def finish(self, member: Member, state: State) -> None:
    """Runs after the last stage of a single run: exports and plots (default: nothing)."""

  def released(self, state: State) -> dict:
    """The model a user receives from a member's final state (LoRA merged)."""
    raise NotImplementedError

  def row(self, member: Member) -> dict:
    """A member's results in one flat row of the study table."""
    raise NotImplementedError

  def score(self, row: dict) -> float:
    """Model selection score of a row (validation data only); higher is better."""
    raise NotImplementedError

  @staticmethod
  def report(results: dict) -> str:
    """The tables a run prints of its results (results.json)."""
    raise NotImplementedError

  def evaluate_model(self, member: Member, state: State) -> str:
    """Measures the model of `state` (a given model: LoRA zero) as the job's evaluations do,
    into `member.results`; returns the job's table of it (`kswap eval`)."""
    raise NotImplementedError

  def mia_sets(self, stage: int) -> dict[str, pipeline.ExampleSet] | None:
    """Membership-inference sets of stage `stage`'s model (-1: the last stage's;
    `kswap_jax.mia`): "member" (retain train examples), "nonmember" (test examples) and
    "target" (the forget set's train examples); None when the stage forgets nothing."""
    del stage
    return None
