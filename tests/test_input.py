"""Reading real datasets: the label index, TFRecord datasets, evaluation resizing, training
augmentation (seeded per step and slot), the image cache budget, image files decoded by the
sets, decoding threads, and the grain loader (same batches with any worker count, its state in
checkpoints)."""
import dataclasses
import io
import json
import os
import shutil
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import array_record
from PIL import Image

from kswap_jax import builders, checkpoints, config_lib, loop, sharding
from kswap_jax.data import label_index, loader, pipeline, sources
from kswap_jax.errors import UserError


class StripedJpegs(tfds.core.GeneratorBasedBuilder):
  """30 JPEG images of several sizes, labels 0-2 (8 of each in train)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(range(24)), "test": self._generate_examples(
        range(24, 30))}

  def _generate_examples(self, ids):
    rng = np.random.default_rng(0)
    for i in ids:
      buf = io.BytesIO()  # encoded here: TFDS encodes arrays with TensorFlow
      h, w = 20 + 2 * (i % 5), 28 - 2 * (i % 4)
      Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(buf, format="JPEG")
      yield i, {"image": buf.getvalue(), "label": i % 3}


@pytest.fixture
def jpegs(tmp_path):
  """A prepared array_record dataset in tmp_path/tfds; its data dir."""
  StripedJpegs(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
  return str(tmp_path / "tfds")


def _count_reads(monkeypatch) -> list:
  """Records read from any array_record data source from now on (their indices)."""
  reads = []
  get = array_record.ArrayRecordDataSource.__getitem__
  monkeypatch.setattr(array_record.ArrayRecordDataSource, "__getitem__",
                      lambda self, i: reads.append(i) or get(self, i))
  return reads


def test_labels_are_read_once_and_kept_beside_the_data(jpegs, monkeypatch, tmp_path):
  monkeypatch.setenv("KSWAP_CACHE", str(tmp_path / "cache"))
  builder = StripedJpegs(data_dir=jpegs)
  truth = {s: [r["label"] for r in builder.as_data_source(s)] for s in ("train", "test")}
  reads = _count_reads(monkeypatch)
  first = sources.open_source("striped_jpegs", "train", jpegs)
  assert len(reads) >= 24 and first.labels.tolist() == truth["train"]
  kept = tmp_path / "tfds/striped_jpegs/1.0.0/kswap_labels_train.npy"
  assert kept.exists() and not (tmp_path / "cache").exists()
  reads.clear()
  again = sources.open_source("striped_jpegs", "train", jpegs)
  assert not reads  # no record read: the labels come from the file
  np.testing.assert_array_equal(again.labels, first.labels)
  # Slices and sums of splits take their labels from the whole splits' files.
  sub = sources.open_source("striped_jpegs", "train[20:]+test[:2]", jpegs)
  assert sub.labels.tolist() == truth["train"][20:] + truth["test"][:2]
  assert sub.image(0).shape == first.image(20).shape  # the same records, in order
  reads.clear()
  sources.open_source("striped_jpegs", "test", jpegs)
  assert not reads


def test_labels_of_an_unwritable_data_dir_go_to_the_cache(jpegs, monkeypatch, tmp_path):
  monkeypatch.setenv("KSWAP_CACHE", str(tmp_path / "cache"))
  (tmp_path / "file").write_text("")  # no folder can be made below a file, even by root
  where = label_index._locations  # pylint: disable=protected-access
  monkeypatch.setattr(label_index, "_locations", lambda *a: [
      label_index.paths.of(tmp_path / "file" / "x.npy"), where(*a)[1]])
  sources.open_source("striped_jpegs", "train", jpegs)
  assert (tmp_path / "cache/striped_jpegs/1.0.0/kswap_labels_train.npy").exists()
  reads = _count_reads(monkeypatch)
  sources.open_source("striped_jpegs", "train", jpegs)
  assert not reads


def test_a_stale_label_file_is_read_again(jpegs):
  path = label_index.paths.of(jpegs) / "striped_jpegs/1.0.0/kswap_labels_train.npy"
  sources.open_source("striped_jpegs", "train", jpegs)
  with label_index.workdir.atomic_file(os.fspath(path), "wb") as f:
    np.save(f, np.zeros(5, np.int64))
  labels = sources.open_source("striped_jpegs", "train", jpegs).labels
  assert labels.shape == (24,) and np.bincount(labels).tolist() == [8, 8, 8]


def test_tfrecord_datasets_are_refused_with_the_conversion_command(jpegs):
  info_path = os.path.join(jpegs, "striped_jpegs/1.0.0/dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  with open(info_path, "w") as f:
    json.dump(info, f)
  with pytest.raises(UserError, match=r"stored as tfrecord files.*tfds convert_format "
                     r"--dataset_version_dir=\S+striped_jpegs/1.0.0 "
                     r"--out_file_format=array_record"):
    sources.open_source("striped_jpegs", "train", jpegs)


def test_resize_shorter_side_then_centre_crop():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 20:60] = 255  # the middle half of the width is white
  out = pipeline.resize(image, 16, 3, shorter=20)  # 40x80 -> 20x40, centre 16x16
  assert out.shape == (16, 16, 3) and (out > 250).all()
  squashed = pipeline.resize(image, 16, 3)  # straight to 16x16: the black sides remain
  assert squashed[:, 0].max() < 5 and squashed[:, 8].min() > 250
  tall = pipeline.resize(np.zeros((90, 30, 1), np.uint8), 8, 1, shorter=10)
  assert tall.shape == (8, 8, 1)
  with pytest.raises(UserError, match="data.resize=6 is below data.image_size=8"):
    src = sources.open_source("sklearn_digits", "test")
    pipeline.select(src, [0], [0], image_size=8, channels=1, resize=6)


def _set(augment, cache=True, workers=0):
  src = sources.open_source("sklearn_digits", "train")
  return pipeline.select(src, [3, 4], [0, 1], image_size=12, channels=1, cache=cache,
                         augment=augment, workers=workers)


def test_training_augmentation_is_a_function_of_seed_step_and_slot():
  aug = pipeline.Augment("random_resized", 0.3, flip=True)
  ex = _set(aug)
  s = pipeline.EpochSampler(len(ex), 8, seed=2)
  mesh = sharding.make_mesh()
  put = sharding.data_sharding(mesh)
  b5 = np.asarray(pipeline.batch(ex, s.positions(5), put)["images"])
  # The same step again, and a "resumed" sampler and set: the same images.
  np.testing.assert_array_equal(b5, np.asarray(pipeline.batch(ex, s.positions(5), put)["images"]))
  resumed, fresh_set = pipeline.EpochSampler(len(ex), 8, seed=2), _set(aug, cache=False, workers=2)
  np.testing.assert_array_equal(
      b5, np.asarray(pipeline.batch(fresh_set, resumed.positions(5), put)["images"]))
  # Augmented: not the evaluation images; another step of the same positions differs.
  pos = s.positions(5)
  assert not np.array_equal(b5, ex.images(np.asarray(pos)))
  later = pos.view(np.ndarray).view(pipeline.Positions)
  later.key = (2, 5 + s.steps_per_epoch)
  assert not np.array_equal(b5, np.asarray(pipeline.batch(ex, later, put)["images"]))
  # A plain array of positions is not augmented; without augmentation nothing changes.
  np.testing.assert_array_equal(
      np.asarray(pipeline.batch(ex, np.asarray(pos).copy(), put)["images"]),
      ex.images(np.asarray(pos)))
  plain = _set(pipeline.Augment())
  np.testing.assert_array_equal(np.asarray(pipeline.batch(plain, pos, put)["images"]),
                                plain.images(np.asarray(pos)))


def test_flip_only_mirrors_the_evaluation_image():
  ex = _set(pipeline.Augment(flip=True))
  pos = pipeline.EpochSampler(len(ex), 64, seed=0).positions(0)
  out = ex.train_images(np.asarray(pos), pos.key, np.arange(64))
  ref = ex.images(np.asarray(pos))
  flipped = [not np.array_equal(o, r) for o, r in zip(out, ref)]
  np.testing.assert_array_equal(out[flipped], ref[flipped][:, :, ::-1])
  assert 10 < sum(flipped) < 54


def test_crop_boxes_fit_and_follow_the_area_bounds():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, right, bottom = pipeline.crop_box(rng, 30, 50, 0.2)
    assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
    area = (right - left) * (bottom - top) / (30 * 50)
    assert 0.15 <= area <= 1.0
    assert 0.7 <= (right - left) / (bottom - top) <= 1.4


def _half_pixel_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """float (height, width, C): bilinear samples of (H, W, C) at half-pixel centres, edges
  clamped, no antialiasing (tf.image.resize's formula), written out in numpy."""
  def axis(n_out, n_in):
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(x).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), x - lo
  (y0, y1, wy), (x0, x1, wx) = axis(height, image.shape[0]), axis(width, image.shape[1])
  f = image.astype(float)
  rows = f[y0] * (1 - wy)[:, None, None] + f[y1] * wy[:, None, None]
  return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def test_bilinear_crop_filter_samples_without_antialiasing():
  rng = np.random.default_rng(0)
  for shape, out in (((50, 37, 3), (16, 16)), ((9, 7, 1), (20, 24)), ((61, 90, 3), (24, 24))):
    image = rng.integers(0, 256, shape, np.uint8)
    region = image[3:, 2:]  # a crop box's view, as the sets pass it
    got = pipeline.bilinear(region, *out)
    assert got.shape == (*out, shape[2]) and got.dtype == np.uint8
    assert np.abs(got - _half_pixel_bilinear(region, *out)).max() <= 1
  # Shrinking stripes 1 px wide by 3: samples land on stripes (aliased), while Pillow's
  # antialiased filter averages them to grey.
  stripes = np.tile(np.repeat(np.array([0, 255], np.uint8), 1), 24)[None, :, None]
  stripes = np.repeat(np.repeat(stripes, 48, 0), 3, 2)
  assert pipeline.bilinear(stripes, 16, 16).std() > 60
  assert pipeline.resize(stripes, 16, 3).std() < 20
  np.testing.assert_array_equal(pipeline.flip_lr(stripes[:5, :7]), stripes[:5, 6::-1])


