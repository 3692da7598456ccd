"""Turns config sections into data sets, networks and the model a run starts from."""
from __future__ import annotations

import functools

import jax
import ml_collections

from kswap_jax import checkpoints, config_lib, npz, torch_import, train
from kswap_jax.data import pipeline, sources
from kswap_jax.errors import UserError
from kswap_jax.models import dense as dense_models
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
  """Examples of the classes named by `spec` (dataset, classes[, fraction, fraction_of,
  per_class, seed]; `pipeline.select`), read as `data` says (`read_options`).

  subset: apply spec.fraction / spec.per_class (training sets); evaluation sets use all.
  """
  src = source(data, spec.dataset, split)
  ids = sources.parse_classes(spec.classes, src.class_names, f"{name}.classes")
  new = [labels.index(spec.dataset, c) for c in ids]
  return pipeline.select(
      src, ids, new, image_size=data.image_size, channels=data.channels,
      fraction=spec.get("fraction", 1.0) if subset else 1.0,
      per_class=spec.get("per_class", 0) if subset else 0,
      fraction_of=spec.get("fraction_of", "class"), seed=spec.get("seed", 0),
      name=name, **read_options(data))


def read_options(data: ml_collections.ConfigDict) -> dict:
  """`pipeline.select` options from data.cache_images (True, False or "auto": cache a set
  whose images fit in data.cache_budget_gb), data.resize, data.train_crop,
  data.crop_min_area, data.crop_filter, data.flip and data.workers (`config_lib.READ_DEFAULTS`
  where unset)."""
  d = {k: data.get(k, v) for k, v in config_lib.READ_DEFAULTS.items()}
  cache = str(d["cache_images"]).lower()
  if cache not in ("true", "false", "auto"):
    raise UserError(f"data.cache_images={d['cache_images']!r}: use True, False or 'auto'")
  if d["resize"] < 0 or d["workers"] < 0 or d["cache_budget_gb"] < 0:
    raise UserError("data.resize, data.workers and data.cache_budget_gb must be >= 0 (got "
                    f"{d['resize']}, {d['workers']}, {d['cache_budget_gb']})")
  return dict(cache=int(d["cache_budget_gb"] * 2**30) if cache == "auto" else cache == "true",
              resize=d["resize"],
              augment=pipeline.Augment(d["train_crop"], d["crop_min_area"], d["flip"],
                                       d["crop_filter"]),
              workers=d["workers"])


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
  and its init.pretrain's): a bad dataset, split, class or reading option is refused before
  any training."""
  data = config.get("data")
  if data is None:
    return
  read_options(data)

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
  stat = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 (hashable)
  model = (dense_models.make_model(model_cfg) if model_cfg.get("task")
           else vit.make_model(model_cfg))
  return train.Network(model, lora_scale=scale, mean=stat(config.data.mean),
                       std=stat(config.data.std), rng_impl=config.get("rng_impl", "threefry2x32"))


def is_pretrained_file(checkpoint: str) -> bool:
  """Whether init.checkpoint names a pretrained file (`.npz`, `.pth`, `.pt`, `.safetensors`)."""
  return checkpoint.endswith((".npz", *torch_import.SUFFIXES))


def pretrained_defaults(checkpoint: str) -> dict:
  """The model settings a pretrained file's models were trained with (config.model overrides):
  the tanh GELU for `.npz`, the torch layouts' `torch_import.MODEL_DEFAULTS`, else none."""
  if checkpoint.endswith(".npz"):
    return {"gelu": npz.GELU}
  return torch_import.model_defaults(checkpoint) if is_pretrained_file(checkpoint) else {}


def load_pretrained(checkpoint: str, init_params, dont_load=(), *, head_rows=(),
                    head_total: int = 0):
  """`npz.load_pretrained` or `torch_import.load_pretrained`, by the file's suffix."""
  if not is_pretrained_file(checkpoint):
    raise UserError(f"pretrained checkpoint {checkpoint!r} is not a .npz, .pth, .pt or "
                    ".safetensors file; give one of those")
  load = npz.load_pretrained if checkpoint.endswith(".npz") else torch_import.load_pretrained
  return load(checkpoint, init_params, dont_load, head_rows=head_rows, head_total=head_total)


def initial_model(config: ml_collections.ConfigDict, checkpoint: str,
                  ) -> tuple[dict, ml_collections.ConfigDict, pipeline.LabelSpace]:
  """(params, model config, label space) of the model a run starts from.

  checkpoint: an exported model (a workdir or its model/ folder), or a pretrained `.npz`,
  `.pth` / `.pt` or `.safetensors` file, whose head's classes `config.init.dataset` /
  `config.init.classes` name. A file's head over all classes of `init.dataset` (e.g. 1000
  ImageNet outputs) keeps the rows of the chosen classes, in label-space order: the file's
  head rows must then follow the dataset's label ids. They do for torchvision's IMAGENET1K
  weights and TFDS imagenet2012, which both order the classes by sorted WordNet id.
  """
  if not checkpoint:
    raise UserError("init.checkpoint is empty and there is no init.pretrain config; give an "
                    "exported model directory or a .npz / .pth / .safetensors file")
  if is_pretrained_file(checkpoint):
    # The head's classes and the model: init.dataset / init.classes and config.model, else
    # what the config would pretrain (init.pretrain), whose model config.model overrides.
    init, pre = config.init, config.init.get("pretrain", ml_collections.ConfigDict())
    named = init if "dataset" in init else pre.get("data")
    if named is None:
      raise UserError("a pretrained init.checkpoint file needs init.dataset and init.classes, "
                      "the classes of its head")
    model_cfg = ml_collections.ConfigDict({**pretrained_defaults(checkpoint),
                                           **pre.get("model", {}), **config.model})
    labels = label_space(config.data, named.dataset, named.classes, "init.classes")
    model_cfg.num_classes = len(labels)
    model = vit.make_model(model_cfg)
    init = vit.init_params(model, jax.random.key(config.seed),
                           (config.data.image_size, config.data.image_size, config.data.channels))
    total = len(source(config.data, named.dataset, config.data.train_split).class_names)
    params = load_pretrained(checkpoint, init, head_rows=[c for _, c, _ in labels.entries],
                             head_total=total)
    return params, model_cfg, labels
  params, meta = checkpoints.load_model(checkpoint)
  model_cfg = ml_collections.ConfigDict(meta["model"])
  for k in ("dropout", "dtype", "attention"):  # run-time choices of this job, not the checkpoint's
    if k in config.get("model", {}):
      model_cfg[k] = config.model[k]
  return params, model_cfg, pipeline.LabelSpace.from_json(meta["classes"])
