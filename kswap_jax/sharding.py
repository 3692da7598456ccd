"""Device mesh, batch sharding and regex rules that place the train state on the mesh.

`config.mesh` names the mesh axes and their sizes, plus optional placement rules::

  mesh.data = -1                  # data parallel over all devices (the default)
  mesh.data, mesh.fsdp = 2, 4     # 2-way data parallel x 4-way sharded params
  mesh.rules = [("Transformer/.*/MlpBlock_0/Dense_0/kernel", (None, "fsdp"))]

Batches are split over every data-parallel axis ("data" and "fsdp"). A rule is a regex that
fully matches a "a/b/leaf" parameter path and a PartitionSpec as a tuple; the first match wins
and unmatched leaves are replicated. Optimizer-state leaves follow the parameter they mirror.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from kswap_jax import trees
from kswap_jax.errors import UserError

BATCH_AXES = ("data", "fsdp")
Rules = Sequence[tuple[str, Sequence[Any]]]


def make_mesh(axes: Mapping[str, Any] | None = None) -> jax.sharding.Mesh:
  """Mesh with the axis sizes of `axes` (e.g. config.mesh; its "rules" entry is ignored).

  One size may be -1: all devices the other axes leave; without one, the mesh uses the first
  prod(sizes) devices. Default {"data": -1}.
  """
  sizes = {k: int(v) for k, v in (axes or {"data": -1}).items() if k != "rules"}
  n = jax.device_count()
  fixed = math.prod(v for v in sizes.values() if v != -1)
  free = [k for k, v in sizes.items() if v == -1]
  if (not sizes or len(free) > 1 or any(v < 1 and v != -1 for v in sizes.values())
      or n % fixed):
    raise UserError(f"mesh {sizes} does not fit {n} devices; give axis sizes whose product "
                    f"divides {n}, with at most one -1 for the rest")
  shape = tuple(n // fixed if v == -1 else v for v in sizes.values())
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(shape, tuple(sizes), axis_types=auto,
                       devices=jax.devices()[:math.prod(shape)])


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batch (B, ...) split over all data-parallel axes of `mesh` jointly."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(axes))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def path_str(path) -> str:
  """A tree_util key path as "a/b/leaf"."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def spec_for(path: str, shape: tuple[int, ...], mesh: jax.sharding.Mesh,
             rules: Rules) -> PartitionSpec:
  """PartitionSpec of the first rule fully matching `path` (replicated if none).

  Raises UserError if the spec has more entries than the leaf has dims, or a sharded dim
  does not divide evenly over its mesh axes.
  """
  i = trees.first_match([path], [regex for regex, _ in rules], "mesh.rules")[path]
  if i < 0:
    return PartitionSpec()
  regex, spec = rules[i]
  spec = tuple(tuple(s) if isinstance(s, list) else s for s in spec)
  if len(spec) > len(shape):
    raise UserError(f"mesh rule {regex!r} gives {spec} to {path} of shape {shape}: more "
                    f"entries than dims")
  for dim, axes in zip(shape, spec):
    names = (axes,) if isinstance(axes, str) else axes or ()
    size = 1
    for a in names:
      if a not in mesh.shape:
        raise UserError(f"mesh rule {regex!r} names axis {a!r}; the mesh has {dict(mesh.shape)}")
      size *= mesh.shape[a]
    if dim % size:
      raise UserError(f"mesh rule {regex!r}: {path} of shape {shape} cannot split a dim of "
                      f"{dim} over {names} ({size} devices); change the rule or mesh sizes")
  return PartitionSpec(*spec)


def _tree_specs(tree, mesh, rules: Rules) -> dict[str, PartitionSpec]:
  """{"a/b/leaf": spec} for every leaf of a params-like tree."""
  return {p: spec_for(p, x.shape, mesh, rules) for p, x in trees.flatten(tree).items()}


def _follow(specs: dict[str, PartitionSpec], path: str) -> PartitionSpec:
  """Spec of the longest entry of `specs` that `path` ends with (optimizer moments)."""
  parts = path.split("/")
  for i in range(len(parts)):
    suffix = "/".join(parts[i:])
    if suffix in specs:
      return specs[suffix]
  return PartitionSpec()


def state_shardings(state: dict, mesh: jax.sharding.Mesh, rules: Rules = ()) -> dict:
  """Tree of NamedShardings for a train state (see kswap_jax.train) under `rules`.

  params and trainable["params"] leaves use the rule for their parameter path, LoRA leaves
  the rule for "lora/<layer>/A|B", opt leaves follow the trainable leaf their path ends with;
  everything else is replicated.
  """
  frozen = _tree_specs(state["params"], mesh, rules)
  trainable = {**{f"params/{k}": v for k, v in
                  _tree_specs(state["trainable"]["params"], mesh, rules).items()},
               **_tree_specs({"lora": state["trainable"]["lora"]}, mesh, rules)}

  def spec(path: str) -> PartitionSpec:
    top, _, rest = path.partition("/")
    if top == "params":
      return frozen[rest]
    if top == "trainable":
      return trainable[rest]
    if top == "opt":
      return _follow(trainable, rest)
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(
      lambda p, _: NamedSharding(mesh, spec(path_str(p))), state)


def shard_state(state: dict, mesh: jax.sharding.Mesh, rules: Rules = ()) -> dict:
  """A copy of `state` placed by `state_shardings` (steps donate it; `state` stays valid)."""
  return jax.device_put(state, state_shardings(state, mesh, rules), may_alias=False)


def member_shardings(state: dict, mesh: jax.sharding.Mesh, member_axes: dict) -> dict:
  """Placement of a sweep's stacked state: member-stacked entries (`member_axes` 0) split
  their leading member axis over the mesh axis "sweep"; shared entries are replicated."""
  members = NamedSharding(mesh, PartitionSpec("sweep" if "sweep" in mesh.shape else None))
  return {k: jax.tree_util.tree_map(
      lambda _, k=k: members if member_axes[k] == 0 else replicated(mesh), v)
          for k, v in state.items()}


def compile_step(step_fn: Callable, mesh: jax.sharding.Mesh, state_sharding=None,
                 gather: bool = True) -> Callable:
  """jit of `(state, batches) -> (state, metrics)` that donates the state.

  state_sharding: the new state's placement, e.g. `state_shardings(...)` (default
  replicated); metrics are replicated. gather: sharded params are stored sharded but gathered
  whole at the start of the step (FSDP), so no device computes another's share of a layer;
  False for a state split by member (`member_shardings`), whose members stay apart.
  """
  if state_sharding is None:
    return jax.jit(step_fn, donate_argnums=0, out_shardings=(replicated(mesh),) * 2)
  if not gather:
    return jax.jit(step_fn, donate_argnums=0, out_shardings=(state_sharding, replicated(mesh)))

  def gathered(state, batches):
    use = jax.lax.with_sharding_constraint(
        {k: state[k] for k in ("params", "trainable")}, replicated(mesh))
    return step_fn({**state, **use}, batches)

  return jax.jit(gathered, donate_argnums=0,
                 out_shardings=(state_sharding, replicated(mesh)))
