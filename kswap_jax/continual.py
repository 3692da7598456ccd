"""Continual forgetting (GS-LoRA, GS-LoRA++) and its baselines as pure pieces.

A run is a sequence of tasks. Task t forgets the classes F_t, keeps R_t (every class not yet
forgotten), and only measures the classes O_t forgotten by earlier tasks, which get no signal.
Class ids are indices into the model's label space.

Each method is a loss on a few batch terms plus a `Method` entry (what trains, its lr):

  gs_lora              CE(R) + beta * relu(BND - CE(F)) + alpha * S           LoRA
  gs_lora_pp           gs_lora + w_f * relu(BND_pro - KL_F) + w_r * KL_R      LoRA
  retrain              CE(R), from a freshly initialised model                 all params
  finetune             CE(R)                                                   all but head
  grad_ascent          CE(R) - beta * CE(F)                                    all but head
  grad_ascent_bounded  CE(R) + beta * relu(BND - CE(F))                        all but head

S: group-sparse penalty on the LoRA (`losses.group_sparse`); alpha is 0 during the first
`warmup_steps` of a task. KL_R, KL_F: batch means of KL(softmax(proto[y]) || softmax(emb)),
proto = the class's mean embedding under the model at the start of the task.

Adding a baseline: write `loss(terms, hparams) -> scalar` over the terms `make_loss` computes
(ce_r, ce_f, forget = relu(bound - ce_f), sparse; kl_r, kl_f with prototypes) and register a
`Method` in METHODS; `config.method` then selects it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kswap_jax import lora as lora_lib
from kswap_jax import losses, train
from kswap_jax.errors import UserError

# Loss weights and bounds, all float32 arrays in state["hparams"] (a sweep may vmap them).
HPARAMS = ("beta", "bound", "alpha", "proto_bound", "w_f", "w_r")
PROTOCOL_SEED = 1337
NEAR_ZERO = 1e-3  # a group is "near zero" below this fraction of the largest group norm


@dataclasses.dataclass(frozen=True)
class Task:
  """Label-space class ids of one forgetting request."""
  forget: tuple[int, ...]
  retain: tuple[int, ...]
  old: tuple[int, ...]


def protocol(num_classes: int, per_task: int, num_tasks: int,
             seed: int = PROTOCOL_SEED) -> list[Task]:
  """Seeded class order; task t forgets order[C - N(t+1) : C - Nt], retains order[: C - N(t+1)]."""
  if per_task < 1 or num_tasks < 1 or per_task * num_tasks >= num_classes:
    raise UserError(f"tasks: {num_tasks} tasks of {per_task} classes do not fit {num_classes} "
                    f"classes; need per_task * num_tasks < {num_classes} so some class is kept")
  order = [int(c) for c in np.random.default_rng(seed).permutation(num_classes)]
  out = []
  for t in range(num_tasks):
    lo, hi = num_classes - per_task * (t + 1), num_classes - per_task * t
    out.append(Task(tuple(order[lo:hi]), tuple(order[:lo]), tuple(order[hi:])))
  return out


def explicit(forget: list[list[int]], num_classes: int) -> list[Task]:
  """Tasks from explicit forget lists; R_t is every class not forgotten by tasks <= t."""
  out, gone = [], []
  for t, classes in enumerate(forget):
    again = sorted(set(classes) & set(gone))
    if again:
      raise UserError(f"tasks.forget[{t}] repeats classes {again} forgotten by an earlier task")
    dropped = set(gone) | set(classes)
    retain = tuple(c for c in range(num_classes) if c not in dropped)
    if not retain:
      raise UserError(f"tasks.forget[{t}] leaves no class to retain; keep at least one")
    out.append(Task(tuple(classes), retain, tuple(gone)))
    gone += list(classes)
  return out


def task_value(values, t: int, name: str) -> float:
  """Per-task value: a number, or the t-th entry of a list."""
  if isinstance(values, (int, float)):
    return float(values)
  if t >= len(values):
    raise UserError(f"{name}={list(values)} has no entry for task {t}; give one value per task "
                    f"or a single number")
  return float(values[t])


# --- losses ------------------------------------------------------------------------------

def prototype_kl(protos: jax.Array, labels: jax.Array, emb: jax.Array) -> jax.Array:
  """KL(softmax(protos[labels]) || softmax(emb)) per sample: (K, D), (B,), (B, D) -> (B,)."""
  log_p = jax.nn.log_softmax(protos[labels], -1)
  log_q = jax.nn.log_softmax(emb, -1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)


def gs_lora_loss(t: dict, hp: dict) -> jax.Array:
  return t["ce_r"] + hp["beta"] * t["forget"] + hp["alpha"] * t["sparse"]


def gs_lora_pp_loss(t: dict, hp: dict) -> jax.Array:
  return (gs_lora_loss(t, hp) + hp["w_f"] * jax.nn.relu(hp["proto_bound"] - t["kl_f"])
          + hp["w_r"] * t["kl_r"])


def retain_loss(t: dict, hp: dict) -> jax.Array:
  del hp
  return t["ce_r"]


def grad_ascent_loss(t: dict, hp: dict) -> jax.Array:
  return t["ce_r"] - hp["beta"] * t["ce_f"]


def bounded_ascent_loss(t: dict, hp: dict) -> jax.Array:
  return t["ce_r"] + hp["beta"] * t["forget"]


@dataclasses.dataclass(frozen=True)
class Method:
  """loss(terms, hparams) -> scalar, and what the method trains.

  lora: train a fresh LoRA per task (merged after it); trainable: regex of base params trained
  directly; from_scratch: re-initialise the model before each task; prototypes: the loss reads
  class prototypes; lr: its default learning rate (1e-2 for LoRA and 1e-4 for fine-tuning, as
  in the papers; 2e-3 to train from scratch), which the configs read.
  """
  loss: Callable[[dict, dict], jax.Array]
  lr: float
  lora: bool = False
  trainable: str = ""
  from_scratch: bool = False
  prototypes: bool = False


NOT_HEAD = r"(?!head/).*"
METHODS = {
    "gs_lora": Method(gs_lora_loss, 1e-2, lora=True),
    "gs_lora_pp": Method(gs_lora_pp_loss, 1e-2, lora=True, prototypes=True),
    "retrain": Method(retain_loss, 2e-3, trainable=".*", from_scratch=True),
    "finetune": Method(retain_loss, 1e-4, trainable=NOT_HEAD),
    "grad_ascent": Method(grad_ascent_loss, 1e-4, trainable=NOT_HEAD),
    "grad_ascent_bounded": Method(bounded_ascent_loss, 1e-4, trainable=NOT_HEAD),
}


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise UserError(f"method={name!r} is not allowed; use one of {sorted(METHODS)}")
  return METHODS[name]


def make_loss(method: Method, net, group: str, warmup_steps: int) -> train.LossFn:
  """loss_fn(trainable, frozen, hparams, batches, rng) for `train.make_step`.

  batches: {"retain": b, "forget": b, "ctx": {"stage_step": int32 () [, "protos": (K, D)]}},
  b = {"images": uint8 (B, H, W, C), "labels": int32 (B,)}; one forward pass over R and F.
  net.apply(..., labels=) lets a margin head see the labels.
  """

  def loss_fn(trainable, frozen, hp, batches, rng):
    r, f, ctx = batches["retain"], batches["forget"], batches["ctx"]
    n = r["labels"].shape[0]
    labels = jnp.concatenate([r["labels"], f["labels"]])
    logits, emb = net.apply(train.combine(frozen, trainable["params"]), trainable["lora"],
                            jnp.concatenate([r["images"], f["images"]]), labels=labels,
                            train=True, rng=rng, return_embedding=True)
    terms = {"ce_r": losses.cross_entropy(logits[:n], r["labels"]),
             "ce_f": losses.cross_entropy(logits[n:], f["labels"]),
             "forget": losses.bounded_forget(logits[n:], f["labels"], hp["bound"]),
             "sparse": losses.group_sparse(trainable["lora"], group)}
    if method.prototypes:
      terms["kl_r"] = prototype_kl(ctx["protos"], r["labels"], emb[:n]).mean()
      terms["kl_f"] = prototype_kl(ctx["protos"], f["labels"], emb[n:]).mean()
    hp = {**hp, "alpha": jnp.where(ctx["stage_step"] >= warmup_steps, hp["alpha"], 0.0)}
    return method.loss(terms, hp), terms

  return loss_fn


# --- prototypes, task transitions, reports ------------------------------------------------

def class_sums(emb: jax.Array, labels: jax.Array, mask: jax.Array,
               num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Per-class embedding sums and counts: (B, D), (B,), (B,) -> (K, D), (K,)."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=emb.dtype) * mask[:, None]
  return onehot.T @ emb, onehot.sum(0)


def prototypes(sums: jax.Array, counts: jax.Array) -> jax.Array:
  """Mean embedding per class (K, D); zero rows for classes without examples."""
  return sums / jnp.maximum(counts, 1)[:, None]


def chosen(state: dict) -> dict:
  """The trainable tree a task ends with: the selected one if the state keeps a best."""
  return state["best"]["trainable"] if "best" in state else state["trainable"]


def merged_model(state: dict, scale: float) -> dict:
  """Full params with the chosen trainable params and LoRA folded in."""
  t = chosen(state)
  return lora_lib.merge(train.combine(state["params"], t["params"]), t["lora"], scale)


def start_task(state: dict, params: dict, lora: dict, trainable: str, tx,
               hparams: dict[str, float]) -> dict:
  """State for a new task on model `params`: fresh LoRA (or {}), optimizer state, hparams.

  Keeps every key of `state` and the structure of each value, so checkpoints of any task
  restore onto the same target.
  """
  frozen, tparams = train.partition(params, trainable)
  t = {"lora": lora, "params": tparams}
  out = {**state, "params": frozen, "trainable": t, "opt": tx.init(t),
         "hparams": {**state["hparams"],
                     **{k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}}}
  if "best" in state:
    out["best"] = {"trainable": jax.tree.map(jnp.copy, t), "h": jnp.asarray(-1.0, jnp.float32)}
  return out


def keep_best(state: dict, h) -> dict:
  """Stores the current trainable tree as the best where `h` is at least the best's.

  h: a float, or (N,) one score per member of a sweep's stacked state.
  """
  h = np.asarray(h, np.float64)
  better = h >= np.asarray(state["best"]["h"], np.float64)
  if not better.any():
    return state

  def pick(new, old):
    return jnp.where(better.reshape(better.shape + (1,) * (new.ndim - better.ndim)), new, old)

  return {**state, "best": {
      "trainable": jax.tree.map(pick, state["trainable"], state["best"]["trainable"]),
      "h": jnp.asarray(np.where(better, h, state["best"]["h"]), jnp.float32)}}


def group_report(lora: dict, group: str) -> dict[str, Any]:
  """{"norms": {group: norm}, "near_zero": fraction of groups below NEAR_ZERO * max norm}."""
  norms = {k: float(v) for k, v in losses.group_norms(lora, group).items()}
  top = max(norms.values(), default=0.0)
  near = sum(v < NEAR_ZERO * top for v in norms.values())
  return {"norms": norms, "near_zero": near / len(norms) if norms else float("nan")}
