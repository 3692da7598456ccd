"""Train state, pure update steps and evaluation shared by every job.

State (a plain dict pytree)::

  step        int32 ()           global update count (checkpoint step)
  stage_step  int32 ()           updates in the current stage (drives the lr schedule)
  rng         uint32 key data    base key; step s uses fold_in(rng, s)
  params      frozen base params (never updated)
  trainable   {"lora": LoRA tree or {}, "params": trainable subset of params or {}}
  opt         optax state of `optax.inject_hyperparams(optax.adamw)` over `trainable`
  hparams     {name: float32 ()}  learning rate, weight decay, loss weights, bounds
  stage       {name: int32/float32 ()}  the current stage's numbers (`stage_numbers`): its
                                 length, lr schedule and the values its loss reads

Everything a study may vary is an array in `hparams`, so a step can be vmapped over members;
everything a stage fixes is an array in `stage`, so stages that differ only in their numbers
(e.g. continual-forgetting tasks of different sizes) share one compiled step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kswap_jax import lora as lora_lib
from kswap_jax import progress, sharding, trees
from kswap_jax.data import pipeline

State = dict[str, Any]
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Network:
  """A ViT plus the static facts its forward pass needs (LoRA scale, input normalisation)."""
  model: nn.Module
  lora_scale: float = 1.0
  mean: float | tuple[float, ...] = 0.5  # one number, or one per channel
  std: float | tuple[float, ...] = 0.5
  rng_impl: str = "threefry2x32"

  def apply(self, params, lora, images, *, train: bool = False, rng=None,
            return_embedding: bool = False):
    """uint8 images (B, H, W, C) -> logits (B, K) [, embedding (B, D)]."""
    x = pipeline.normalize(images, self.mean, self.std)
    rngs = {"dropout": rng} if train else None
    return lora_lib.apply(self.model, params, lora, x, scale=self.lora_scale, train=train,
                          rngs=rngs, return_embedding=return_embedding)


def decay_mask(tree):
  """Weight decay on matrices (ndim >= 2) only: LoRA A/B and kernels, not biases or norms."""
  return jax.tree_util.tree_map(lambda x: x.ndim >= 2, tree)


def make_optimizer(b1=0.9, b2=0.999, eps=1e-8) -> optax.GradientTransformation:
  """AdamW whose learning_rate and weight_decay are arrays in its state (set by the step)."""
  return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=0.0, b1=b1, b2=b2, eps=eps, weight_decay=0.0, mask=decay_mask)


def lr_factor(stage_step, *, total_steps, warmup_steps=0, end_ratio=1e-3, steps_per_epoch=0):
  """Linear warm-up, then cosine decay from 1 to `end_ratio` over the stage.

  steps_per_epoch > 0: the cosine advances once per epoch (epoch e of E gets
  cos(pi e / E)), as in the papers' per-epoch schedules; warm-up is then not used.
  Every argument may be a Python number or an int32 / float32 () array (traced).
  """
  per_epoch = jnp.asarray(steps_per_epoch) > 0
  spe = jnp.maximum(steps_per_epoch, 1)
  t = jnp.where(per_epoch, stage_step // spe, stage_step - warmup_steps)
  total = jnp.where(per_epoch, -(-total_steps // spe), jnp.maximum(1, total_steps - warmup_steps))
  warm = jnp.where(per_epoch | (jnp.asarray(warmup_steps) <= 0), 1.0,
                   jnp.minimum(1.0, (stage_step + 1) / jnp.maximum(warmup_steps, 1)))
  progress = jnp.clip(t / total, 0.0, 1.0)
  return warm * (end_ratio + (1 - end_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress)))


def stage_numbers(num_steps: int, warmup_steps: int, steps_per_epoch: int, end_ratio: float,
                  **values: int | float) -> dict[str, np.ndarray]:
  """A stage's state["stage"]: its schedule's numbers and the `values` its loss reads (ints
  as int32, floats as float32 () arrays)."""
  numbers = dict(num_steps=num_steps, warmup_steps=warmup_steps,
                 steps_per_epoch=steps_per_epoch, end_ratio=float(end_ratio), **values)
  return {k: np.asarray(v, np.float32 if isinstance(v, float) else np.int32)
          for k, v in numbers.items()}


def stage_schedule(state: State) -> jax.Array:
  """lr factor of `state` at its stage_step: `lr_factor` over its state["stage"] numbers."""
  st = state["stage"]
  return lr_factor(state["stage_step"], total_steps=st["num_steps"],
                   warmup_steps=st["warmup_steps"], end_ratio=st["end_ratio"],
                   steps_per_epoch=st["steps_per_epoch"])


def init_state(params, lora, trainable_regex: str, hparams: dict[str, float], seed: int,
               tx: optax.GradientTransformation, rng_impl: str = "threefry2x32") -> State:
  """A fresh train state: `params` split by `trainable_regex` (over "a/b/leaf" paths) into
  frozen "params" and trainable["params"], the `lora` tree (None: {}) trainable too, optax
  `tx` state, step / stage_step int32 (), rng key data, and `hparams` as float32 () arrays."""
  frozen, tparams = trees.partition(params, trainable_regex)
  trainable = {"lora": lora or {}, "params": tparams}
  return {
      "step": jnp.zeros((), jnp.int32),
      "stage_step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.key(seed, impl=rng_impl)),
      "params": frozen,
      "trainable": trainable,
      "opt": tx.init(trainable),
      "hparams": {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()},
  }


def full_params(state: State) -> dict:
  """The model's params (frozen + trainable subset), LoRA not merged."""
  return trees.combine(state["params"], state["trainable"]["params"])


