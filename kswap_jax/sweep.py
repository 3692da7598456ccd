"""Hyperparameter studies: the pure pieces of training N runs of one method as one program.

Members differ only in values that keep every array shape and the compiled program the same
(learning rate, weight decay, loss weights, bound, seed), so their trainable params, optimizer
states, hparams and rng keys stack along a leading member axis while the frozen base params
and the batches are shared (in memory once). The frozen params a recipe's hooks change per
member (`Recipe.member_params`, e.g. the kernels a task's LoRA is merged into) are stacked as
`member_params`; every other frozen param stays shared. `kswap_jax.runner.sweep` runs a study.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np

from kswap_jax import trees, workdir
from kswap_jax.errors import UserError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

# Train state entries every member shares; every other entry is stacked along axis 0.
SHARED = ("params", "step", "stage_step")


def axes(state: dict) -> dict[str, int | None]:
  """vmap axes of a stacked state's entries: member-stacked (0) or shared (None)."""
  return {k: None if k in SHARED else 0 for k in state}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"train": {"lr": v}} -> {"train.lr": v} (a ConfigDict or nested dicts)."""
  if isinstance(tree, ml_collections.ConfigDict):
    tree = tree.to_dict()
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}{k}."))
  return {k.rstrip("."): v for k, v in out.items()}


def expand(grid, members) -> list[dict[str, Any]]:
  """The explicit `members` (dicts of config path -> value), then the grid's product.

  grid mirrors the config's nesting, each leaf a list of values:
  {"train": {"lr": [1e-2, 3e-3]}, "weights": {"forget": [0.2, 1.0]}} -> 4 members.
  """
  out = [dict(m) for m in (members or ())]
  flat = flatten(grid or {})
  if flat:
    keys = sorted(flat)
    out += [dict(zip(keys, vals)) for vals in itertools.product(*(flat[k] for k in keys))]
  if not out:
    raise UserError("the sweep has no members; set grid and/or members")
  return out


def groups(assignments: list[dict], sweepable: tuple[str, ...], base: ml_collections.ConfigDict,
           ) -> list[tuple[dict[str, Any], list[int]]]:
  """Members grouped by their values of keys outside `sweepable` (rank, batch size, order,
  targets, ...), which change shapes or a stage the members share: [(those values, member
  indices)], in order of first appearance. Each group trains as its own program."""
  paths = set(flatten(base))
  unknown = sorted({k for a in assignments for k in a} - paths - set(sweepable))
  if unknown:
    raise UserError(f"sweep keys {unknown} are not fields of the base config; use paths such "
                    f"as {list(sweepable)[:3]} or 'lora.rank'")
  out: dict[str, tuple[dict, list[int]]] = {}
  for i, a in enumerate(assignments):
    fixed = {k: v for k, v in a.items() if k not in sweepable}
    out.setdefault(repr(sorted(fixed.items())), (fixed, []))[1].append(i)
  return list(out.values())


def member_config(base: ml_collections.ConfigDict, assignment: dict[str, Any],
                  ) -> ml_collections.ConfigDict:
  """A copy of `base` with each "a.b" path of `assignment` set (a float field stays a float:
  1 -> 1.0; a per-task list field also takes one number for every task)."""
  d = base.to_dict()
  for path, value in assignment.items():
    *parents, leaf = path.split(".")
    node = d
    for p in parents:
      node = node[p]
    old = node[leaf]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(old, bool) != isinstance(value, bool) or (
        isinstance(old, (int, float)) and not isinstance(old, bool)
        and not (number and (isinstance(old, float) or float(value).is_integer()))):
      raise UserError(f"sweep value {path}={value!r} does not fit the base config's "
                      f"{type(old).__name__} field (base value {old!r})")
    if isinstance(old, float) or (isinstance(old, int) and not isinstance(old, bool)):
      value = type(old)(value)
    node[leaf] = value
  return ml_collections.ConfigDict(d)


def chunks(n: int, size: int) -> list[range]:
  """Member index ranges of at most `size` (0: all in one)."""
  size = size or n
  return [range(i, min(n, i + size)) for i in range(0, n, size)]


def compiled_bytes(compiled) -> int:
  """Device bytes a compiled step needs: arguments + outputs + temporaries - donated aliases."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def device_memory_bytes(device: jax.Device) -> int:
  """Memory one device may use: its allocator limit, or (CPU) physical RAM / local devices."""
  limit = (device.memory_stats() or {}).get("bytes_limit")
  if limit:
    return int(limit)
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return ram // jax.local_device_count()


