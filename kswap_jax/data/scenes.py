"""`digit_scenes`: scikit-learn's 8x8 digits placed on 32x32 canvases, with boxes and masks.

A TFDS dataset built from the bundled digits (no download, no TensorFlow), for the detection
and segmentation swaps. Scene i of a split starts from digit i of `sklearn_digits`' split of
the same name (the same stratified 1,437 / 360 split) and adds up to two more digits of the
same class from that split (ours: one class per scene, so the retain / forget / learn sets
split the scenes as they split the images of the classification swap). Each digit is resized
to a random size in [MIN_SIZE, MAX_SIZE] and put where it overlaps no earlier one.

Features: image uint8 (32, 32, 1); label, the scene's class; boxes float32 (3, 4), each
(ymin, xmin, ymax, xmax) in [0, 1] (TFDS' BBox convention), the tight box of the digit's mask
pixels, zeros past the last object; classes int64 (3,), -1 past the last object; mask uint8
(32, 32): 0 background, c + 1 on the pixels (resized intensity >= MASK_LEVEL) of a digit of
class c.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from kswap_jax.data import digits

NAME = "digit_scenes"
SIZE = 32          # canvas side
MAX_OBJECTS = 3
MIN_SIZE, MAX_SIZE = 10, 16  # a digit's side on the canvas
MASK_LEVEL = 96    # resized intensity (0..255) from which a pixel belongs to its digit


def scene(rng: np.random.Generator, glyphs: list[np.ndarray], label: int):
  """(image (S, S, 1), boxes (MAX_OBJECTS, 4), classes (MAX_OBJECTS,), mask (S, S)) of the
  8x8 uint8 `glyphs` (1..MAX_OBJECTS) of class `label`, placed without overlap."""
  image = np.zeros((SIZE, SIZE), np.uint8)
  mask = np.zeros((SIZE, SIZE), np.uint8)
  boxes = np.zeros((MAX_OBJECTS, 4), np.float32)
  classes = np.full(MAX_OBJECTS, -1, np.int64)
  taken: list[tuple[int, int, int]] = []  # (top, left, side) of placed digits
  n = 0
  for glyph in glyphs:
    side = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    for _ in range(50):
      top, left = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
      if all(top >= t + s or t >= top + side or left >= l + s or l >= left + side
             for t, l, s in taken):
        break
    else:
      continue
    big = np.asarray(Image.fromarray(glyph).resize((side, side), Image.BILINEAR))
    on = big >= MASK_LEVEL
    if not on.any():
      continue
    image[top:top + side, left:left + side] = np.maximum(image[top:top + side,
                                                               left:left + side], big)
    mask[top:top + side, left:left + side][on] = label + 1
    rows, cols = np.flatnonzero(on.any(1)), np.flatnonzero(on.any(0))
    boxes[n] = np.array([top + rows[0], left + cols[0], top + rows[-1] + 1,
                         left + cols[-1] + 1], np.float32) / SIZE
    classes[n] = label
    taken.append((top, left, side))
    n += 1
  return image[..., None], boxes, classes, mask


class DigitScenes(tfds.core.GeneratorBasedBuilder):
  """1-3 digits of one class on a 32x32 canvas, with boxes, classes and a class mask."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One scene per sklearn_digits example, seed 0."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's digits placed on 32x32 canvases, with boxes and masks.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(SIZE, SIZE, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
            "boxes": tfds.features.Tensor(shape=(MAX_OBJECTS, 4), dtype=np.float32),
            "classes": tfds.features.Tensor(shape=(MAX_OBJECTS,), dtype=np.int64),
            "mask": tfds.features.Tensor(shape=(SIZE, SIZE), dtype=np.uint8),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels, splits = digits.load_split()
    return {name: self._generate_examples(images, labels, idx, seed)
            for seed, (name, idx) in enumerate(splits.items())}

  def _generate_examples(self, images, labels, idx, seed):
    rng = np.random.default_rng(seed)
    for i in idx:
      same = idx[labels[idx] == labels[i]]
      n = int(rng.integers(1, MAX_OBJECTS + 1))
      glyphs = [images[i, ..., 0]] + [images[j, ..., 0] for j in rng.choice(same, n - 1)]
      image, boxes, classes, mask = scene(rng, glyphs, int(labels[i]))
      yield int(i), {"image": image, "label": int(labels[i]), "boxes": boxes,
                     "classes": classes, "mask": mask}


def prepare(data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds the dataset into `data_dir` once (a few seconds) and returns its builder."""
  builder = DigitScenes(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder
