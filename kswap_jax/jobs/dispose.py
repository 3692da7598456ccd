"""`dispose`: transfer a source-pretrained ViT to a target task, then dispose of the source.

Stages: `transfer` (target CE, new target head, full fine-tune or LoRA) and `dispose`
(target CE + the `config.method` source term, see `kswap_jax.dtl`). The source head is kept,
frozen, for the source loss and for measuring source accuracy. After disposal the PL attack
(each of `pl.attacks`, on the `pl.data` examples) runs on the models of `pl.models`: the
scrubbed model, the transferred (unscrubbed) model and a randomly initialised one; with all
three, results.json also holds the leakage (PL_scrubbed - PL_random) / (PL_unscrubbed -
PL_random). Writes workdir/results.json (target and source-head accuracy before training and
after each stage, PL accuracies), workdir/transferred (exported after the transfer stage) and
workdir/model (the released model: LoRA merged, target head).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections

from kswap_jax import builders, dtl, loop, metrics, sharding, train, workdir
from kswap_jax import lora as lora_lib
from kswap_jax.data import pipeline
from kswap_jax.errors import UserError
from kswap_jax.models import vit
from kswap_jax.progress import say, table

FINETUNE = ("full", "lora")
PL_MODELS = ("scrubbed", "unscrubbed", "random")


def _examples(data, spec, labels, name):
  """(train, test) ExampleSets of a set spec; spec.test_split overrides data.test_split."""
  return (builders.example_set(data, spec, data.train_split, labels, name, subset=True),
          builders.example_set(data, spec, spec.get("test_split") or data.test_split, labels,
                               name, subset=False))


def _with_classes(model_cfg, n: int) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(model_cfg.to_dict())
  out.num_classes = n
  return out


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  workdir.check_config(run_dir, config)
  method = dtl.check_method(config.method)
  if config.finetune not in FINETUNE:
    raise UserError(f"finetune={config.finetune!r} is not allowed; use one of {FINETUNE}")
  pl_models = tuple(config.pl.models)
  if not pl_models or set(pl_models) - set(PL_MODELS):
    raise UserError(f"pl.models={pl_models} is not allowed; name some of {PL_MODELS}")
  data, tcfg, dcfg = config.data, config.train, config.dispose
  mesh = sharding.make_mesh(config.mesh)
  params, model_cfg, src_labels = builders.initial_model(config, run_dir)
  tgt_labels = builders.label_space(data, config.target.dataset, config.target.classes,
                                    "target.classes")
  pl_labels = builders.label_space(data, config.pl.data.dataset, config.pl.data.classes,
                                   "pl.data.classes")
  source_head = jax.device_put(params["head"], sharding.replicated(mesh))
  params = dtl.reset_head(params, len(tgt_labels), jax.random.key(config.seed + 1))
  tgt_cfg = _with_classes(model_cfg, len(tgt_labels))
  sets = {"target": _examples(data, config.target, tgt_labels, "target"),
          "source": _examples(data, config.source, src_labels, "source"),
          "pl": _examples(data, config.pl.data, pl_labels, "pl")}

  net = builders.network(config, tgt_cfg)
  net_src = builders.network(config, _with_classes(model_cfg, len(src_labels)))
  lora = None
  if config.finetune == "lora":
    lora = lora_lib.init(jax.random.key(config.seed + 2), params, rank=config.lora.rank,
                         targets=config.lora.targets, a_init=config.lora.a_init)
  tx = train.make_optimizer()
  hparams = {"lr": tcfg.lr.transfer, "weight_decay": tcfg.weight_decay,
             **{k: config.weights[k] for k in dtl.HPARAMS}}
  state = train.init_state(params, lora, "head/.*" if lora else ".*", hparams, config.seed, tx,
                           net.rng_impl)
  if method == "gc":
    dtl.measured_paths(state["trainable"], dcfg.gc_params)
  state_sharding = sharding.state_shardings(state, mesh, config.mesh.get("rules", ()))
  state = jax.device_put(state, state_sharding)
  say(f"dispose ({method}, {config.finetune}): source {len(sets['source'][0])} / target "
      f"{len(sets['target'][0])} / PL {len(sets['pl'][0])} train images; trainable "
      f"{lora_lib.count(state['trainable']):,} parameters")

  counts_t = train.correct_counts(net, len(tgt_labels))
  counts_s = train.correct_counts(net_src, len(src_labels))
  path = os.path.join(run_dir, "results.json")
  results = workdir.read_json(path, {"evals": []})
  results.update(method=method, finetune=config.finetune,
                 examples={k: {"train": len(a), "test": len(b)} for k, (a, b) in sets.items()})

  def evaluate(state, when: str):
    params, lora = train.full_params(state), state["trainable"]["lora"]
    ct = train.evaluate(counts_t, params, lora, sets["target"][1], data.eval_batch_size, mesh)
    cs = train.evaluate(counts_s, {**params, "head": source_head}, lora, sets["source"][1],
                        data.eval_batch_size, mesh)
    row = {"after": when, "target_acc": _acc(*ct), "source_acc": _acc(*cs)}
    results["evals"] = [r for r in results["evals"] if r["after"] != when] + [row]
    workdir.write_json(path, results)
    say(table(results["evals"], ["after", "target_acc", "source_acc"]))

  def released(state):
    return lora_lib.merge(train.full_params(state), state["trainable"]["lora"], net.lora_scale)

  def end_transfer(state):
    evaluate(state, "transfer")
    workdir.export_model(os.path.join(run_dir, "transferred"), released(state), tgt_cfg,
                         tgt_labels.to_json())

  def end_dispose(state):
    evaluate(state, "dispose")
    scrubbed = released(state)
    workdir.export_model(os.path.join(run_dir, "model"), scrubbed, tgt_cfg, tgt_labels.to_json(),
                         extra={"method": method})
    build = {"scrubbed": lambda: scrubbed,
             "unscrubbed": lambda: workdir.load_model(os.path.join(run_dir, "transferred"))[0],
             "random": lambda: vit.init_params(net.model, jax.random.key(config.seed + 3),
                                               (data.image_size, data.image_size, data.channels))}
    results["pl"] = _pl_attacks(config, _with_classes(model_cfg, len(pl_labels)), mesh,
                                sets["pl"], {m: build[m]() for m in pl_models})
    workdir.write_json(path, results)
    say(table([{"attack": a, **r} for a, r in results["pl"].items()],
              ["attack", *pl_models, "leakage"], "{:.3f}"))

  if not any(r["after"] == "pretrained" for r in results["evals"]):
    evaluate(state, "pretrained")
  batch_sharding = sharding.data_sharding(mesh)
  tgt_sampler = pipeline.EpochSampler(len(sets["target"][0]), tcfg.batch_size, config.seed)
  src_sampler = pipeline.EpochSampler(len(sets["source"][0]), dcfg.source_batch_size,
                                      config.seed + 7)

  def batches(s, with_source):
    out = {"target": pipeline.batch(sets["target"][0], tgt_sampler.positions(s),
                                    batch_sharding)}
    if with_source:
      out["source"] = pipeline.batch(sets["source"][0], src_sampler.positions(s),
                                     batch_sharding)
    return out

  def stage_step(kind, steps):
    schedule = functools.partial(train.lr_factor, total_steps=steps,
                                 end_ratio=tcfg.lr_end / tcfg.lr[kind],
                                 steps_per_epoch=tgt_sampler.steps_per_epoch)
    loss = dtl.disposal_loss(net, source_head, method if kind == "dispose" else "none",
                             num_splits=dcfg.num_splits, gc_params=dcfg.gc_params,
                             similarity=dcfg.similarity)
    return sharding.compile_step(train.make_step(loss, tx, schedule, net.rng_impl), mesh,
                                 state_sharding)

  def begin_dispose(state):  # fresh optimizer moments and the disposal learning rate
    hp = {**state["hparams"], "lr": jnp.float32(tcfg.lr.dispose)}
    return jax.device_put({**state, "opt": tx.init(state["trainable"]), "hparams": hp},
                          state_sharding)

  n_t = tcfg.epochs.transfer * tgt_sampler.steps_per_epoch
  n_d = tcfg.epochs.dispose * tgt_sampler.steps_per_epoch
  stages = [loop.Stage("transfer", n_t, stage_step("transfer", n_t),
                       functools.partial(batches, with_source=False), end=end_transfer),
            loop.Stage("dispose", n_d, stage_step("dispose", n_d),
                       functools.partial(batches, with_source=method != "none"),
                       begin=begin_dispose, end=end_dispose)]
  ckpts = workdir.Checkpoints(os.path.join(run_dir, "checkpoints"),
                              config.checkpoint.every_steps, config.checkpoint.keep)
  loop.run(state, stages, ckpts, run_dir, config.log_every)
  return results


def _acc(correct, count) -> float:
  return metrics.set_accuracy(correct, count)


def _pl_attacks(config, model_cfg, mesh, pl_sets, models: dict) -> dict:
  """{attack: {model name: PL accuracy %[, "leakage": score when all PL_MODELS ran]}}."""
  pl = config.pl
  net = builders.network(config, model_cfg)
  out = {}
  for variant in pl.attacks:
    attack = dtl.pl_attacker(net, *pl_sets, variant=variant, steps=pl[variant].steps,
                             lr=pl[variant].lr, batch_size=pl.batch_size,
                             weight_decay=pl.weight_decay,
                             eval_batch_size=config.data.eval_batch_size, mesh=mesh,
                             seed=config.seed + 11)
    acc = {name: attack(params) for name, params in models.items()}
    out[variant] = acc
    if set(PL_MODELS) <= set(acc):
      acc["leakage"] = dtl.leakage(acc["scrubbed"], acc["unscrubbed"], acc["random"])
  return out
