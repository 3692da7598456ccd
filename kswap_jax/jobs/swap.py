"""`swap`: from a pretrained ViT, forget F, retain R and learn L (Knowledge Swapping).

Writes workdir/results.json (top-1 on the R, F and L test sets before training and after each
stage), workdir/lora_blocks.json + lora_blocks.png (per-block LoRA norms after each stage),
workdir/accuracy.png, and the swapped model (LoRA merged) in workdir/model.
"""
from __future__ import annotations

import functools
import os

import jax
import matplotlib
import ml_collections
import numpy as np

from kswap_jax import builders, loop, metrics, sharding, swap, train, workdir
from kswap_jax import lora as lora_lib
from kswap_jax.data import pipeline, sources
from kswap_jax.errors import UserError
from kswap_jax.progress import say, table

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

HEAD_MODES = {"train": "head/.*", "frozen": ""}


def _sets(config, labels: pipeline.LabelSpace):
  """Train and test ExampleSets for retain / forget / learn, labels in `labels`."""
  data, out = config.data, {}
  for name in ("retain", "forget", "learn"):
    spec = config.sets[name]
    out[name] = tuple(
        builders.example_set(data, spec, builders.split_of(data, spec, which), labels,
                             f"sets.{name}", subset=which == "train")
        for which in ("train", "test"))
  return out


def prepare(config: ml_collections.ConfigDict, run_dir: str):
  """(pretrained params, model config, label space, sets, number of learn classes).

  The label space and model config already include the learn classes; the params' head does
  not (`initial_state` grows it).
  """
  swap.plan(config.order)
  if config.head not in HEAD_MODES:
    raise UserError(f"head={config.head!r} is not allowed; use one of {sorted(HEAD_MODES)}")
  params, model_cfg, labels = builders.initial_model(config, run_dir)
  learn = config.sets.learn
  src = builders.source(config.data, learn.dataset,
                        builders.split_of(config.data, learn, "train"))
  new_ids = sources.parse_classes(learn.classes, src.class_names, "sets.learn.classes")
  labels = labels.extend(learn.dataset, new_ids, src.class_names)
  model_cfg.num_classes = len(labels)
  sets = _sets(config, labels)
  for a, b in (("retain", "forget"), ("retain", "learn"), ("forget", "learn")):
    both = set(sets[a][1].classes()) & set(sets[b][1].classes())
    if both:
      raise UserError(f"sets.{a} and sets.{b} share classes {sorted(both)}; make them disjoint")
  return params, model_cfg, labels, sets, len(new_ids)


def initial_state(config: ml_collections.ConfigDict, params, num_new: int, net: train.Network,
                  tx) -> train.State:
  """The run's state: head grown by `num_new` outputs, LoRA, rng and hparams from `config`."""
  params = swap.grow_head(params, num_new, jax.random.key(config.seed + 1))
  lcfg, tcfg = config.lora, config.train
  lora = lora_lib.init(jax.random.key(config.seed + 2), params, rank=lcfg.rank,
                       targets=lcfg.targets, a_init=lcfg.a_init)
  hparams = {"lr": tcfg.lr, "weight_decay": tcfg.weight_decay,
             **{k: config.weights[k] for k in swap.HPARAMS}}
  return train.init_state(params, lora, HEAD_MODES[config.head], hparams, config.seed, tx,
                          net.rng_impl)