def test_bilinear_crop_filter_needs_opencv_and_a_known_name(monkeypatch):
  with pytest.raises(UserError, match="crop_filter='box' is not allowed"):
    pipeline.Augment("random_resized", crop_filter="box")
  monkeypatch.setitem(sys.modules, "cv2", None)  # as if not installed
  pipeline._opencv.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(UserError, match="needs OpenCV: pip install 'kswap_jax\\[opencv\\]'"):
      pipeline.Augment("random_resized", crop_filter="bilinear")
    pipeline.Augment("random_resized")  # the default needs no OpenCV,
    pipeline.Augment(flip=True, crop_filter="bilinear")  # nor a set without random crops
  finally:
    pipeline._opencv.cache_clear()  # pylint: disable=protected-access


def test_bilinear_crop_is_the_drawn_box_resized_then_flipped(jpegs, monkeypatch):
  """With crop_filter "bilinear", a training image is `bilinear` of the box `crop_box` draws
  from the decoded file, then mirrored if the next draw is below 1/2; sets joined by `concat`
  decode their parts' JPEG files with OpenCV too."""
  src = sources.open_source("striped_jpegs", "train", jpegs)
  classes = range(len(src.class_names))
  aug = pipeline.Augment("random_resized", 0.2, True, "bilinear")
  ex = pipeline.select(src, classes, classes, image_size=12, channels=3, cache=False,
                       augment=aug)
  pos = np.arange(len(ex))
  got = ex.train_images(pos, (3, 1), pos)
  flips = 0
  for j, rng in enumerate(pipeline.example_rngs((3, 1), pos, pos)):
    image = np.asarray(Image.open(io.BytesIO(src.encoded(ex.indices[j]))).convert("RGB"))
    left, top, right, bottom = pipeline.crop_box(rng, *image.shape[:2], 0.2)
    want = pipeline.bilinear(image[top:bottom, left:right], 12, 12)
    flip = rng.random() < 0.5
    flips += flip
    np.testing.assert_array_equal(got[j], want[:, ::-1] if flip else want)
  assert 0 < flips < len(pos)
  by_opencv, decode_jpeg = [], pipeline.decode_jpeg
  monkeypatch.setattr(pipeline, "decode_jpeg", lambda *a: by_opencv.append(1) or decode_jpeg(*a))
  both = pipeline.concat(ex, ex).train_images(np.arange(4), (3, 1), np.arange(4))
  assert len(by_opencv) == 4
  np.testing.assert_array_equal(both, got[:4])


