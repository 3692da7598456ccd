"""Turns config sections into data sets, networks and initial models."""
from __future__ import annotations

import functools
import os

import jax
import ml_collections

from kswap_jax import checkpoints, train, workdir
from kswap_jax.data import pipeline, sources
from kswap_jax.errors import UserError
from kswap_jax.models import vit


@functools.lru_cache(maxsize=32)
def _source(name: str, split: str, data_dir: str, image_key: str, label_key: str):
  return sources.open_source(name, split, data_dir, image_key, label_key)


def source_cache_clear() -> None:
  """Forgets the sources opened so far (they are read once per process)."""
  _source.cache_clear()


def source(data: ml_collections.ConfigDict, dataset: str, split: str) -> sources.Source:
  """The split of a dataset, read once per process (labels are scanned on first use)."""
  return _source(dataset, split, data.get("data_dir") or sources.default_data_dir(),
                 data.get("image_key", "image"), data.get("label_key", "label"))


def example_set(data: ml_collections.ConfigDict, spec: ml_collections.ConfigDict, split: str,
                labels: pipeline.LabelSpace, name: str, subset: bool) -> pipeline.ExampleSet:
  """Examples of the classes named by `spec` (dataset, classes[, fraction, per_class, seed]).

  subset: apply spec.fraction / spec.per_class (training sets); evaluation sets use all.
  """
  src = source(data, spec.dataset, split)
  ids = sources.parse_classes(spec.classes, src.class_names, f"{name}.classes")
  new = [labels.index(spec.dataset, c) for c in ids]
  return pipeline.select(
      src, ids, new, image_size=data.image_size, channels=data.channels,
      fraction=spec.get("fraction", 1.0) if subset else 1.0,
      per_class=spec.get("per_class", 0) if subset else 0, seed=spec.get("seed", 0),
      name=name, cache=data.get("cache_images", True))


def split_of(data: ml_collections.ConfigDict, spec: ml_collections.ConfigDict,
             which: str) -> str:
  """spec.<which>_split if the set names one (e.g. "train[80%:]"), else data.<which>_split."""
  return spec.get(f"{which}_split") or data[f"{which}_split"]


def label_space(data: ml_collections.ConfigDict, dataset: str, classes,
                what: str) -> pipeline.LabelSpace:
  src = source(data, dataset, data.train_split)
  ids = sources.parse_classes(classes, src.class_names, what)
  return pipeline.LabelSpace(tuple((dataset, c, src.class_names[c]) for c in ids))


def network(config: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict,
            ) -> train.Network:
  lora = config.get("lora")
  scale = lora.alpha / lora.rank if lora else 1.0
  return train.Network(vit.make_model(model_cfg), lora_scale=scale, mean=config.data.mean,
                       std=config.data.std, rng_impl=config.get("rng_impl", "threefry2x32"))


def initial_model(config: ml_collections.ConfigDict, run_dir: str,
                  ) -> tuple[dict, ml_collections.ConfigDict, pipeline.LabelSpace]:
  """(params, model config, label space) named by config.init.

  init.checkpoint: an exported model (a pretrain workdir or its model/ folder), or empty to
  run the pretrain job of `init.pretrain` in `run_dir/pretrain` first (reused when done).
  """
  ckpt = config.init.get("checkpoint", "")
  if not ckpt:
    if "pretrain" not in config.init:
      raise UserError("init.checkpoint is empty and there is no init.pretrain config; give an "
                      "exported model directory")
    from kswap_jax.jobs import pretrain  # pylint: disable=g-import-not-at-top
    ckpt = os.path.join(run_dir, "pretrain")
    if not os.path.exists(os.path.join(ckpt, "model", "model.json")):
      pretrain.run(config.init.pretrain, ckpt)
  if ckpt.endswith(".npz"):
    model_cfg = ml_collections.ConfigDict(config.model)
    labels = label_space(config.data, config.init.dataset, config.init.classes, "init.classes")
    model_cfg.num_classes = len(labels)
    model = vit.make_model(model_cfg)
    init = vit.init_params(model, jax.random.key(config.seed),
                           (config.data.image_size, config.data.image_size, config.data.channels))
    return checkpoints.load_pretrained(ckpt, init), model_cfg, labels
  params, meta = workdir.load_model(ckpt)
  model_cfg = ml_collections.ConfigDict(meta["model"])
  for k in ("dropout", "dtype", "attention"):  # run-time choices of this job, not the checkpoint's
    if k in config.get("model", {}):
      model_cfg[k] = config.model[k]
  return params, model_cfg, pipeline.LabelSpace.from_json(meta["classes"])