def stage_inputs(config: ml_collections.ConfigDict, sets: dict, batch_sharding):
  """Per stage of the plan: (kind, num_steps, steps_per_epoch, batches(stage_step))."""
  tcfg, out = config.train, []
  for kind, main, paired in swap.plan(config.order):
    main_set = (pipeline.concat(sets["retain"][0], sets["learn"][0], "retain+learn")
                if main == "retain+learn" else sets[main][0])
    main_sampler = pipeline.EpochSampler(len(main_set), tcfg.batch_size, config.seed)
    samplers = {p: pipeline.EpochSampler(len(sets[p][0]), tcfg.batch_size, config.seed + 7)
                for p in paired}

    def batches(s, main_set=main_set, main_sampler=main_sampler, samplers=samplers):
      out = {"retain": pipeline.batch(main_set, main_sampler.positions(s), batch_sharding)}
      for p, smp in samplers.items():
        out[p] = pipeline.batch(sets[p][0], smp.positions(s), batch_sharding)
      return out

    per_epoch = main_sampler.steps_per_epoch
    out.append((kind, tcfg.epochs[kind] * per_epoch, per_epoch, batches))
  return out


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  workdir.check_config(run_dir, config)
  params, model_cfg, labels, sets, num_new = prepare(config, run_dir)
  mesh = sharding.make_mesh(config.mesh)
  net = builders.network(config, model_cfg)
  tcfg = config.train
  tx = train.make_optimizer()
  state = initial_state(config, params, num_new, net, tx)
  state = sharding.shard_state(state, mesh, config.mesh.get("rules", ()))
  state_sharding = jax.tree.map(lambda x: x.sharding, state)
  n_train = lora_lib.count(state["trainable"])
  params = train.full_params(state)
  say(f"swap ({config.order}): R {len(sets['retain'][0])} / F {len(sets['forget'][0])} / "
      f"L {len(sets['learn'][0])} train images; trainable {n_train:,} of "
      f"{lora_lib.count(params) + lora_lib.count(state['trainable']['lora']):,} parameters "
      f"({100 * n_train / lora_lib.count(params):.2f}%)")

  counts = train.correct_counts(net, len(labels))
  results = workdir.read_json(os.path.join(run_dir, "results.json"), {"evals": []})

  def evaluate(state, when: str):
    params, lora = train.full_params(state), state["trainable"]["lora"]
    row = {"after": when}
    for name, (_, test) in sets.items():
      correct, count = train.evaluate(counts, params, lora, test, config.data.eval_batch_size,
                                      mesh)
      row[f"acc_{name[0]}"] = metrics.set_accuracy(correct, count)
    results["evals"] = [r for r in results["evals"] if r["after"] != when] + [row]
    results.setdefault("blocks", {})[when] = swap.block_analysis(lora, net.lora_scale)
    workdir.write_json(os.path.join(run_dir, "results.json"), results)
    say(table(results["evals"], ["after", "acc_r", "acc_f", "acc_l"]))

  if not any(r["after"] == "pretrained" for r in results["evals"]):
    evaluate(state, "pretrained")
  stages = []
  for kind, steps, per_epoch, batches in stage_inputs(config, sets, sharding.data_sharding(mesh)):
    schedule = functools.partial(train.lr_factor, total_steps=steps, end_ratio=tcfg.lr_end /
                                 tcfg.lr, steps_per_epoch=per_epoch)
    step = sharding.compile_step(
        train.make_step(swap.stage_loss(net, kind, config.sparse_group), tx, schedule,
                        net.rng_impl), mesh, state_sharding)
    stages.append(loop.Stage(kind, steps, step, batches,
                             end=functools.partial(evaluate, when=kind)))

  ckpts = workdir.Checkpoints(os.path.join(run_dir, "checkpoints"),
                              config.checkpoint.every_steps, config.checkpoint.keep)
  state = loop.run(state, stages, ckpts, run_dir, config.log_every)
  merged = lora_lib.merge(train.full_params(state), state["trainable"]["lora"], net.lora_scale)
  workdir.export_model(os.path.join(run_dir, "model"), merged, model_cfg, labels.to_json())
  if jax.process_index() == 0:
    _plots(results, run_dir)
  return results


def _plots(results: dict, run_dir: str) -> None:
  """accuracy.png (R/F/L after each stage) and lora_blocks.png (per-block norms)."""
  evals = results["evals"]
  fig, ax = plt.subplots(figsize=(5, 3.2))
  x = np.arange(len(evals))
  for i, (key, name) in enumerate((("acc_r", "retain"), ("acc_f", "forget"),
                                   ("acc_l", "learn"))):
    ax.bar(x + (i - 1) * 0.27, [r[key] for r in evals], 0.27, label=name)
  ax.set_xticks(x, [r["after"] for r in evals])
  ax.set_ylabel("test top-1 (%)")
  ax.set_ylim(0, 105)
  ax.legend(fontsize=8)
  ax.set_title("accuracy before and after each stage")
  fig.tight_layout()
  fig.savefig(os.path.join(run_dir, "accuracy.png"), dpi=120)
  plt.close(fig)
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
  for when, rows in results["blocks"].items():
    if when == "pretrained":
      continue
    blocks = [r["block"] for r in rows]
    axes[0].plot(blocks, [r["lora_norm"] for r in rows], "o-", label=f"after {when}")
    axes[1].plot(blocks, [r["delta_norm"] for r in rows], "o-", label=f"after {when}")
  axes[0].set_title("sum of |A|, |B| norms per block")
  axes[1].set_title("|scale * A B| per block")
  for a in axes:
    a.set_xlabel("transformer block")
    a.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(run_dir, "lora_blocks.png"), dpi=120)
  plt.close(fig)