def make_step(loss_fn: LossFn, tx: optax.GradientTransformation,
              schedule: Callable[[State], jax.Array], rng_impl: str = "threefry2x32",
              context: Callable[[State], Any] | None = None,
              ) -> Callable[[State, Any], tuple[State, dict]]:
  """Pure update `(state, batches) -> (state, metrics)`.

  loss_fn(trainable, frozen_params, hparams, batches, rng) -> (loss, metrics dict).
  lr = hparams["lr"] * schedule(state) (e.g. `stage_schedule`); weight decay =
  hparams["weight_decay"].
  context: what the loss reads from the state besides its params, given to it as
  batches["ctx"] (e.g. the stage step and class prototypes).
  """

  def step(state: State, batches) -> tuple[State, dict]:
    if context is not None:
      batches = {**batches, "ctx": context(state)}
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=rng_impl),
                             state["step"])
    hp = state["hparams"]
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["trainable"], state["params"], hp, batches, rng)
    opt = state["opt"]
    lr = hp["lr"] * schedule(state)
    opt.hyperparams["learning_rate"] = lr
    opt.hyperparams["weight_decay"] = hp["weight_decay"]
    updates, opt = tx.update(grads, opt, state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    metrics = {"loss": loss, "lr": lr, **metrics}
    return {**state, "step": state["step"] + 1, "stage_step": state["stage_step"] + 1,
            "trainable": trainable, "opt": opt}, metrics

  return step


def correct_counts(net, num_classes: int, pass_labels: bool = False):
  """Jitted (params, lora, batch) -> (correct (K,), count (K,)) int32 for one eval batch.

  pass_labels: call `net.apply(..., labels=)` (a margin head that sees the true labels).
  """

  @jax.jit
  def fn(params, lora, batch):
    extra = {"labels": batch["labels"]} if pass_labels else {}
    logits = net.apply(params, lora, batch["images"], **extra)
    hit = (jnp.argmax(logits, -1) == batch["labels"]) & batch["mask"]
    onehot = jax.nn.one_hot(batch["labels"], num_classes, dtype=jnp.int32)
    return (onehot * hit[:, None]).sum(0), (onehot * batch["mask"][:, None]).sum(0)

  return fn


def evaluate(count_fn, params, lora, examples: pipeline.ExampleSet, batch_size: int,
             mesh) -> tuple[np.ndarray, np.ndarray]:
  """Per-class (correct, count), each (K,), over every example of `examples`; says its
  progress when it takes longer than a few seconds."""
  correct = count = 0
  tick = progress.Ticker(f"evaluating {examples.name or 'a set'}", -(-len(examples) // batch_size))
  for i, b in enumerate(pipeline.eval_batches(examples, batch_size, sharding.data_sharding(mesh))):
    c, n = count_fn(params, lora, b)
    correct, count = correct + c, count + n
    tick(i + 1)
  return np.asarray(correct), np.asarray(count)
