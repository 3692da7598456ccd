"""Building blocks for the files in configs/: argument parsing and shared sections.

A config file defines `get_config(arg)`; `arg` is the text after ':' in
`--config configs/file.py:key=value,flag`, parsed by `parse_arg`. `check` refuses numeric
fields out of range before a run starts.
"""
from __future__ import annotations

import importlib.util
import numbers
import os

import ml_collections

from kswap_jax.errors import UserError


# The standard 100-class ImageNet subset (ImageNet-100), as WordNet ids = imagenet2012 names.
IMAGENET100 = (
    "n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 "
    "n01773797 n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 "
    "n03530642 n04435653 n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 "
    "n04493381 n02109047 n04111531 n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 "
    "n01692333 n07714571 n02974003 n02114855 n03785016 n03764736 n03775546 n02087046 n07836838 "
    "n04099969 n04592741 n03891251 n02701002 n03379051 n02259212 n07715103 n03947888 n04026417 "
    "n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 n02483362 n04127249 n02089973 "
    "n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 n02113978 n03787032 "
    "n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 n03837869 "
    "n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 "
    "n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 "
    "n02090622").split()


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"runlocal,seed=3,classes=0-4,7" -> ConfigDict(runlocal=True, seed=3, classes="0-4,7").

  Items are separated by ','; `key=value` sets an argument (converted to the type of its
  default), a bare `key` sets a bool argument to True. An item without '=' that names no
  argument continues the value before it, so list values need no quoting: in
  `classes=0-4,7,runlocal`, `7` belongs to `classes` and `runlocal` is a flag.
  """
  out = ml_collections.ConfigDict(defaults)
  items: list[list[str]] = []  # [key, value] or [key] (a flag)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if not eq and key not in defaults and items and len(items[-1]) == 2:
      items[-1][1] += "," + item
    elif key not in defaults:
      raise UserError(f"unknown config argument {key!r}; allowed: {sorted(defaults)}")
    else:
      items.append([key, value] if eq else [key])
  for key, *value in items:
    kind = type(defaults[key])
    if not value:
      out[key] = True
    elif kind is bool:
      out[key] = value[0].lower() in ("1", "true", "yes")
    else:
      try:
        out[key] = kind(value[0])
      except ValueError:
        raise UserError(f"config argument {key}={value[0]!r} must be of type {kind.__name__}, "
                        f"like its default {defaults[key]!r}") from None
  return out


# Allowed values of numeric fields by name: (must be an int, range text, test). A rule of a node
# (`epochs`, `lr`, `weights`) covers every number under it; the outermost named node decides,
# so `weights.alpha` is a loss weight (>= 0) and `lora.alpha` a LoRA scale (> 0).
_INT_POSITIVE = (True, ">= 1", lambda x: x >= 1)
_INT_NONNEGATIVE = (True, ">= 0", lambda x: x >= 0)
_POSITIVE = (False, "> 0", lambda x: x > 0)
_NONNEGATIVE = (False, ">= 0", lambda x: x >= 0)
_RULES = {
    **dict.fromkeys(("max_objects", "decoder_depth", "pixel_dim"),
                    _INT_POSITIVE),
    **dict.fromkeys(("batch_size", "eval_batch_size", "source_batch_size", "image_size",
                     "channels", "rank", "num_splits", "steps", "num_tasks", "per_task", "keep",
                     "log_every", "eval_every_epochs", "epochs"), _INT_POSITIVE),
    **dict.fromkeys(("every_steps", "warmup_steps", "warmup_epochs", "per_class", "seed",
                     "order_seed", "prefetch"), _INT_NONNEGATIVE),
    **dict.fromkeys(("lr", "alpha", "scale"), _POSITIVE),
    **dict.fromkeys(("lr_end", "weight_decay", "weights"), _NONNEGATIVE),
    "ema_epoch": _INT_NONNEGATIVE,
    "affine": _NONNEGATIVE,
    **dict.fromkeys(("dropout", "ema_decay"), (False, "in [0, 1)", lambda x: 0 <= x < 1)),
    "fraction": (False, "in (0, 1]", lambda x: 0 < x <= 1),
}
_UNCHECKED = ("grid", "members")  # a sweep's value lists; each member config is checked alone


def check(config: ml_collections.ConfigDict) -> None:
  """Refuses a numeric field outside its range (`_RULES`): UserError naming field, value, range."""

  def walk(node: ml_collections.ConfigDict, prefix: str, rule: tuple | None) -> None:
    for key, value in node.items():
      if key in _UNCHECKED:
        continue
      path, field_rule = f"{prefix}{key}", rule or _RULES.get(key)
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f"{path}.", field_rule)
      elif field_rule:
        integer, allowed, ok = field_rule
        kind = numbers.Integral if integer else numbers.Real
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, kind) and not isinstance(v, bool) and ok(v) for v in values):
          every = "every entry " if values is value else ""
          raise UserError(f"config field {path}={value!r}: {every}must be "
                          f"{'an int' if integer else 'a number'} {allowed}")

  walk(config, "", None)


def load(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path` (a config built on another one)."""
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f"kswap_config_{name}", path)
  if spec is None or not os.path.exists(path):
    raise UserError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# How images are read (`builders.read_options`), the defaults of every data section: all