def test_union_of_sets_reads_through_its_parts():
  aug = pipeline.Augment("random_resized", 0.3, flip=True)
  a, b = _set(aug), _set(aug)
  both = pipeline.concat(a, b)
  np.testing.assert_array_equal(both.decoded(len(a) + 1), b.decoded(1))
  pos = np.array([0, len(a) + 1])
  np.testing.assert_array_equal(both.images(pos), np.concatenate(
      [a.images(np.array([0])), b.images(np.array([1]))]))
  assert both.train_images(pos, (0, 0), np.arange(2)).shape == (2, 12, 12, 1)
  with pytest.raises(ValueError, match="read differently"):
    pipeline.concat(a, _set(pipeline.Augment()))


def test_cache_budget_and_config_options():
  src = sources.open_source("sklearn_digits", "train")
  n = int(np.isin(src.labels, [3, 4]).sum())
  fits = pipeline.select(src, [3, 4], [0, 1], image_size=8, channels=1, cache=n * 64)
  over = pipeline.select(src, [3, 4], [0, 1], image_size=8, channels=1, cache=n * 64 - 1)
  assert fits.cache and not over.cache and over._cache is None  # pylint: disable=protected-access
  data = config_lib.digits_data()
  opts = builders.read_options(data)  # the digits' defaults: today's reading
  assert opts == dict(cache=True, resize=0, augment=pipeline.Augment(), workers=0)
  data = config_lib.imagenet_data(224)
  data.update(cache_budget_gb=0.5, resize=256, train_crop="random_resized", flip=True)
  opts = builders.read_options(data)
  assert opts["cache"] == 2**29 and opts["resize"] == 256
  assert opts["augment"] == pipeline.Augment("random_resized", 0.08, True)
  data.update(crop_filter="bilinear")
  assert builders.read_options(data)["augment"].crop_filter == "bilinear"
  for field, value, msg in (("cache_images", "sometimes", "use True, False or 'auto'"),
                            ("train_crop", "centre", "data.train_crop='centre'"),
                            ("crop_filter", "area", "data.crop_filter='area'"),
                            ("workers", -1, "must be >= 0")):
    bad = ml_collections.ConfigDict({**config_lib.digits_data().to_dict(), field: value})
    with pytest.raises(UserError, match=msg):
      builders.read_options(bad)


