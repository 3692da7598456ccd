"""Turns config sections into data sets, networks and the model a run starts from."""
from __future__ import annotations

import functools

import jax
import ml_collections

from kswap_jax import checkpoints, npz, train
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


def check_sets(config: ml_collections.ConfigDict) -> None:
  """Opens every class set a run config names (data, sets.*, target, source, pl.data, init,
  and its init.pretrain's): a bad dataset, split or class is refused before any training."""
  data = config.get("data")
  if data is None:
    return

  def visit(node, path: str):
    if "dataset" in node and "classes" in node:
      for which in ("train", "test"):
        split = node.get(f"{which}_split") or data[f"{which}_split"]
        names = source(data, node.dataset, split).class_names
        if which == "train":
          sources.parse_classes(node.classes, names, f"{path}classes")
    for key, child in node.items():
      if isinstance(child, ml_collections.ConfigDict) and key != "pretrain":
        visit(child, f"{path}{key}.")

  visit(config, "")
  if "init" in config and "pretrain" in config.init:
    check_sets(config.init.pretrain)


def network(config: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict,
            ) -> train.Network:
  lora = config.get("lora")
  scale = lora.alpha / lora.rank if lora else 1.0
  return train.Network(vit.make_model(model_cfg), lora_scale=scale, mean=config.data.mean,
                       std=config.data.std, rng_impl=config.get("rng_impl", "threefry2x32"))


def initial_model(config: ml_collections.ConfigDict, checkpoint: str,
                  ) -> tuple[dict, ml_collections.ConfigDict, pipeline.LabelSpace]:
  """(params, model config, label space) of the model a run starts from.

  checkpoint: an exported model (a workdir or its model/ folder), or a pretrained `.npz`, whose
  head's classes `config.init.dataset` / `config.init.classes` name.
  """
  if not checkpoint:
    raise UserError("init.checkpoint is empty and there is no init.pretrain config; give an "
                    "exported model directory or a .npz file")
  if checkpoint.endswith(".npz"):
    # The head's classes and the model: init.dataset / init.classes and config.model, else
    # what the config would pretrain (init.pretrain), whose model config.model overrides.
    init, pre = config.init, config.init.get("pretrain", ml_collections.ConfigDict())
    named = init if "dataset" in init else pre.get("data")
    if named is None:
      raise UserError("a .npz init.checkpoint needs init.dataset and init.classes, the classes "
                      "of its head")
    model_cfg = ml_collections.ConfigDict({"gelu": npz.GELU, **pre.get("model", {}),
                                           **config.model})
    labels = label_space(config.data, named.dataset, named.classes, "init.classes")
    model_cfg.num_classes = len(labels)
    model = vit.make_model(model_cfg)
    init = vit.init_params(model, jax.random.key(config.seed),
                           (config.data.image_size, config.data.image_size, config.data.channels))
    return npz.load_pretrained(checkpoint, init), model_cfg, labels
  params, meta = checkpoints.load_model(checkpoint)
  model_cfg = ml_collections.ConfigDict(meta["model"])
  for k in ("dropout", "dtype", "attention"):  # run-time choices of this job, not the checkpoint's
    if k in config.get("model", {}):
      model_cfg[k] = config.model[k]
  return params, model_cfg, pipeline.LabelSpace.from_json(meta["classes"])
