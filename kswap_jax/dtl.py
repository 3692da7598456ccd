"""Disposable Transfer Learning: the Gradient Collision (GC) disposal loss, two baselines and
the piggyback-learning (PL) attack.

A source-pretrained ViT is transferred to a target task (new target head); disposal then
trains `target * CE_tgt + source term` so that the released model keeps its target accuracy
but is a poor starting point for re-learning the source task. Source terms (`METHODS`):

  gc            gc * GC: a source batch is split into K sub-batches, g_k = d CE_src(B_k) / d
                theta (over the params chosen by a regex), GC = mean_{i != j} cos(g_i, g_j).
                The K gradients are taken inside the loss (vmap of grad), so the update
                differentiates through them (second order).
  grad_ascent   ascent * relu(bound - CE_src): bounded gradient ascent on the source batch.
  random_label  random_label * CE_src(wrong labels): each source example gets a uniformly
                drawn wrong source class, fresh every step.
  none          no source term (plain target fine-tuning).

Source logits come from the frozen source head on the model's embedding, so the target head
and the source head never share rows. PL accuracy (`pl_attacker`): a fresh head on a model's
backbone, trained on a few labelled source (or new downstream) examples for a fixed budget,
either the head only ("linear") or everything ("full"); its test top-1 is the leakage.
"""
from __future__ import annotations

import functools
import re
from typing import Callable

import jax
import jax.numpy as jnp
from flax import traverse_util

from kswap_jax import losses, metrics, sharding, swap, train
from kswap_jax.data import pipeline
from kswap_jax.errors import UserError

METHODS = ("gc", "none", "grad_ascent", "random_label")
ATTACKS = {"linear": "head/.*", "full": ".*"}  # attack variant -> trainable-params regex
# Loss weights and the ascent bound, all arrays in state["hparams"].
HPARAMS = ("target", "gc", "ascent", "bound", "random_label")

Batch = dict[str, jax.Array]


def check_method(method: str) -> str:
  if method not in METHODS:
    raise UserError(f"method={method!r} is not allowed; use one of {METHODS}")
  return method


def reset_head(params, num_classes: int, rng: jax.Array):
  """Params with a new head for `num_classes`: kernel (D, num_classes) xavier-uniform, bias 0."""
  head = jax.tree_util.tree_map(lambda x: x[..., :0], params["head"])  # no outputs yet
  return swap.grow_head({**params, "head": head}, num_classes, rng)


def head_logits(embedding: jax.Array, head) -> jax.Array:
  """(B, D) embedding through a {"kernel": (D, K), "bias": (K,)} head -> (B, K) float32."""
  return (embedding @ head["kernel"] + head["bias"]).astype(jnp.float32)