def fit_members(one: int, two: int, n: int, budget: int, devices: int = 1) -> int:
  """Largest chunk of the n members whose step fits `budget` bytes per device.

  one, two: bytes of the step compiled for 1 and 2 members (one member adds `two - one`; the
  shared base weights and batches take the rest); devices: how many devices a chunk's members
  are split over (mesh axis "sweep"), so the chunk is a multiple of it.
  """
  member = max(1, two - one)
  shared = max(0, one - member)
  fit = min(n, (budget - shared) // member * devices) // devices * devices
  if fit < devices:
    raise UserError(f"a member needs about {(shared + member) / 2**30:.2f} GiB per device, "
                    f"more than the {budget / 2**30:.2f} GiB budget; use a smaller model or "
                    f"batch, or set members_per_chunk")
  return fit


def stack(items: list) -> Any:
  """Per-member pytrees -> one host pytree with a leading member axis (N, ...), stacked in
  numpy: one transfer per member, not one dispatched op per leaf."""
  return jax.tree_util.tree_map(lambda *x: np.stack(x), *jax.device_get(items))


def stack_states(states: list[dict], member_params: str = "") -> dict:
  """One-member states -> one state with a leading member axis on every entry but SHARED.

  Frozen params whose path fully matches `member_params` go to the stacked entry
  "member_params"; every other frozen param must be the same in every member (UserError).
  """
  split = [trees.partition(s["params"], member_params) for s in states]
  shared = trees.flatten(split[0][0])
  for other, _ in split[1:]:
    differ = [k for k, v in trees.flatten(other).items()
              if v is not shared[k] and not np.array_equal(np.asarray(v), np.asarray(shared[k]))]
    if differ:
      raise UserError(f"members differ in frozen params {differ[:3]}, which a study shares; "
                      "vary that key in its own group (e.g. seed with a frozen head), or train "
                      "those params")
  out = {k: v if k in SHARED else stack([s[k] for s in states])
         for k, v in states[0].items() if k != "params"}
  return {**out, "params": split[0][0], "member_params": stack([own for _, own in split])}


def member_state(state: dict, j: int) -> dict:
  """Member j's own one-member state from a stacked one (its params whole)."""
  out = {k: v if k in SHARED else member(v, j) for k, v in state.items()
         if k != "member_params"}
  return {**out, "params": trees.combine(state["params"], member(state["member_params"], j))}


def member(tree: Any, i: int) -> Any:
  """Member i of a stacked pytree."""
  return jax.tree_util.tree_map(lambda x: x[i], tree)


def vmap_step(step: Callable) -> Callable:
  """One member's step -> (stacked state, batches) -> (stacked state, summary metrics).

  The member's step runs on its whole params (shared `params` with its `member_params`).
  Progress lines show the mean of each metric over the members whose loss is finite, their
  worst loss (`loss_max`) and how many members have a non-finite loss (`diverged`).
  """

  def one(state, batches):
    own = {**state, "params": trees.combine(state["params"], state["member_params"])}
    new, metrics = step(own, batches)
    return {**new, "params": state["params"]}, metrics

  def stepped(state, batches):
    ax = axes(state)
    state, metrics = jax.vmap(one, in_axes=(ax, None), out_axes=(ax, 0))(state, batches)
    ok = jnp.isfinite(metrics["loss"])
    mean = lambda v: jnp.where(ok, v, 0).sum() / jnp.maximum(ok.sum(), 1)  # noqa: E731
    return state, {**{k: mean(v) for k, v in metrics.items()},
                   "loss_max": jnp.where(ok, metrics["loss"], -jnp.inf).max(),
                   "diverged": (~ok).sum()}

  return stepped


def pareto_front(acc_r: np.ndarray, acc_f: np.ndarray) -> np.ndarray:
  """bool (N,): members no other member beats on both (higher Acc_R, lower Acc_F)."""
  r, f = np.asarray(acc_r)[:, None], np.asarray(acc_f)[:, None]
  dominated = (r.T >= r) & (f.T <= f) & ((r.T > r) | (f.T < f))
  return ~dominated.any(1)


def pareto_plot(rows: list[dict], best: int, path: str, x: tuple[str, str],
                y: tuple[str, str], colour: tuple[str, str] | None) -> None:
  """y (lower is better) against x (higher is better) per member, the Pareto front and the
  chosen member; x, y, colour: (row key, axis label)."""
  xs, ys = (np.array([row[k[0]] for row in rows], float) for k in (x, y))
  front = np.flatnonzero(pareto_front(xs, ys))
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
  workdir.save_figure(fig, path)
  plt.close(fig)
