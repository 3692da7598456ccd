"""Class selection, one label space, deterministic epochs and global `jax.Array` batches.

Images stay uint8 (B, H, W, C) up to the device; `normalize` runs inside the compiled step.
Every process loads only its slice of each global batch, so the same code serves one CPU
and a multi-host pod.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from kswap_jax.data.sources import Source
from kswap_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """The model's output classes: entry k is (dataset, class id in that dataset, name)."""
  entries: tuple[tuple[str, int, str], ...]

  def __len__(self) -> int:
    return len(self.entries)

  def index(self, dataset: str, class_id: int) -> int:
    for k, (d, c, _) in enumerate(self.entries):
      if d == dataset and c == class_id:
        return k
    raise UserError(f"class {class_id} of {dataset!r} is not among the model's "
                    f"{len(self.entries)} classes; pick classes the model knows")

  def extend(self, dataset: str, class_ids: Sequence[int], names: Sequence[str]) -> LabelSpace:
    new = [(dataset, int(c), names[c]) for c in class_ids]
    clash = [e for e in new if (e[0], e[1]) in {(d, c) for d, c, _ in self.entries}]
    if clash:
      raise UserError(f"learn classes {[e[2] for e in clash]} are already known to the model")
    return LabelSpace(self.entries + tuple(new))

  def to_json(self) -> list[list]:
    return [list(e) for e in self.entries]

  @classmethod
  def from_json(cls, rows) -> LabelSpace:
    return cls(tuple((str(d), int(c), str(n)) for d, c, n in rows))


