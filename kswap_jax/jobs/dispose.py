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

import dataclasses
import functools
import os
from typing import Any

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


@dataclasses.dataclass
class Disposal:
  """What both stages of a disposal run share, built by `prepare`.

  state: the initial train state (placed by `state_sharding`); steps: {"transfer": n,
  "dispose": n}; sets and labels: {"target" | "source" | "pl": (train, test) ExampleSets,
  LabelSpace}.
  """
  config: ml_collections.ConfigDict
  method: str
  mesh: jax.sharding.Mesh
  net: train.Network
  tgt_cfg: ml_collections.ConfigDict
  pl_cfg: ml_collections.ConfigDict
  labels: dict
  sets: dict
  source_head: dict
  tx: Any
  state: dict
  state_sharding: Any
  steps: dict
  counts: tuple
  samplers: tuple

  def batches(self, s: int, with_source: bool) -> dict:
    """Stage step s: {"target": batch[, "source": batch]} on the mesh."""
    tgt, src = self.samplers
    put = sharding.data_sharding(self.mesh)
    out = {"target": pipeline.batch(self.sets["target"][0], tgt.positions(s), put)}
    if with_source:
      out["source"] = pipeline.batch(self.sets["source"][0], src.positions(s), put)
    return out

  def loss(self, kind: str) -> train.LossFn:
    """Loss of stage `kind`: target CE, plus the method's source term in "dispose"."""
    dcfg = self.config.dispose
    return dtl.disposal_loss(self.net, self.source_head,
                             self.method if kind == "dispose" else "none",
                             num_splits=dcfg.num_splits, gc_params=dcfg.gc_params,
                             similarity=dcfg.similarity)

  def step(self, kind: str):
    """Uncompiled update of stage `kind`; its lr decays per epoch to train.lr_end."""
    tcfg = self.config.train
    schedule = functools.partial(train.lr_factor, total_steps=self.steps[kind],
                                 end_ratio=tcfg.lr_end / tcfg.lr[kind],
                                 steps_per_epoch=self.samplers[0].steps_per_epoch)
    return train.make_step(self.loss(kind), self.tx, schedule, self.net.rng_impl)

  def start_dispose(self, state: dict, lr: float, weights: dict | None = None) -> dict:
    """The state the dispose stage starts from: fresh optimizer moments, its lr (and weights)."""
    hp = {**state["hparams"], "lr": jnp.float32(lr),
          **{k: jnp.float32(v) for k, v in (weights or {}).items()}}
    return {**state, "opt": self.tx.init(state["trainable"]), "hparams": hp}

  def accuracies(self, state: dict, split: int = 1, sets=None) -> dict:
    """{"target_acc", "source_acc"} (%) of a state on the test (split 1) sets."""
    sets = sets or self.sets
    params, lora = train.full_params(state), state["trainable"]["lora"]
    counts_t, counts_s = self.counts
    bs = self.config.data.eval_batch_size
    ct = train.evaluate(counts_t, params, lora, sets["target"][split], bs, self.mesh)
    cs = train.evaluate(counts_s, {**params, "head": self.source_head}, lora,
                        sets["source"][split], bs, self.mesh)
    return {"target_acc": _acc(*ct), "source_acc": _acc(*cs)}

  def released(self, state: dict) -> dict:
    """The model a user receives: LoRA merged, target head."""
    return lora_lib.merge(train.full_params(state), state["trainable"]["lora"],
                          self.net.lora_scale)

  def random_model(self) -> dict:
    return vit.init_params(self.net.model, jax.random.key(self.config.seed + 3),
                           (self.config.data.image_size,) * 2 + (self.config.data.channels,))


def prepare(config: ml_collections.ConfigDict, run_dir: str,
            mesh: jax.sharding.Mesh | None = None) -> Disposal:
  """Checks the config, loads (or pretrains) the source model and builds a `Disposal` on
  `mesh` (default: the mesh of config.mesh)."""
  method = dtl.check_method(config.method)
  if config.finetune not in FINETUNE:
    raise UserError(f"finetune={config.finetune!r} is not allowed; use one of {FINETUNE}")
  pl_models = tuple(config.pl.models)
  if not pl_models or set(pl_models) - set(PL_MODELS):
    raise UserError(f"pl.models={pl_models} is not allowed; name some of {PL_MODELS}")
  data, tcfg, dcfg = config.data, config.train, config.dispose
  mesh = mesh or sharding.make_mesh(config.mesh)
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
  samplers = (pipeline.EpochSampler(len(sets["target"][0]), tcfg.batch_size, config.seed),
              pipeline.EpochSampler(len(sets["source"][0]), dcfg.source_batch_size,
                                    config.seed + 7))
  steps = {k: tcfg.epochs[k] * samplers[0].steps_per_epoch for k in ("transfer", "dispose")}
  counts = (train.correct_counts(net, len(tgt_labels)),
            train.correct_counts(net_src, len(src_labels)))
  return Disposal(config, method, mesh, net, tgt_cfg, _with_classes(model_cfg, len(pl_labels)),
                  {"target": tgt_labels, "source": src_labels, "pl": pl_labels}, sets,
                  source_head, tx, state, state_sharding, steps, counts,
                  samplers)


