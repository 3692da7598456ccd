"""kswap_jax inside your own training loop: forget digits 5-6 of a tiny ViT with a LoRA.

  python examples/custom_loop.py [--steps 30] [--data-dir DIR]

Builds the embedded digits (scikit-learn's 8x8 digits as a TFDS dataset), trains a tiny ViT
on all ten with cross-entropy, gives it a LoRA and trains only the LoRA with
CE(retain) + relu(bound - CE(forget)) (`kswap_jax.losses.bounded_forget`), both in plain
optax loops, then merges the LoRA into the weights (`kswap_jax.lora.merge`) and prints the
accuracy of the merged model on both sets in a last line `merged: ...`.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import kswap_jax
from kswap_jax.data import sources


def digits(split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """Images float32 (N, 8, 8, 1) in [-1, 1] and labels int32 (N,) of a digits split."""
  src = sources.open_source("sklearn_digits", split, data_dir)
  images = np.stack([src.image(i) for i in range(len(src))]).astype(np.float32)
  return images / 127.5 - 1.0, np.asarray(src.labels, np.int32)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=40, help="steps of each loop")
  parser.add_argument("--data-dir", default=os.environ.get("TFDS_DATA_DIR") or
                      os.path.join(tempfile.gettempdir(), "kswap_digits"))
  args = parser.parse_args()
  x, y = digits("train", args.data_dir)
  forget = np.isin(y, [5, 6])
  model = kswap_jax.make_model(ml_collections.ConfigDict(dict(variant="Nano/2", num_classes=10)))
  params = kswap_jax.init_params(model, jax.random.key(0), (8, 8, 1))
  rng = np.random.default_rng(0)
  tx = optax.adamw(3e-3)

  @jax.jit
  def pretrain_step(params, opt, xb, yb):
    ce = lambda p: kswap_jax.losses.cross_entropy(model.apply({"params": p}, xb), yb)  # noqa
    loss, grads = jax.value_and_grad(ce)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  opt = tx.init(params)
  for s in range(args.steps):
    b = rng.choice(len(x), 64)
    params, opt, loss = pretrain_step(params, opt, x[b], y[b])
  print(f"pretrained: loss {float(loss):.4f}")

  lora = kswap_jax.lora.init(jax.random.key(1), params, rank=4)
  scale = 1.0 / 4  # alpha / rank
  opt = tx.init(lora)

  def loss_fn(lora, xr, yr, xf, yf):
    logits = kswap_jax.lora.apply(model, params, lora, jnp.concatenate([xr, xf]), scale=scale)
    retain = kswap_jax.losses.cross_entropy(logits[:len(xr)], yr)
    return retain + kswap_jax.losses.bounded_forget(logits[len(xr):], yf, 8.0)

  @jax.jit
  def step(lora, opt, xr, yr, xf, yf):
    loss, grads = jax.value_and_grad(loss_fn)(lora, xr, yr, xf, yf)
    updates, opt = tx.update(grads, opt, lora)
    return optax.apply_updates(lora, updates), opt, loss

  r_idx, f_idx = np.flatnonzero(~forget), np.flatnonzero(forget)
  for s in range(args.steps):
    r, f = rng.choice(r_idx, 32), rng.choice(f_idx, 16)
    lora, opt, loss = step(lora, opt, x[r], y[r], x[f], y[f])
    if (s + 1) % 10 == 0:
      print(f"step {s + 1}: loss {float(loss):.4f}")

  merged = kswap_jax.lora.merge(params, lora, scale)
  adapted = kswap_jax.lora.apply(model, params, lora, x, scale=scale)
  logits = model.apply({"params": merged}, x)
  top1 = np.asarray(jnp.argmax(logits, -1)) == y
  print(f"merged: retain top-1 {100 * top1[~forget].mean():.2f}% forget top-1 "
        f"{100 * top1[forget].mean():.2f}% max |merged - adapted| "
        f"{float(jnp.max(jnp.abs(logits - adapted))):.2e}")


if __name__ == "__main__":
  main()
