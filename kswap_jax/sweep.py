"""Hyperparameter studies: N runs of one method trained together as one vmapped program.

Members differ only in values that keep every array shape and the compiled program the same
(learning rate, weight decay, loss weights, bound, seed), so their trainable params, optimizer
states, hparams and rng keys stack along a leading member axis while the frozen base params
and the batches are shared (in memory once). In continual forgetting each task merges the
members' own LoRAs into their models, so the merged kernels become per-member
`member_params`; every other frozen param stays shared.
"""
from __future__ import annotations

import functools
import itertools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kswap_jax import continual, dtl, swap, train
from kswap_jax.errors import UserError

# Config paths a sweep may vary, per method (everything else is shared by all members).
SWEEPABLE = {
    "swap": ("seed", "train.lr", "train.weight_decay",
             *(f"weights.{k}" for k in swap.HPARAMS)),
    # values of the dispose stage only: every member shares one transfer stage
    "dispose": ("train.lr.dispose",
                *(f"weights.{k}" for k in dtl.HPARAMS if k != "target")),
    # weights.beta: a number or one value per task
    "forget": ("seed", "train.lr", "train.weight_decay",
               *(f"weights.{k}" for k in continual.HPARAMS)),
}

# vmap axes of train state entries: member-stacked (0) vs shared (None).
STATE_AXES = {"params": None, "member_params": 0, "trainable": 0, "opt": 0, "hparams": 0,
              "rng": 0, "step": None, "stage_step": None, "best": 0, "protos": 0}


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


def groups(assignments: list[dict], method: str, base: ml_collections.ConfigDict,
           ) -> list[tuple[dict[str, Any], list[int]]]:
  """Members grouped by their values of keys outside SWEEPABLE[method] (rank, batch size,
  order, targets, ...), which change shapes or a stage the members share: [(those values,
  member indices)], in order of first appearance. Each group trains as its own program."""
  if method not in SWEEPABLE:
    raise UserError(f"method={method!r} cannot be swept; use one of {sorted(SWEEPABLE)}")
  paths = set(flatten(base))
  unknown = sorted({k for a in assignments for k in a} - paths - set(SWEEPABLE[method]))
  if unknown:
    raise UserError(f"sweep keys {unknown} are not fields of the base config; use paths such "
                    f"as {list(SWEEPABLE[method])[:3]} or 'lora.rank'")
  out: dict[str, tuple[dict, list[int]]] = {}
  for i, a in enumerate(assignments):
    fixed = {k: v for k, v in a.items() if k not in SWEEPABLE[method]}
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
    node[leaf] = float(value) if isinstance(node[leaf], float) else value
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


def stack(trees: list) -> Any:
  """Per-member pytrees -> one pytree with a leading member axis (N, ...)."""
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *trees)


def stack_states(states: list[dict]) -> dict:
  """Per-member train states -> one state: STATE_AXES 0 entries stacked, the rest from the first.

  Members must share their frozen params (the caller's check).
  """
  return {k: stack([s[k] for s in states]) if STATE_AXES[k] == 0 else v
          for k, v in states[0].items()}


def member(tree: Any, i: int) -> Any:
  """Member i of a stacked pytree."""
  return jax.tree_util.tree_map(lambda x: x[i], tree)


def member_step(loss_fn, tx, rng_impl: str, total_steps: int, steps_per_epoch: int) -> Callable:
  """One member's update (`train.make_step`); its per-epoch cosine ends at
  hparams["end_ratio"] (lr_end / lr), which may differ between members."""

  def step(state, batches):
    schedule = functools.partial(train.lr_factor, total_steps=total_steps,
                                 steps_per_epoch=steps_per_epoch,
                                 end_ratio=state["hparams"]["end_ratio"])
    return train.make_step(loss_fn, tx, schedule, rng_impl)(state, batches)

  return step


def with_member_params(step: Callable) -> Callable:
  """A member's step on its full model: shared `params` combined with its `member_params`."""

  def stepped(state, batches):
    own = {**state, "params": train.combine(state["params"], state["member_params"])}
    new, metrics = step(own, batches)
    return {**new, "params": state["params"]}, metrics

  return stepped


def member_counts(counts: Callable) -> Callable:
  """`train.correct_counts` per member: ((shared, stacked member_params), stacked trainable,
  batch) -> (correct, count), each (N, K)."""

  def one(params, t, batch):
    full = train.combine(train.combine(*params), t["params"])
    return counts(full, t["lora"], batch)

  return jax.jit(jax.vmap(one, in_axes=((None, 0), 0, None)))


def vmap_step(step: Callable) -> Callable:
  """One member's step -> (stacked state, batches) -> (stacked state, summary metrics).

  Progress lines show the members' mean of each metric and their worst loss (`loss_max`).
  """

  def stepped(state, batches):
    axes = {k: STATE_AXES[k] for k in state}
    state, metrics = jax.vmap(step, in_axes=(axes, None), out_axes=(axes, 0))(state, batches)
    return state, {**{k: v.mean() for k, v in metrics.items()}, "loss_max": metrics["loss"].max()}

  return stepped


def score(row: dict, prefix: str = "val_") -> float:
  """Model selection score: Acc_R + Acc_L - Acc_F (%, on the validation split by default)."""
  return row[f"{prefix}acc_r"] + row[f"{prefix}acc_l"] - row[f"{prefix}acc_f"]


def pareto_front(acc_r: np.ndarray, acc_f: np.ndarray) -> np.ndarray:
  """bool (N,): members no other member beats on both (higher Acc_R, lower Acc_F)."""
  r, f = np.asarray(acc_r)[:, None], np.asarray(acc_f)[:, None]
  dominated = (r.T >= r) & (f.T <= f) & ((r.T > r) | (f.T < f))
  return ~dominated.any(1)