def split(batch: Batch, k: int) -> Batch:
  """Leaves (B, ...) -> (K, B / K, ...): K equal sub-batches."""
  size = jax.tree_util.tree_leaves(batch)[0].shape[0]
  if k < 2 or size % k:
    raise UserError(f"dispose.num_splits={k} must be >= 2 and divide the source batch size "
                    f"{size}")
  return jax.tree_util.tree_map(lambda x: x.reshape(k, size // k, *x.shape[1:]), batch)


def measured_paths(trainable, regex: str) -> list[str]:
  """Paths ("lora/..." or "params/...") of the trainable leaves that GC is measured on."""
  paths = list(traverse_util.flatten_dict(trainable, sep="/"))
  hits = [p for p in paths if re.fullmatch(regex, p)]
  if not hits:
    raise UserError(f"dispose.gc_params={regex!r} matches no trainable parameter; trainable "
                    f"paths are e.g. {paths[:3]}")
  return hits


def collision(ce_fn: Callable[[object, Batch], jax.Array], measured, sub_batches: Batch,
              similarity: str = "cosine") -> tuple[jax.Array, jax.Array]:
  """(GC, mean source CE) of the K sub-batches.

  ce_fn(measured, batch) -> scalar source CE of one sub-batch; sub_batches leaves (K, b, ...).
  The per-sub-batch gradients are a traced function of `measured` (and of anything ce_fn closes
  over), so differentiating the result is second order.
  """
  ce, grads = jax.vmap(jax.value_and_grad(ce_fn), in_axes=(None, 0))(measured, sub_batches)
  return losses.gradient_collision(grads, similarity), ce.mean()


def _model_args(trainable, frozen) -> tuple[dict, dict]:
  """(params, lora) of a trainable tree that may lack an empty "lora" / "params" branch."""
  return train.combine(frozen, trainable.get("params", {})), trainable.get("lora", {})


def disposal_loss(net: train.Network, source_head, method: str, *, num_splits: int = 4,
                  gc_params: str = ".*", similarity: str = "cosine") -> train.LossFn:
  """loss_fn(trainable, frozen, hparams, batches, rng) for `train.make_step`.

  batches: {"target": b[, "source": b]}, b = {"images": uint8 (B, H, W, C), "labels": (B,)};
    target labels index the target head, source labels the frozen `source_head` (D, K_src).
  Loss: target * CE_tgt + the method's source term (module docstring). GC is measured on the
  trainable leaves whose path ("lora/..." / "params/...") fully matches `gc_params`, with the
  source gradients taken in inference mode (no dropout).
  """
  check_method(method)

  def loss_fn(trainable, frozen, hp, batches, rng):
    params, lora = _model_args(trainable, frozen)
    tgt = batches["target"]
    logits = net.apply(params, lora, tgt["images"], train=True, rng=rng)
    ce_t = losses.cross_entropy(logits, tgt["labels"])
    aux = {"ce_target": ce_t,
               "acc_target": jnp.mean(jnp.argmax(logits, -1) == tgt["labels"])}
    total = hp["target"] * ce_t
    if method == "none":
      return total, aux
    src = batches["source"]
    if method == "gc":
      rest, measured = train.partition(trainable, gc_params)

      def ce_fn(m, b):
        p, lo = _model_args(train.combine(rest, m), frozen)
        _, emb = net.apply(p, lo, b["images"], return_embedding=True)
        return losses.cross_entropy(head_logits(emb, source_head), b["labels"])

      gc, ce_s = collision(ce_fn, measured, split(src, num_splits), similarity)
      return total + hp["gc"] * gc, {**aux, "gc": gc, "ce_source": ce_s}
    _, emb = net.apply(params, lora, src["images"], train=True,
                       rng=jax.random.fold_in(rng, 1), return_embedding=True)
    src_logits = head_logits(emb, source_head)
    ce_s = losses.cross_entropy(src_logits, src["labels"])
    if method == "grad_ascent":
      term = hp["ascent"] * losses.bounded_forget(src_logits, src["labels"], hp["bound"])
    else:
      n = src_logits.shape[-1]
      shift = jax.random.randint(jax.random.fold_in(rng, 2), src["labels"].shape, 1, n)
      term = hp["random_label"] * losses.cross_entropy(src_logits, (src["labels"] + shift) % n)
    return total + term, {**aux, "ce_source": ce_s}

  return loss_fn


def supervised_loss(net: train.Network) -> train.LossFn:
  """CE of batches {"images", "labels"} through the model's own head (LoRA-free)."""

  def loss_fn(trainable, frozen, hp, batches, rng):
    del hp
    logits = net.apply(train.combine(frozen, trainable["params"]), None, batches["images"],
                       train=True, rng=rng)
    return losses.cross_entropy(logits, batches["labels"]), {}

  return loss_fn


def pl_attacker(net: train.Network, train_set: pipeline.ExampleSet,
                test_set: pipeline.ExampleSet, *, variant: str, steps: int, lr: float,
                batch_size: int, weight_decay: float, eval_batch_size: int, mesh,
                seed: int) -> Callable[[dict], float]:
  """attack(params) -> PL accuracy (test top-1 %) of one attack variant.

  `net.model` has one output per PL class. attack() gives `params` (a LoRA-free ViT, any
  head) a fresh head and trains `steps` AdamW steps (cosine from `lr` to 1e-3 lr) on
  `train_set`: the head only ("linear") or all params ("full"). The compiled step is shared
  by every call, so the scrubbed, unscrubbed and random models cost one compilation.
  """
  if variant not in ATTACKS:
    raise UserError(f"pl.attacks has {variant!r}; allowed: {sorted(ATTACKS)}")
  tx = train.make_optimizer()
  schedule = functools.partial(train.lr_factor, total_steps=steps)
  step = sharding.compile_step(
      train.make_step(supervised_loss(net), tx, schedule, net.rng_impl), mesh)
  sampler = pipeline.EpochSampler(len(train_set), batch_size, seed)
  batch_sharding = sharding.data_sharding(mesh)
  counts = train.correct_counts(net, net.model.num_classes)

  def attack(params) -> float:
    params = reset_head(params, net.model.num_classes, jax.random.key(seed))
    state = train.init_state(params, None, ATTACKS[variant],
                             {"lr": lr, "weight_decay": weight_decay}, seed, tx, net.rng_impl)
    state = jax.device_put(state, sharding.replicated(mesh), may_alias=False)  # step donates it
    for s in range(steps):
      state, _ = step(state, pipeline.batch(train_set, sampler.positions(s), batch_sharding))
    correct, count = train.evaluate(counts, train.full_params(state), None, test_set,
                                    eval_batch_size, mesh)
    return metrics.set_accuracy(correct, count)

  return attack


def leakage(pl_scrubbed: float, pl_unscrubbed: float, pl_random: float) -> float:
  """(PL_scrubbed - PL_random) / (PL_unscrubbed - PL_random): 1 = nothing disposed, 0 = the
  random-init floor; NaN when the unscrubbed model is no better than random."""
  gap = pl_unscrubbed - pl_random
  return float((pl_scrubbed - pl_random) / gap) if gap > 1e-9 else float("nan")
