"""`sklearn_digits`: scikit-learn's 1,797 real 8x8 handwritten digits as a TFDS dataset.

Stored as array_record with Tensor features, so it is built and read without TensorFlow and
without network access. Fixed stratified split: 1,437 train / 360 test images.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NAME = "sklearn_digits"


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """Handwritten digits 0-9, uint8 images (8, 8, 1) scaled from 0..16 to 0..255."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 80/20 train/test split with seed 0."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="scikit-learn's bundled UCI optical handwritten digits (8x8, 10 classes).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    images, labels, splits = load_split()
    return {name: self._generate_examples(images, labels, idx) for name, idx in splits.items()}

  def _generate_examples(self, images, labels, idx):
    for i in idx:
      yield int(i), {"image": images[i], "label": int(labels[i])}


def load_split() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
  """(images uint8 (1797, 8, 8, 1) scaled to 0..255, labels (1797,), {"train": sorted indices
  (1437,), "test": (360,)}): the fixed stratified split, seed 0."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  d = load_digits()
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  idx = np.arange(len(images))
  train, test = train_test_split(idx, test_size=0.2, random_state=0, stratify=d.target)
  return images, d.target, {"train": np.sort(train), "test": np.sort(test)}


def prepare(data_dir: str) -> tfds.core.DatasetBuilder:
  """Builds the dataset into `data_dir` once (a second or two) and returns its builder."""
  builder = SklearnDigits(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare()
  return builder
