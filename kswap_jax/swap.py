"""Knowledge Swapping: the stage plan of each order, the swap losses and LoRA analysis.

Orders (config `order`), each a list of (stage kind, main set, paired sets):
  lbf          learn (R main, L paired), then forget (R' = R + L main, F paired)
  fbl          forget (R main, F paired), then learn (R main, L paired)
  simultaneous one stage with all three losses (R main, L and F paired)
  learn        the learn stage only; forget: the forget stage only (for layer studies)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kswap_jax import lora as lora_lib
from kswap_jax import losses, train
from kswap_jax.errors import UserError

ORDERS = {
    "lbf": [("learn", "retain", ("learn",)), ("forget", "retain+learn", ("forget",))],
    "fbl": [("forget", "retain", ("forget",)), ("learn", "retain", ("learn",))],
    "simultaneous": [("swap", "retain", ("learn", "forget"))],
    "learn": [("learn", "retain", ("learn",))],
    "forget": [("forget", "retain", ("forget",))],
}

# Loss weights and the bound, all arrays in state["hparams"] (a sweep may vary them).
HPARAMS = ("learn", "retain_in_learn", "retain", "forget", "bound", "sparse")


def plan(order: str):
  if order not in ORDERS:
    raise UserError(f"order={order!r} is not allowed; use one of {sorted(ORDERS)}")
  return ORDERS[order]


def grow_head(params, num_new: int, rng: jax.Array):
  """Appends `num_new` head outputs: kernel columns xavier-uniform, bias zero."""
  kernel, bias = params["head"]["kernel"], params["head"]["bias"]
  new = jax.nn.initializers.xavier_uniform()(rng, (kernel.shape[0], num_new), kernel.dtype)
  head = {"kernel": jnp.concatenate([kernel, new], 1),
          "bias": jnp.concatenate([bias, jnp.zeros((num_new,), bias.dtype)])}
  return {**params, "head": head}


def stage_loss(net: train.Network, kind: str, group: str):
  """loss_fn(trainable, frozen, hparams, batches, rng) for a stage kind.

  batches: {"retain": b, "learn": b, "forget": b} (those the stage pairs), each
  {"images": uint8 (B, H, W, C), "labels": int32 (B,)}. One forward pass over all of them.
    learn:  learn * CE(L) + retain_in_learn * CE(R) + sparse * S
    forget: retain * CE(R') + forget * relu(bound - CE(F)) + sparse * S
    swap:   learn * CE(L) + retain * CE(R) + forget * relu(bound - CE(F)) + sparse * S
  """

  def loss_fn(trainable, frozen, hp, batches, rng):
    names = sorted(batches)
    images = jnp.concatenate([batches[n]["images"] for n in names])
    logits = net.apply(train.combine(frozen, trainable["params"]), trainable["lora"], images,
                       train=True, rng=rng)
    ce, start = {}, 0
    for n in names:
      size = batches[n]["labels"].shape[0]
      ce[n] = losses.cross_entropy(logits[start:start + size], batches[n]["labels"])
      start += size
    sparse = losses.group_sparse(trainable["lora"], group)
    total = hp["sparse"] * sparse
    if kind in ("learn", "swap"):
      total += hp["learn"] * ce["learn"]
    if kind == "learn":
      total += hp["retain_in_learn"] * ce["retain"]
    else:
      total += hp["retain"] * ce["retain"]
      total += hp["forget"] * jax.nn.relu(hp["bound"] - ce["forget"])
    return total, {**{f"ce_{n}": v for n, v in ce.items()}, "sparse": sparse}

  return loss_fn


def block_analysis(lora, scale: float) -> list[dict]:
  """Per block: sum of the Frobenius norms of its LoRA tensors, and of |scale * A B|."""
  rows: dict[int, dict] = {}
  for path, ab in lora_lib.layers(lora).items():
    block = int(path.split("encoderblock_")[1].split("/")[0])
    r = rows.setdefault(block, {"block": block, "lora_norm": 0.0, "delta_norm": 0.0})
    r["lora_norm"] += float(jnp.linalg.norm(ab["A"]) + jnp.linalg.norm(ab["B"]))
    r["delta_norm"] += float(np.linalg.norm(np.asarray(scale * ab["A"] @ ab["B"])))
  return [rows[b] for b in sorted(rows)]