def run(config: ml_collections.ConfigDict, run_dir: str) -> dict:
  workdir.check_config(run_dir, config)
  d = prepare(config, run_dir)
  path = os.path.join(run_dir, "results.json")
  results = workdir.read_json(path, {"evals": []})
  results.update(method=d.method, finetune=config.finetune,
                 examples={k: {"train": len(a), "test": len(b)} for k, (a, b) in d.sets.items()})

  def evaluate(state, when: str):
    row = {"after": when, **d.accuracies(state)}
    results["evals"] = [r for r in results["evals"] if r["after"] != when] + [row]
    workdir.write_json(path, results)
    say(table(results["evals"], ["after", "target_acc", "source_acc"]))

  def end_transfer(state):
    evaluate(state, "transfer")
    workdir.export_model(os.path.join(run_dir, "transferred"), d.released(state), d.tgt_cfg,
                         d.labels["target"].to_json())

  def end_dispose(state):
    evaluate(state, "dispose")
    scrubbed = d.released(state)
    workdir.export_model(os.path.join(run_dir, "model"), scrubbed, d.tgt_cfg,
                         d.labels["target"].to_json(), extra={"method": d.method})
    build = {"scrubbed": lambda: scrubbed,
             "unscrubbed": lambda: workdir.load_model(os.path.join(run_dir, "transferred"))[0],
             "random": d.random_model}
    attacks = pl_attackers(config, d.pl_cfg, d.mesh, d.sets["pl"])
    results["pl"] = pl_results(attacks, {m: build[m]() for m in config.pl.models})
    workdir.write_json(path, results)
    say(table([{"attack": a, **r} for a, r in results["pl"].items()],
              ["attack", *config.pl.models, "leakage"], "{:.3f}"))

  if not any(r["after"] == "pretrained" for r in results["evals"]):
    evaluate(d.state, "pretrained")
  compiled = lambda kind: sharding.compile_step(d.step(kind), d.mesh, d.state_sharding)
  stages = [loop.Stage("transfer", d.steps["transfer"], compiled("transfer"),
                       functools.partial(d.batches, with_source=False), end=end_transfer),
            loop.Stage("dispose", d.steps["dispose"], compiled("dispose"),
                       functools.partial(d.batches, with_source=d.method != "none"),
                       begin=lambda s: jax.device_put(
                           d.start_dispose(s, config.train.lr.dispose), d.state_sharding),
                       end=end_dispose)]
  ckpts = workdir.Checkpoints(os.path.join(run_dir, "checkpoints"),
                              config.checkpoint.every_steps, config.checkpoint.keep)
  loop.run(d.state, stages, ckpts, run_dir, config.log_every)
  return results


def _acc(correct, count) -> float:
  return metrics.set_accuracy(correct, count)


def pl_attackers(config, model_cfg, mesh, pl_sets) -> dict:
  """{attack variant: attack(params) -> PL accuracy %}, each compiled once (`dtl.pl_attacker`)."""
  pl = config.pl
  net = builders.network(config, model_cfg)
  return {variant: dtl.pl_attacker(net, *pl_sets, variant=variant, steps=pl[variant].steps,
                                   lr=pl[variant].lr, batch_size=pl.batch_size,
                                   weight_decay=pl.weight_decay,
                                   eval_batch_size=config.data.eval_batch_size, mesh=mesh,
                                   seed=config.seed + 11)
          for variant in pl.attacks}


def pl_results(attacks: dict, models: dict) -> dict:
  """{attack: {model name: PL accuracy %[, "leakage": score when all PL_MODELS ran]}}."""
  out = {}
  for variant, attack in attacks.items():
    acc = {name: attack(params) for name, params in models.items()}
    if set(PL_MODELS) <= set(acc):
      acc["leakage"] = dtl.leakage(acc["scrubbed"], acc["unscrubbed"], acc["random"])
    out[variant] = acc
  return out