# images kept in memory, resized straight to image_size, training images not augmented.
READ_DEFAULTS = dict(cache_images=True, cache_budget_gb=4.0, resize=0, train_crop="none",
                     crop_min_area=0.08, crop_filter="antialias", flip=False, workers=0,
                     prefetch=0)


def digits_data(image_size: int = 8) -> ml_collections.ConfigDict:
  """The embedded handwritten digits (sklearn_digits), 8x8 grey images."""
  return ml_collections.ConfigDict(dict(
      dataset="sklearn_digits", train_split="train", test_split="test", data_dir="",
      image_size=image_size, channels=1, mean=0.5, std=0.5, eval_batch_size=512,
      image_key="image", label_key="label", **READ_DEFAULTS))


def scenes_data(task: str) -> ml_collections.ConfigDict:
  """The embedded digit scenes (`digit_scenes`, 32x32 grey) with the targets of `task`:
  boxes and classes (detection; at most 3 objects a scene) or the class mask (segmentation)."""
  d = digits_data(image_size=32)
  d.update(dataset="digit_scenes", eval_batch_size=128)
  if task == "detection":
    d.update(boxes_key="boxes", classes_key="classes", max_objects=3)
  else:  # ours: a random affine warp of the training scenes; without it the segmenter fits
    # its training scenes and reaches less on the test scenes (retain mIoU 61.7 against 82.3,
    # seed 0; experiments/results/pretrain_epochs_scenes.md)
    d.update(mask_key="mask", mask_zero="background",
             affine=dict(rotate=15.0, zoom=0.15, shear=0.15))
  return d


SCENES_SETS = {"retain": "0-5", "forget": "6,7", "learn": "8,9"}  # ours: the scenes' split


