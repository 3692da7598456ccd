"""Detection and segmentation examples: a class set's images with its objects or its pixels.

A `DenseSet` is a `pipeline.ExampleSet` (images chosen by their image-level label, as for
classification: `digit_scenes`' scene class, or a detection dataset's most frequent object
class, `sources.open_source`) plus the targets of the set's classes in the model's label
space (ours: objects and pixels of other classes are dropped from a set's targets, pixels
ignored). Targets of a batch of k images:

  detection     classes int32 (k, T), -1 past the last object; boxes float32 (k, T, 4),
                (cx, cy, w, h) in [0, 1]; T = data.max_objects (more objects are cut)
  segmentation  masks int32 (k, H, W): a label-space class, BACKGROUND or IGNORE

Training batches of a segmentation set may be warped by a random affine map (`data.affine`:
rotate in degrees, zoom and shear as fractions; ours, off unless a config sets it), image and mask
alike, seeded by the sampler's (seed, step) key, so a resumed run sees the same batches.
Detection takes no affine augmentation (its boxes would not stay tight).

Records are read through `builder.as_data_source`; feature paths ("objects/bbox") are set in
the data section: boxes_key, classes_key (boxes (n, 4) as TFDS BBoxes (ymin, xmin, ymax, xmax)
in [0, 1], classes (n,) dataset class ids, -1 ignored) or mask_key (values 0 = background, or
ignored with data.mask_zero="ignore"; v > 0 is class v - 1).
"""
from __future__ import annotations

from typing import Callable

import jax
import ml_collections
import numpy as np
from PIL import Image
from scipy import ndimage

from kswap_jax.data import pipeline, sources
from kswap_jax.errors import UserError

BACKGROUND, IGNORE = -1, -2
MASK_ZERO = ("background", "ignore")
AFFINE = ("rotate", "zoom", "shear")  # data.affine's fields: degrees, fractions of 1


def _get(record: dict, path: str) -> np.ndarray:
  value = sources.nested(record, path)
  if value is None:
    raise UserError(f"the records have no feature {path!r} (found {sorted(record)}); set "
                    "data.boxes_key / classes_key / mask_key")
  return np.asarray(value)


class DenseSet:
  """Images (`examples`) of one class set with their targets (module docstring).

  targets(positions (k,)) -> dict of numpy arrays; `concat` joins two sets (R' = R + L).
  """

  def __init__(self, examples: pipeline.ExampleSet, targets: Callable[[np.ndarray], dict],
               affine: tuple[float, float, float] | None = None):
    self.examples, self._targets, self.name = examples, targets, examples.name
    self.affine = affine  # (rotate, zoom, shear) of training batches, None: no warp

  def __len__(self) -> int:
    return len(self.examples)

  def targets(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    return self._targets(np.asarray(positions))

  def classes(self) -> np.ndarray:
    return self.examples.classes()


def example_set(task: str, data: ml_collections.ConfigDict, examples: pipeline.ExampleSet,
                class_ids: list[int], new_ids: list[int]) -> DenseSet:
  """The targets of `examples` (a `pipeline.select` of `class_ids`, labels `new_ids`)."""
  _, ds = sources.data_source(examples.source.name, examples.source.split,
                              data.get("data_dir") or None)
  mapping = dict(zip(class_ids, new_ids))
  cache: dict[int, dict] = {}
  if task == "detection":
    t, read = data.max_objects, _objects
  else:
    if data.get("mask_zero", "background") not in MASK_ZERO:
      raise UserError(f"data.mask_zero={data.mask_zero!r} is not allowed; use one of "
                      f"{MASK_ZERO}")
    t, read = data.image_size, _mask

  def one(p: int) -> dict:
    if p not in cache:
      cache[p] = read(ds[int(examples.indices[p])], data, mapping, t)
    return cache[p]

  def targets(positions):
    items = [one(int(p)) for p in positions]
    return {k: np.stack([it[k] for it in items]) for k in items[0]}

  return DenseSet(examples, targets, affine_of(task, data))


def affine_of(task: str, data: ml_collections.ConfigDict) -> tuple[float, float, float] | None:
  """data.affine as (rotate, zoom, shear), None when absent or all zero."""
  cfg = data.get("affine")
  if cfg is None:
    return None
  unknown = sorted(set(cfg) - set(AFFINE))
  if unknown:
    raise UserError(f"data.affine has unknown fields {unknown}; use {list(AFFINE)}")
  values = tuple(float(cfg.get(k, 0.0)) for k in AFFINE)  # each >= 0 (config_lib.check)
  if values[1] >= 1 or values[2] >= 1:
    raise UserError(f"data.affine={dict(zip(AFFINE, values))} is not allowed; use "
                    "0 <= zoom, shear < 1")
  if not any(values):
    return None
  if task == "detection":
    raise UserError("data.affine warps masks, not boxes: set data.affine.rotate, zoom and "
                    "shear to 0 for detection")
  return values


def random_affine(rng: np.random.Generator, side: int, rotate: float, zoom: float,
                  shear: float) -> tuple[np.ndarray, np.ndarray]:
  """(matrix (2, 2), offset (2,)) mapping output pixels to input pixels of a side x side image:
  about its centre, a rotation uniform in +-rotate degrees, a zoom 1 + U(+-zoom) and a shear
  U(+-shear), in that order of draws."""
  a = np.deg2rad(rng.uniform(-rotate, rotate))
  factor = 1.0 + rng.uniform(-zoom, zoom)
  s = rng.uniform(-shear, shear)
  matrix = (np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            @ np.array([[1.0, s], [0.0, 1.0]]) / factor)
  centre = np.full(2, (side - 1) / 2)
  return matrix, centre - matrix @ centre


def warp(image: np.ndarray, mask: np.ndarray, matrix: np.ndarray, offset: np.ndarray):
  """image uint8 (H, W, C) and mask int (H, W) through `random_affine`'s map: the image
  bilinear, the mask nearest; pixels from outside the image are 0 and BACKGROUND."""
  out = np.stack([ndimage.affine_transform(image[..., c].astype(np.float32), matrix, offset,
                                           order=1) for c in range(image.shape[-1])], -1)
  return (np.clip(np.rint(out), 0, 255).astype(image.dtype),
          ndimage.affine_transform(mask, matrix, offset, order=0, cval=BACKGROUND))


def _objects(record: dict, data, mapping: dict[int, int], t: int) -> dict:
  """A record's objects of the mapped classes: classes (t,), boxes (t, 4) cxcywh."""
  boxes = _get(record, data.boxes_key).reshape(-1, 4).astype(np.float32)
  ids = _get(record, data.classes_key).reshape(-1)[:len(boxes)]
  keep = [i for i, c in enumerate(ids) if int(c) in mapping][:t]
  classes = np.full(t, -1, np.int32)
  out = np.zeros((t, 4), np.float32)
  for j, i in enumerate(keep):
    y0, x0, y1, x1 = boxes[i]
    classes[j] = mapping[int(ids[i])]
    out[j] = ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0)
  return {"classes": classes, "boxes": out}


