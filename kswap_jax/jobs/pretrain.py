"""`pretrain`: train a ViT (from scratch or from a .npz) on a dataset's classes.

Produces the exported model (workdir/model) that the unlearning jobs start from, with
per-class and overall test top-1 accuracy in workdir/results.json.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections

from kswap_jax import builders, checkpoints, loop, losses, metrics, sharding, train, workdir
from kswap_jax.data import pipeline
from kswap_jax.models import vit
from kswap_jax.progress import say, table


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  workdir.check_config(run_dir, config)
  data, tcfg = config.data, config.train
  mesh = sharding.make_mesh(config.mesh)
  labels = builders.label_space(data, data.dataset, data.classes, "data.classes")
  spec = ml_collections.ConfigDict(dict(dataset=data.dataset, classes=data.classes,
                                        fraction=data.get("fraction", 1.0),
                                        per_class=data.get("per_class", 0), seed=config.seed))
  train_set = builders.example_set(data, spec, data.train_split, labels, "train", subset=True)
  test_set = builders.example_set(data, spec, data.test_split, labels, "test", subset=False)

  model_cfg = ml_collections.ConfigDict(config.model)
  model_cfg.num_classes = len(labels)
  net = builders.network(config, model_cfg)
  params = vit.init_params(net.model, jax.random.key(config.seed),
                           (data.image_size, data.image_size, data.channels))
  if config.init.get("checkpoint"):
    params = checkpoints.load_pretrained(config.init.checkpoint, params,
                                         dont_load=tuple(config.init.get("dont_load", ())))
  tx = train.make_optimizer()
  state = train.init_state(params, None, ".*", {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay},
                           config.seed, tx, net.rng_impl)
  state = sharding.shard_state(state, mesh, config.mesh.get("rules", ()))

  def loss_fn(trainable, frozen, hp, batches, rng):
    del hp
    logits = net.apply(train.combine(frozen, trainable["params"]), None, batches["images"],
                       train=True, rng=rng)
    acc = jnp.mean(jnp.argmax(logits, -1) == batches["labels"])
    return losses.cross_entropy(logits, batches["labels"]), {"acc": acc}

  sampler = pipeline.EpochSampler(len(train_set), tcfg.batch_size, config.seed)
  steps = tcfg.epochs * sampler.steps_per_epoch
  schedule = functools.partial(train.lr_factor, total_steps=steps,
                               warmup_steps=tcfg.get("warmup_steps", 0),
                               end_ratio=tcfg.lr_end / tcfg.lr)
  step = sharding.compile_step(train.make_step(loss_fn, tx, schedule, net.rng_impl), mesh,
                               jax.tree.map(lambda x: x.sharding, state))
  batch_sharding = sharding.data_sharding(mesh)
  counts = train.correct_counts(net, len(labels))
  results = {}

  def end(state):
    params = train.full_params(state)
    correct, count = train.evaluate(counts, params, None, test_set, data.eval_batch_size, mesh)
    per_class = {labels.entries[k][2]: metrics.set_accuracy(correct, count, [k])
                 for k in range(len(labels))}
    results.update(test_accuracy=metrics.set_accuracy(correct, count), per_class=per_class,
                   steps=int(state["step"]), train_examples=len(train_set),
                   test_examples=len(test_set))
    workdir.write_json(os.path.join(run_dir, "results.json"), results)
    workdir.export_model(os.path.join(run_dir, "model"), params, model_cfg, labels.to_json())
    rows = [{"class": k, "test top-1 %": v} for k, v in per_class.items()]
    rows.append({"class": "all", "test top-1 %": results["test_accuracy"]})
    say(table(rows, ["class", "test top-1 %"]))

  say(f"pretrain: {len(train_set)} train / {len(test_set)} test images, {len(labels)} classes, "
      f"ViT {config.model.variant}, {steps} steps")
  ckpts = workdir.Checkpoints(os.path.join(run_dir, "checkpoints"),
                              config.checkpoint.every_steps, config.checkpoint.keep)
  loop.run(state, [loop.Stage(
      "pretrain", steps, step,
      lambda s: pipeline.batch(train_set, sampler.positions(s), batch_sharding), end=end)],
           ckpts, run_dir, config.log_every)
  return results