def test_paper_configs_read_images_as_the_authors_do():
  load = lambda name, arg="": config_lib.load(  # noqa: E731
      os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py"), arg)
  gs_lora = load("forget_imagenet100").data
  assert (gs_lora.resize, gs_lora.image_size, gs_lora.train_crop, gs_lora.flip) == (
      256, 224, "none", False)
  swap = load("swap_imagenet100").data
  assert (swap.resize, swap.train_crop, swap.flip) == (0, "none", False)
  faces = load("forget_faces", "data=/faces").data
  assert (faces.resize, faces.train_crop, faces.flip) == (0, "none", False)
  dispose = load("dispose_cifar10", "checkpoint=/x.npz").data
  assert (dispose.train_crop, dispose.flip) == ("random_resized", True)
  for data in (gs_lora, swap, dispose):
    assert data.cache_images == "auto"


def test_files_decoded_here_give_the_pixels_of_the_decoded_arrays(jpegs, tmp_path, monkeypatch):
  """Sets read image files (`Source.encoded`) with Pillow, straight to the crop and resize, and
  with crop_filter "bilinear" JPEG files with OpenCV: the pixels of resizing the decoded
  `Source.image` arrays, for TFDS JPEGs and folder files of several modes; files of other
  modes, and broken ones, are read through `image`."""
  rng = np.random.default_rng(0)
  rotated = Image.Exif()
  rotated[0x0112] = 6  # EXIF orientation: shown turned 90 degrees, which Pillow does not apply
  kinds = [("RGB", "JPEG", None), ("L", "JPEG", None), ("RGB", "PNG", None), ("P", "PNG", None),
           ("CMYK", "JPEG", None), ("RGB", "JPEG", rotated)]
  for k, (mode, fmt, exif) in enumerate(kinds):
    os.makedirs(tmp_path / "folder/train" / f"c{k}")
    for i in range(3):
      Image.fromarray(rng.integers(0, 255, (30 + i, 40 - i, 3), np.uint8)).convert(mode).save(
          tmp_path / "folder/train" / f"c{k}" / f"{i}.{fmt.lower()}", fmt,
          **({"exif": exif} if exif else {}))
  by_opencv, decode_jpeg = [], pipeline.decode_jpeg
  monkeypatch.setattr(pipeline, "decode_jpeg", lambda *a: by_opencv.append(1) or decode_jpeg(*a))
  tfds_src = sources.open_source("striped_jpegs", "train", jpegs)
  folder_src = sources.open_source(f"folder:{tmp_path / 'folder'}", "train")
  # (source, classes read through `image`, images OpenCV decodes with 3 and with 1 channel)
  for src, through_image, opencv in ((tfds_src, [], {3: len(tfds_src), 1: 0}),
                                     (folder_src, [3, 4], {3: 9, 1: 3})):  # RGB, L JPEGs; L
    calls = []
    counted = dataclasses.replace(src, image=lambda i, s=src: calls.append(i) or s.image(i))
    for channels, resize, aug in (
        (3, 24, pipeline.Augment("random_resized", 0.1, True)),
        (1, 0, pipeline.Augment("random_resized", 0.5, True)),
        (3, 0, pipeline.Augment(flip=True)),
        (3, 0, pipeline.Augment("random_resized", 0.3, True, "bilinear")),
        (1, 0, pipeline.Augment("random_resized", 0.5, True, "bilinear"))):
      classes, plain = range(len(src.class_names)), dataclasses.replace(src, encoded=None)
      sets = [pipeline.select(s, classes, classes, image_size=16, channels=channels,
                              cache=False, resize=resize, augment=aug) for s in (counted, plain)]
      pos = np.arange(len(sets[0]))
      for train, read in ((False, lambda e: e.images(pos)),
                          (True, lambda e: e.train_images(pos, (4, 2), pos))):
        calls.clear()
        by_opencv.clear()
        got = read(sets[0])
        assert len(by_opencv) == (opencv[channels] if train and aug.crop_filter == "bilinear"
                                  else 0)
        np.testing.assert_array_equal(got, read(sets[1]))
        assert sorted(set(src.labels[calls].tolist())) == through_image
  path = tmp_path / "folder/train/c0/0.jpeg"
  path.write_bytes(path.read_bytes()[:-400])  # truncated past its header
  for aug in (pipeline.Augment(), pipeline.Augment("random_resized", 0.3, True, "bilinear")):
    broken = pipeline.select(sources.open_source(f"folder:{tmp_path / 'folder'}", "train"),
                             [0], [0], image_size=16, channels=3, cache=False, augment=aug)
    with pytest.raises(UserError, match="0.jpeg' cannot be decoded"):
      broken.train_images(np.arange(3), (0, 0), np.arange(3))


@pytest.mark.parametrize("crop_filter", pipeline.CROP_FILTERS)
def test_decoding_threads_give_the_same_images(crop_filter, jpegs):
  aug = pipeline.Augment("random_resized", 0.3, True, crop_filter)
  pos = np.arange(20)
  one, four = _set(aug, cache=False), _set(aug, cache=False, workers=4)
  np.testing.assert_array_equal(one.train_images(pos, (1, 3), pos),
                                four.train_images(pos, (1, 3), pos))
  np.testing.assert_array_equal(one.images(pos), four.images(pos))
  src = sources.open_source("striped_jpegs", "train", jpegs)  # decoded from JPEG files
  one, four = (pipeline.select(src, [0, 1, 2], [0, 1, 2], image_size=12, channels=3,
                               cache=False, augment=aug, workers=w) for w in (0, 4))
  pos = np.arange(len(one))
  np.testing.assert_array_equal(one.train_images(pos, (1, 3), pos),
                                four.train_images(pos, (1, 3), pos))


def test_grain_loader_gives_the_same_batches_with_any_worker_count():
  ex = _set(pipeline.Augment("random_resized", 0.3, flip=True), cache=False)
  sampler = pipeline.EpochSampler(len(ex), 8, seed=1)
  put = sharding.data_sharding(sharding.make_mesh())
  batch_of = lambda s: pipeline.batch(ex, sampler.positions(s), put)  # noqa: E731
  want = [np.asarray(batch_of(s)["images"]) for s in range(6)]
  for ahead in (loader.Ahead(), loader.Ahead(2), loader.Ahead(3, prefetch=1)):
    for start in (0, 4):
      it = loader.iterate(batch_of, 6, start, ahead)
      got = [np.asarray(b["images"]) for b in it]
      assert len(got) == 6 - start and it.get_state() == loader.state_at(6)
      for g, w in zip(got, want[start:]):
        np.testing.assert_array_equal(g, w)
      it.close()
  with pytest.raises(UserError, match="data.prefetch=2 needs data.workers >= 1"):
    loader.Ahead(0, prefetch=2)


def _loop_run(run_dir: str, workers: int) -> dict:
  """Two stages (5 and 4 steps) of an update that folds each augmented batch into the state
  in order, through `loop.run`; the final state."""
  ex = _set(pipeline.Augment("random_resized", 0.3, flip=True), cache=False)
  put = sharding.data_sharding(sharding.make_mesh())

  @jax.jit
  def step(state, b):
    w = 0.9 * state["trainable"]["w"] + jnp.mean(b["images"].astype(jnp.float32), 0)
    return ({"step": state["step"] + 1, "stage_step": state["stage_step"] + 1,
             "trainable": {"w": w}}, {"loss": jnp.mean(w)})

  stages = []
  for name, steps, seed in (("a", 5, 0), ("b", 4, 1)):
    sampler = pipeline.EpochSampler(len(ex), 8, seed)
    stages.append(loop.Stage(name, steps, step, lambda s, smp=sampler: pipeline.batch(
        ex, smp.positions(s), put)))
  state = {"step": jnp.zeros((), jnp.int32), "stage_step": jnp.zeros((), jnp.int32),
           "trainable": {"w": jnp.zeros((12, 12, 1), jnp.float32)}}
  return loop.run(state, stages, checkpoints.Checkpoints(os.path.join(run_dir, "ckpt"), 1, 3),
                  run_dir, log_every=100, ahead=loader.Ahead(workers))


def _interrupted_at(run_dir: str, workers: int, step: int) -> None:
  """`_loop_run` stopped once its checkpoint of `step` is written."""
  save = checkpoints.Checkpoints.maybe_save

  def stop_after(self, at, state, force=False, iterator=None):
    save(self, at, state, force, iterator)
    if at == step:
      raise KeyboardInterrupt

  with pytest.MonkeyPatch.context() as m:
    m.setattr(checkpoints.Checkpoints, "maybe_save", stop_after)
    with pytest.raises(KeyboardInterrupt):
      _loop_run(run_dir, workers)


def test_a_resumed_run_reads_the_batches_of_an_uninterrupted_one(tmp_path):
  want = _loop_run(str(tmp_path / "full"), workers=0)["trainable"]["w"]
  chex.assert_trees_all_equal(want, _loop_run(str(tmp_path / "threads_only"), 2)["trainable"]["w"])
  _interrupted_at(str(tmp_path / "stopped"), 2, 7)  # inside stage b (steps 6-9)
  saved = tmp_path / "stopped" / "ckpt" / "7" / "input" / "process_0-of-1.json"
  assert json.loads(saved.read_text()) == loader.state_at(2)
  for name, workers in (("threads", 2), ("old", 0), ("tampered", 0)):
    shutil.copytree(tmp_path / "stopped", tmp_path / name)
    saved = tmp_path / name / "ckpt" / "7" / "input"
    if name == "old":  # a checkpoint written before input states were saved
      shutil.rmtree(saved)
    if name == "tampered":  # the saved state is read: one that disagrees is refused
      (saved / "process_0-of-1.json").write_text(json.dumps(loader.state_at(1)))
      with pytest.raises(UserError, match="holds input state .* at step 2 of it"):
        _loop_run(str(tmp_path / name), workers)
      continue
    chex.assert_trees_all_equal(want, _loop_run(str(tmp_path / name), workers)["trainable"]["w"])