def _mask(record: dict, data, mapping: dict[int, int], size: int) -> dict:
  """A record's mask (size, size): mapped classes, BACKGROUND and IGNORE (module docstring)."""
  m = _get(record, data.mask_key)
  m = m[..., 0] if m.ndim == 3 else m
  if m.shape != (size, size):
    m = np.asarray(Image.fromarray(m.astype(np.uint8)).resize((size, size), Image.NEAREST))
  lut = np.full(256, IGNORE, np.int32)
  lut[0] = BACKGROUND if data.get("mask_zero", "background") == "background" else IGNORE
  for c, k in mapping.items():
    lut[c + 1] = k
  return {"masks": lut[m.astype(np.int64)]}


def concat(a: DenseSet, b: DenseSet, name: str = "") -> DenseSet:
  """The examples of a, then those of b, with their targets (and a's affine: both sets come
  from one data section)."""
  n = len(a)

  def targets(positions):
    first, second = positions[positions < n], positions[positions >= n] - n
    parts = [s.targets(p) for s, p in ((a, first), (b, second)) if len(p)]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(np.concatenate([np.flatnonzero(positions < n),
                                       np.flatnonzero(positions >= n)]), kind="stable")
    return {k: v[order] for k, v in merged.items()}

  return DenseSet(pipeline.concat(a.examples, b.examples, name), targets, a.affine)


def batch(examples: DenseSet, positions: np.ndarray, sharding: jax.sharding.Sharding,
          ) -> dict[str, jax.Array]:
  """`pipeline.batch` of the images and labels, with the targets at `positions`; a
  sampler's positions (`pipeline.Positions`) of a set with `affine` are warped, each image by
  its own draw (`pipeline.example_rngs`)."""
  local = pipeline._local(np.asarray(positions))  # pylint: disable=protected-access
  targets = examples.targets(local)
  key = getattr(positions, "key", None)
  if key is None or examples.affine is None:
    return {**pipeline.batch(examples.examples, positions, sharding),
            **pipeline.to_global(targets, sharding, len(positions))}
  slots = pipeline._local(np.arange(len(positions)))  # pylint: disable=protected-access
  images, masks = examples.examples.images(local), targets["masks"]  # fresh arrays
  for j, rng in enumerate(pipeline.example_rngs(key, slots, local)):
    images[j], masks[j] = warp(images[j], masks[j],
                               *random_affine(rng, images.shape[1], *examples.affine))
  return pipeline.to_global({"images": images, "labels": examples.examples.labels[local],
                             "masks": masks}, sharding, len(positions))
