"""Digits builder, TFDS / folder sources, class selection, sampling and batches."""
import dataclasses
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from kswap_jax import sharding
from kswap_jax.data import pipeline, sources
from kswap_jax.errors import UserError


def test_digits_builds_without_tensorflow(tmp_path):
  code = ("import sys; from kswap_jax.data import sources as s; "
          f"tr = s.open_source('sklearn_digits', 'train', {str(tmp_path)!r}); "
          f"te = s.open_source('sklearn_digits', 'test', {str(tmp_path)!r}); "
          "print(len(tr), len(te), tr.image(0).shape, tr.image(0).dtype, "
          "sorted(set(tr.labels.tolist())) == list(range(10)), 'tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.splitlines()[-1].split() == ["1437", "360", "(8,", "8,", "1)", "uint8", "True", "False"]


def test_digits_images_are_the_sklearn_digits():
  from sklearn.datasets import load_digits
  src = sources.open_source("sklearn_digits", "test")
  d = load_digits()
  ref = {tuple(np.round(x * 255 / 16).astype(np.uint8).ravel()): y
         for x, y in zip(d.images, d.target)}
  for i in (0, 17, 359):
    assert ref[tuple(src.image(i).ravel())] == src.labels[i]


def test_parse_classes_forms_and_errors():
  names = ["cat", "dog", "fox", "owl"]
  assert sources.parse_classes("0-2", names, "x") == [0, 1, 2]
  assert sources.parse_classes("dog,3", names, "x") == [1, 3]
  assert sources.parse_classes([2, "cat"], names, "x") == [2, 0]
  for bad, msg in (("7", "out of range"), ("emu", "unknown class 'emu'"), ("", "empty"),
                   ("1,1", "repeats")):
    with pytest.raises(UserError, match=msg):
      sources.parse_classes(bad, names, "sets.forget.classes")


def test_unknown_and_unprepared_datasets(tmp_path):
  with pytest.raises(UserError, match="unknown dataset 'no_such_ds'"):
    sources.open_source("no_such_ds", "train", str(tmp_path))
  with pytest.raises(UserError, match="not prepared"):
    sources.open_source("cifar10", "train", str(tmp_path))
  with pytest.raises(UserError, match="split 'nope'"):
    sources.open_source("sklearn_digits", "nope", str(tmp_path))


def test_tfds_by_name_with_mock_data():
  # food101: image and label only (the mock's random boxes of datasets with a BBoxFeature,
  # e.g. oxford_iiit_pet, are often min > max and fail to encode)
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    src = sources.open_source("food101", "train")
    assert len(src) == 20 and len(src.class_names) == 101
    classes = sorted(set(src.labels.tolist()))[:3]
    ex = pipeline.select(src, classes, [0, 1, 2], image_size=16, channels=3)
    imgs = ex.images(np.arange(len(ex)))
    assert imgs.shape == (len(ex), 16, 16, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(ex.labels, [classes.index(src.labels[i]) for i in ex.indices])


class JpegColours(tfds.core.GeneratorBasedBuilder):
  """24 JPEG images, each one flat grey level 60 * label, labels 0-3."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=4)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(24):
      buf = io.BytesIO()  # encoded here: TFDS encodes arrays with TensorFlow
      Image.fromarray(np.full((16, 12, 3), 60 * (i % 4), np.uint8)).save(buf, format="JPEG")
      yield i, {"image": buf.getvalue(), "label": i % 4}


def test_tfds_jpeg_source_scans_labels_without_decoding_images(tmp_path, monkeypatch):
  JpegColours(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  decoded = []
  decode = tfds.features.Image.decode_example_np
  monkeypatch.setattr(tfds.features.Image, "decode_example_np",
                      lambda self, *a, **k: decoded.append(1) or decode(self, *a, **k))
  src = sources.open_source("jpeg_colours", "train", str(tmp_path))
  assert len(src) == 24 and not decoded
  grey = [round(float(src.image(i).mean()) / 60) for i in range(len(src))]
  np.testing.assert_array_equal(src.labels, grey)  # each label belongs to its own image
  assert len(decoded) == 24


def test_folder_source(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 3), ("test", 2)):
    for c in ("alice", "bob"):
      os.makedirs(tmp_path / split / c)
      for i in range(n):
        Image.fromarray(rng.integers(0, 255, (12, 10, 3), np.uint8)).save(
            tmp_path / split / c / f"{i}.png")
  src = sources.open_source(f"folder:{tmp_path}", "train")
  assert src.class_names == ["alice", "bob"] and src.labels.tolist() == [0, 0, 0, 1, 1, 1]
  assert src.image(4).shape == (12, 10, 3)
  with pytest.raises(UserError, match="no split folder 'val'"):
    sources.open_source(f"folder:{tmp_path}", "val")


def test_select_fraction_and_k_shot_are_seeded():
  src = sources.open_source("sklearn_digits", "train")
  a = pipeline.select(src, [3, 4], [0, 1], image_size=8, channels=1, fraction=0.1, seed=5)
  b = pipeline.select(src, [3, 4], [0, 1], image_size=8, channels=1, fraction=0.1, seed=5)
  c = pipeline.select(src, [3, 4], [0, 1], image_size=8, channels=1, fraction=0.1, seed=6)
  np.testing.assert_array_equal(a.indices, b.indices)
  assert not np.array_equal(a.indices, c.indices)
  assert abs(len(a) - 0.1 * np.isin(src.labels, [3, 4]).sum()) <= 2
  k = pipeline.select(src, [3, 4], [0, 1], image_size=8, channels=1, per_class=4)
  assert np.bincount(k.labels).tolist() == [4, 4]


def test_image_cache_decodes_once_and_can_be_turned_off():
  digits = sources.open_source("sklearn_digits", "train")
  reads = []
  src = dataclasses.replace(digits, image=lambda i: reads.append(i) or digits.image(i))
  pos = np.array([0, 2, 2, 1])
  sets = {cache: pipeline.select(src, [3, 4], [0, 1], image_size=6, channels=1, cache=cache)
          for cache in (True, False)}
  for cache, ex in sets.items():
    reads.clear()
    first, second = ex.images(pos), ex.images(pos)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(
        first, [pipeline.resize(digits.image(ex.indices[p]), 6, 1) for p in pos])
    assert len(reads) == (3 if cache else 8)
  joined = pipeline.concat(sets[True], sets[False])
  both = np.concatenate([pos, pos + len(sets[True])])
  np.testing.assert_array_equal(joined.images(both), np.concatenate(
      [sets[True].images(pos), sets[False].images(pos)]))
  new = np.array([3, 4])
  joined.images(new)  # read through the joined set: cached in its part, not a second time
  reads.clear()
  sets[True].images(new)
  assert not reads


def test_epoch_sampler_is_a_function_of_step():
  s = pipeline.EpochSampler(10, 4, seed=1)
  assert s.steps_per_epoch == 2
  epoch0 = np.concatenate([s.positions(0), s.positions(1)])
  assert len(set(epoch0.tolist())) == 8
  np.testing.assert_array_equal(s.positions(3), pipeline.EpochSampler(10, 4, 1).positions(3))
  assert not np.array_equal(s.positions(0), s.positions(2))
  assert len(pipeline.EpochSampler(3, 8, 0).positions(0)) == 8  # small sets repeat


def test_epoch_sampler_keeps_one_epoch_and_gives_what_a_fresh_one_gives():
  s = pipeline.EpochSampler(50, 4, seed=3)  # 12 steps per epoch
  steps = [0, 5, 11, 12, 30, 13, 2, 40, 0]  # across epochs, back and forth
  got = [s.positions(t) for t in steps]
  for t, p in zip(steps, got):
    np.testing.assert_array_equal(p, pipeline.EpochSampler(50, 4, seed=3).positions(t))
    assert p.key == (3, t)
  assert s.permutation(1) is s.permutation(1)  # kept, not drawn again
  assert not s.permutation(1).flags.writeable
  got[0][:] = -1  # a batch's positions are its own
  assert (s.positions(0) >= 0).all()


def test_batches_and_eval_padding():
  src = sources.open_source("sklearn_digits", "test")
  ex = pipeline.select(src, [0], [0], image_size=8, channels=1)
  mesh = sharding.make_mesh()
  b = pipeline.batch(ex, np.arange(4), sharding.data_sharding(mesh))
  assert isinstance(b["images"], jax.Array) and b["images"].shape == (4, 8, 8, 1)
  batches = list(pipeline.eval_batches(ex, 32, sharding.data_sharding(mesh)))
  assert sum(int(x["mask"].sum()) for x in batches) == len(ex)
  assert batches[-1]["images"].shape[0] == 32