def resize(image: np.ndarray, size: int, channels: int) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (size, size, channels), bilinear; grey <-> RGB as needed."""
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] != channels:
    if image.shape[-1] == 1:
      image = np.repeat(image, channels, -1)
    elif channels == 1:
      image = np.asarray(Image.fromarray(image[..., :3]).convert("L"))[..., None]
    else:
      raise UserError(f"cannot turn {image.shape[-1]}-channel images into {channels} channels")
  if image.shape[:2] != (size, size):
    if channels == 1:
      image = np.asarray(Image.fromarray(image[..., 0]).resize((size, size),
                                                               Image.BILINEAR))[..., None]
    else:
      image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
  return image.astype(np.uint8)


def normalize(images: jax.Array, mean: float = 0.5, std: float = 0.5) -> jax.Array:
  """uint8 images -> float32 ((x / 255) - mean) / std, same shape."""
  return (images.astype(jnp.float32) / 255.0 - mean) / std


class ExampleSet:
  """Chosen examples of one source with labels in the model's label space.

  `images(positions)` loads and resizes the images at those positions (uint8); with `cache`
  each image is decoded once and kept in host memory, (N, H, W, C) bytes in all.
  """

  def __init__(self, source: Source, indices: np.ndarray, labels: np.ndarray, image_size: int,
               channels: int, name: str = "", cache: bool = True):
    if len(indices) == 0:
      raise UserError(f"set {name or source.name!r} is empty: its classes have no examples "
                      f"in split {source.split!r} of {source.name!r}")
    self.source, self.indices, self.labels = source, indices, labels.astype(np.int32)
    self.shape = (image_size, image_size, channels)
    self.name, self.cache = name, cache
    self._cache = np.zeros((len(indices), *self.shape), np.uint8) if cache else None
    self._loaded = np.zeros(len(indices), bool)

  def __len__(self) -> int:
    return len(self.indices)

  def _load(self, p: int) -> np.ndarray:
    return resize(self.source.image(self.indices[p]), self.shape[0], self.shape[2])

  def images(self, positions: np.ndarray) -> np.ndarray:
    if not self.cache:
      return np.stack([self._load(p) for p in positions])
    todo = np.unique(positions[~self._loaded[positions]])
    for p in todo:
      self._cache[p] = self._load(p)
    self._loaded[todo] = True
    return self._cache[positions]

  def classes(self) -> np.ndarray:
    return np.unique(self.labels)


def select(source: Source, class_ids: Sequence[int], new_labels: Sequence[int], *,
           image_size: int, channels: int, fraction: float = 1.0, per_class: int = 0,
           seed: int = 0, name: str = "", cache: bool = True) -> ExampleSet:
  """Examples of `class_ids`, relabelled to `new_labels`; optionally a seeded subset.

  fraction: keep round(fraction * n_c) (at least 1) examples of each class c.
  per_class: if > 0, keep k examples of each class instead (k-shot).
  cache: keep decoded images in host memory (`ExampleSet`).
  """
  if not 0 < fraction <= 1:
    raise UserError(f"{name}: fraction={fraction} must be in (0, 1]")
  rng = np.random.default_rng(seed)
  keep, labels = [], []
  for c, y in zip(class_ids, new_labels):
    idx = np.flatnonzero(source.labels == c)
    n = per_class if per_class > 0 else max(1, round(fraction * len(idx)))
    idx = np.sort(rng.permutation(idx)[:n]) if n < len(idx) else idx
    keep.append(idx)
    labels.append(np.full(len(idx), y))
  return ExampleSet(source, np.concatenate(keep), np.concatenate(labels), image_size, channels,
                    name, cache)


def concat(a: ExampleSet, b: ExampleSet, name: str = "") -> ExampleSet:
  """Union of two sets (R' = R + L): a set that reads its images through the two parts, so
  images are cached (or not) once, in the part they belong to."""
  if a.shape != b.shape:
    raise ValueError(f"cannot join sets of image shapes {a.shape} and {b.shape}")
  na = len(a)

  def image(i):
    part, p = (a, i) if i < na else (b, i - na)
    return part.images(np.array([p]))[0]

  src = Source(f"{a.source.name}+{b.source.name}", a.source.split, np.zeros(0, np.int64), [],
               image)
  return ExampleSet(src, np.arange(na + len(b)), np.concatenate([a.labels, b.labels]),
                    a.shape[0], a.shape[2], name, cache=False)


@dataclasses.dataclass(frozen=True)
class EpochSampler:
  """Batch positions for any global step: a fresh seeded permutation each epoch.

  Step s belongs to epoch s // steps_per_epoch; the positions depend only on (seed, s), so a
  resumed run sees exactly the batches an uninterrupted one would.
  """
  size: int
  batch_size: int
  seed: int

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.size // self.batch_size)

  def positions(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.steps_per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(self.size)
    if self.size < self.batch_size:  # small set: repeat it to fill the batch
      perm = np.resize(perm, self.batch_size)
    return perm[i * self.batch_size:(i + 1) * self.batch_size]


def _local(x: np.ndarray) -> np.ndarray:
  """This process's contiguous slice of a global batch (B, ...) -> (B / P, ...)."""
  p, n = jax.process_index(), jax.process_count()
  if len(x) % n:
    raise UserError(f"batch size {len(x)} is not divisible by the {n} processes")
  k = len(x) // n
  return x[p * k:(p + 1) * k]


def to_global(arrays: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
              global_size: int) -> dict[str, jax.Array]:
  """Process-local (B / P, ...) numpy arrays -> global (B, ...) arrays with `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, v, (global_size, *v.shape[1:]))
          for k, v in arrays.items()}


def batch(examples: ExampleSet, positions: np.ndarray,
          sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Global batch {"images": uint8 (B, H, W, C), "labels": int32 (B,)} at `positions`."""
  local = _local(positions)
  return to_global({"images": examples.images(local), "labels": examples.labels[local]},
                   sharding, len(positions))


def eval_batches(examples: ExampleSet, batch_size: int,
                 sharding: jax.sharding.Sharding) -> Iterator[dict[str, jax.Array]]:
  """Every example once, in order; the last batch is padded and has mask 0 on padding."""
  n = len(examples)
  for start in range(0, n, batch_size):
    pos = np.arange(start, start + batch_size)
    mask = pos < n
    pos = np.where(mask, pos, 0)
    local = _local(pos)
    yield to_global({"images": examples.images(local), "labels": examples.labels[local],
                     "mask": _local(mask)}, sharding, batch_size)