def scenes_swap(task: str, a: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A swap of digit scenes (`SCENES_SETS`) for a detector or segmenter that the config
  pretrains on the retain + forget classes (configs/pretrain_scenes.py); LoRA on the FFN
  layers of backbone and decoder (the authors' `--lora_pos FFN`). a: order, seed, runlocal."""
  from kswap_jax.models import dense  # pylint: disable=g-import-not-at-top
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  c = ml_collections.ConfigDict()
  c.seed, c.order = a.seed, a.order
  c.data = scenes_data(task)
  c.sets = ml_collections.ConfigDict({name: dict(
      dataset="digit_scenes", classes=classes, fraction=1.0, per_class=0, seed=1337)
      for name, classes in SCENES_SETS.items()})
  c.model = ml_collections.ConfigDict(dict(dropout=0.0, dtype="float32", attention="einsum"))
  c.init = ml_collections.ConfigDict(dict(checkpoint="", pretrain=load(
      os.path.join(here, "pretrain_scenes.py"),
      f"task={task},classes=0-7,seed={a.seed}" + (",runlocal" if a.runlocal else ""))))
  c.lora = lora(rank=8, alpha=1.0, a_init="small")
  c.lora.targets = dense.DENSE_FFN_TARGETS
  c.head = "train"            # the class head's columns train with the LoRA (ours)
  c.sparse_group = "block"
  # LBF's forget stage: detection joins L's images into R's loader as the authors do
  # (KnowledgeSwapping semantic-segmentation/swapping_fltf.py:707); segmentation replays L as
  # its own batch (ours, swap.LEARN_REPLAY). Segmentation's learn_replay, lr, learn and sparse
  # weights were chosen on validation by configs/sweep_swap_seg_scenes.py (seed 0, LBF;
  # experiments/results/sweep_swap_seg_scenes.md), then its learn stage's retain weight by
  # configs/sweep_swap_seg_retain.py (seeds 0-2, LBF, the best mean score;
  # experiments/results/sweep_swap_seg_retain.md), then the forget loss's bound by
  # configs/sweep_swap_seg_forget.py (seeds 0-2, LBF; experiments/results/sweep_swap_seg_forget.md):
  # all ours; the paper's Mask2Former swap bounds its own loss at 115 (Knowledge Swapping).
  seg = task == "segmentation"
  c.learn_replay = "paired" if seg else "joined"
  # A study ranks first the members whose val retain metric fell at most this many points below
  # the pretrained model's (the targets of the scenes swaps: retain within 5 points).
  c.select_retain_drop = 5.0
  # Ours: detection has the loss weights of configs/swap_digits.py; batch, lr and epochs sized
  # for the scenes on 2 CPU cores (the authors' DINO / Mask2Former schedules are for COCO /
  # ADE20K).
  c.weights = ml_collections.ConfigDict(dict(
      learn=0.5 if seg else 1.0, retain_in_learn=4.0 if seg else 1.0, retain=1.0, forget=0.2,
      bound=4.0 if seg else 15.0, sparse=0.0 if seg else 0.005))
  c.train = ml_collections.ConfigDict(dict(
      batch_size=32, lr=6e-3 if seg else 3e-3, lr_end=1e-5,
      weight_decay=0.05, epochs=ml_collections.ConfigDict(dict(learn=8, forget=4, swap=8))))
  if a.runlocal:
    c.train.epochs.update(learn=1, forget=1, swap=1)
    c.train.batch_size = 16
    c.data.eval_batch_size = 64
  return common(c, a.runlocal)


def scenes_study(task: str, a: ml_collections.ConfigDict, grid: dict,
                 pinned: dict | None = None) -> ml_collections.ConfigDict:
  """A validation study (`sweep`) of `scenes_swap(task, a)` over grid (config paths -> value
  tuples); pinned: base weights set to the values the study ran with, so that its results
  reproduce after a later study changes the config's defaults. Members' checkpoints are taken
  at the ends of stages only."""
  base = scenes_swap(task, a)
  base.weights.update(pinned or {})
  c = sweep("swap", base, grid, a.runlocal)
  c.checkpoint.every_steps = 0
  return c


def tfds_swap(task: str, a: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
              model: dict) -> ml_collections.ConfigDict:
  """`scenes_swap`'s recipe on a TFDS dataset: `data` (its keys), `model` (variant, decoder)
  for the pretraining on a.retain + a.forget; sets a.retain / a.forget / a.learn. Its loss
  weights and learn_replay are the scenes' (chosen on the digit scenes, not on this dataset)."""
  c = scenes_swap(task, a)
  c.data = data
  for name in SCENES_SETS:
    c.sets[name].update(dataset=data.dataset, classes=a[name])
  pre = c.init.pretrain
  pre.data = ml_collections.ConfigDict(data.to_dict())
  pre.data.update(classes=f"{a.retain},{a.forget}", fraction=1.0, per_class=0)
  pre.model.update(model)
  if not a.runlocal:  # ours: a ViT backbone's schedule, not the authors' DINO / Mask2Former
    pre.train.update(epochs=50, batch_size=64, lr=1e-4)
    c.train.update(batch_size=16, lr=1e-3)
  return c


# torchvision's ImageNet channel statistics (its ViT weights expect them): (mean, std).
TORCHVISION_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def imagenet_data(image_size: int = 224, stats=(0.5, 0.5)) -> ml_collections.ConfigDict:
  """RGB images resized to `image_size`, normalised with `stats` = (mean, std): numbers, or
  one value per channel (default mean = std = 0.5, the vision_transformer / big_vision models'
  [-1, 1] inputs). A set's images are kept in memory only if they fit in cache_budget_gb."""
  mean, std = stats
  return ml_collections.ConfigDict(dict(
      dataset="imagenet2012", train_split="train", test_split="validation", data_dir="",
      image_size=image_size, channels=3, mean=mean, std=std, eval_batch_size=256,
      image_key="image", label_key="label", **{**READ_DEFAULTS, "cache_images": "auto"}))


def lora(rank: int = 8, alpha: float = 1.0, a_init: str = "small") -> ml_collections.ConfigDict:
  """LoRA on both MLP Dense layers of every block (the papers' setting)."""
  return ml_collections.ConfigDict(dict(
      rank=rank, alpha=alpha, a_init=a_init,
      targets=r"Transformer/encoderblock_\d+/MlpBlock_0/Dense_[01]"))


# The GS-LoRA authors' scripts (bjzhb666/GS-LoRA), per setting, for GS-LoRA / GS-LoRA++:
#   faces:          scripts/run_cl_forget.sh, "GS-LoRA" (commented-out block above "GS-LoRA few shot")
#   faces, 4-shot:  scripts/run_cl_forget.sh, "GS-LoRA few shot" (the script's active command)
#   imagenet:       scripts/run_cl_forget_image.sh, "GS-LoRA"
# Values the scripts leave out are util/args.py defaults (named per value).
GS_LORA_SETTINGS = {
    "faces": dict(
        data_ratio=0.1,                  # --data_ratio default 0.1 (util/args.py)
        batch_size=48,                   # -b 48
        beta=[0.2, 0.25, 0.25, 0.2],     # --cl_beta_list 0.2 0.25 0.25 0.2
        w_f=[0.01, 0.01, 0.01, 0.01],    # --cl_prof_list 0.01 0.01 0.01 0.01
        proto_bound=18.0),               # --BND_pro default 18 (util/args.py)
    "faces_few_shot": dict(
        data_ratio=1.0,                  # unused: --few_shot keeps --few_shot_num per class
        batch_size=4,                    # -b 4
        beta=[0.3, 0.4, 0.28, 0.2],      # --cl_beta_list 0.3 0.4 0.28 0.2
        w_f=[0.015, 0.06, 0.025, 0.012],  # --cl_prof_list 0.015 0.06 0.025 0.012
        proto_bound=50.0),               # --BND_pro 50
    "imagenet": dict(
        data_ratio=0.05,                 # DATA_RATIO=0.05
        batch_size=48,                   # -b 48
        beta=[0.2, 0.25, 0.25, 0.25],    # --cl_beta_list 0.2 0.25 0.25 0.25
        w_f=0.05,                        # --pro_f_weight 0.05 (no --cl_prof_list)
        proto_bound=18.0),               # --BND_pro default 18 (util/args.py)
}


def gs_lora_paper(c: ml_collections.ConfigDict, a: ml_collections.ConfigDict, setting: str,
                  head: str = "linear", margin_at_eval: bool = False,
                  runlocal_variant: str = "Nano/16") -> None:
  """The GS-LoRA papers' continual-forgetting settings (`GS_LORA_SETTINGS[setting]`, a
  `-few_shot` variant when a.shots > 0): training subsets, LoRA, head, weights, schedule;
  shrunk for runlocal. `a` holds method, group, num_tasks, shots, ema, carry, runlocal.
  """
  from kswap_jax.methods import forget  # pylint: disable=g-import-not-at-top
  few_shot = f"{setting}_few_shot"
  v = GS_LORA_SETTINGS[few_shot if a.shots and few_shot in GS_LORA_SETTINGS else setting]
  # Both training sets are cut the same way (train_own_forget_cl.py, the few_shot / data_ratio
  # branch): int(data_ratio * n) images drawn from all n of the set, or k images per class.
  subset = lambda: ml_collections.ConfigDict(dict(  # noqa: E731
      fraction=v["data_ratio"], fraction_of="set", per_class=a.shots))
  c.sets = ml_collections.ConfigDict(dict(retain=subset(), forget=subset()))
  c.lora = lora(rank=8, alpha=1.0, a_init="small")  # --lora_rank 8
  c.lora.a_init_first = "kaiming"
  c.head = ml_collections.ConfigDict(dict(kind=head, scale=64.0, margin=0.35,
                                          margin_at_eval=margin_at_eval))
  c.group = a.group
  c.weights = ml_collections.ConfigDict(dict(
      beta=v["beta"],
      bound=105.0,                      # --BND 105
      alpha=1e-4,                       # --alpha 0.0001
      proto_bound=v["proto_bound"],
      w_f=v["w_f"],
      w_r=0.0))                         # --pro_r_weight default 0.0 (util/args.py)
  c.train = ml_collections.ConfigDict(dict(
      batch_size=v["batch_size"],
      epochs=100,                       # -e 100
      warmup_epochs=0,                  # no --warmup_alpha: alpha applies from the start
      lr=forget.get_method(a.method).lr,  # --lr 1e-2 (LoRA); 1e-4 for the baselines' scripts
      lr_end=1e-5,                      # --min-lr 1e-5, cosine (util/args.py --sched default)
      weight_decay=0.05,                # --weight-decay default 0.05, AdamW (util/args.py)
      ema_decay=0.9 if a.ema else 0.0,  # --average_weight --ema_decay 0.9
      ema_epoch=30))                    # --ema_epoch 30
  c.carry = a.carry
  c.select_best = True                  # ours: selection on validation H (module docstring)
  c.eval_every_epochs = 5               # ours (the authors evaluate every VER_FREQ batches)
  if a.runlocal:
    c.data.update(image_size=32, eval_batch_size=16)
    c.model.variant = runlocal_variant
    c.sets.retain.per_class = c.sets.forget.per_class = 1
    c.tasks.num_tasks = min(a.num_tasks, 2)
    c.train.update(batch_size=4, epochs=1, ema_epoch=0)
    c.eval_every_epochs = 1


GS_LORA_ARGS = dict(shots=0, ema=False, carry="chosen")  # every paper forget config's arguments


def sweep(method: str, base: ml_collections.ConfigDict, grid: dict,
          runlocal: bool) -> ml_collections.ConfigDict:
  """A `sweep` job config over `base`, a config of job `method` whose train split is held
  apart from a validation split `train[90%:]` (pretraining included), so the best member is
  chosen on validation. grid: config paths -> value tuples (their product is the members)."""
  base.data.update(train_split="train[:90%]", val_split="train[90%:]")
  if "pretrain" in base.init:
    base.init.pretrain.data.train_split = "train[:90%]"
  c = ml_collections.ConfigDict(dict(method=method, base=base,
                                     grid=ml_collections.ConfigDict(grid)))
  c.members = ()              # explicit members, e.g. ({"train.lr": 0.02},)
  c.members_per_chunk = 0     # 0: all members in one program; -1: as many as fit memory
  c = common(c, runlocal)
  c.mesh.sweep = 1            # devices the members are split over (the rest split the batch)
  return c


def common(config: ml_collections.ConfigDict, runlocal: bool,
           host_memory: str = "default") -> ml_collections.ConfigDict:
  """Mesh, checkpointing, logging and host-allocator fields every job has."""
  # data=-1: all devices data-parallel; fsdp > 1 shards params by `rules` (kswap_jax.sharding).
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=()))
  config.checkpoint = ml_collections.ConfigDict(dict(every_steps=200 if not runlocal else 2,
                                                     keep=2))
  config.log_every = 50 if not runlocal else 1
  config.log = ml_collections.ConfigDict(dict(wandb_project=""))  # "": no W&B run
  config.eval_mia = False     # membership inference on the forget set around each stage
  config.rng_impl = "threefry2x32"
  # "retained": glibc reuses freed host memory (faster XLA:CPU steps with large buffers).
  config.host_memory = host_memory
  return config
