"""Per-image CPU cost of each way a host can turn a stored JPEG into a training crop.

On the JPEGs of `input_speed.py` (about 500 x 375, quality 90), with the crop boxes the pipeline
draws (`pipeline.crop_box`, area 0.08-1), one thread, process CPU time per image (the median
and the best of --rounds rounds over the same --images files; the ways alternate within each
round, so a shared machine's load weighs on all alike):

  pillow decode               Pillow decode to a uint8 array: `input_speed.py`'s raw decode
  pillow crop antialias       Pillow decode, the box resized to 224 in the same call, bilinear
                              antialiased: the pipeline's training crop (torchvision's
                              RandomResizedCrop pixels)
  opencv decode               cv2.imdecode to an RGB uint8 array (`pipeline.decode_jpeg`)
  opencv + pillow antialias   cv2.imdecode, then the pipeline's Pillow resize of the box (the
                              same pixels as `pillow crop antialias`, another decoder)
  opencv crop linear          cv2.imdecode, the box sliced, cv2.resize INTER_LINEAR: bilinear
                              without antialiasing (the filter of big_vision's
                              decode_jpeg_and_inception_crop by default, antialias=False)
  opencv crop area            the same with INTER_AREA (box-filter averaging when shrinking)
  tf decode                   tf.io.decode_jpeg
  tf crop linear              tf.io.decode_and_crop_jpeg (decodes only the box) and
                              tf.image.resize bilinear, antialias=False: big_vision's op
  tf crop antialias           the same, antialias=True

Rows whose library is not installed (OpenCV, TensorFlow: optional, the `opencv` and `tf`
extras) are left out.
Each row gives ms per image, images per CPU-second and that as % of Pillow's decode and of its
own library's decode. Pixel checks over the images: the largest |difference| between OpenCV's
and Pillow's decode, between `opencv + pillow antialias` and `pillow crop antialias`, and
between the two libraries' plain bilinear crops.

  pip install -e '.[opencv]' tensorflow-cpu   # optional: their rows
  python benchmarks/decode_options.py [--images 300] [--rounds 5] [--out FILE]

Writes benchmarks/results/decode_options.json and prints a table.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from input_speed import jpeg  # noqa: E402  pylint: disable=wrong-import-position

from kswap_jax import workdir  # noqa: E402  pylint: disable=wrong-import-position
from kswap_jax.data import pipeline  # noqa: E402  pylint: disable=wrong-import-position
from kswap_jax.progress import table  # noqa: E402  pylint: disable=wrong-import-position

SIZE = 224
Box = tuple[int, int, int, int]  # (left, top, right, bottom)


def pillow_ways() -> dict[str, Callable[[bytes, Box], np.ndarray]]:
  def decode(data, box):
    del box
    with Image.open(io.BytesIO(data)) as im:
      return np.asarray(im.convert("RGB"))

  def crop(data, box):
    im = Image.open(io.BytesIO(data))
    return np.asarray(im.resize((SIZE, SIZE), Image.BILINEAR, box))

  return {"pillow decode": decode, "pillow crop antialias": crop}


def opencv_ways() -> dict[str, Callable[[bytes, Box], np.ndarray]]:
  import cv2  # pylint: disable=g-import-not-at-top
  cv2.setNumThreads(1)

  def decode(data, box):
    del box
    return pipeline.decode_jpeg(data, 3)

  def with_pillow(data, box):
    im = Image.fromarray(decode(data, box))
    return np.asarray(im.resize((SIZE, SIZE), Image.BILINEAR, box))

  def crop(how):
    def fn(data, box):
      left, top, right, bottom = box
      return cv2.resize(decode(data, box)[top:bottom, left:right], (SIZE, SIZE),
                        interpolation=how)
    return fn

  return {"opencv decode": decode, "opencv + pillow antialias": with_pillow,
          "opencv crop linear": crop(cv2.INTER_LINEAR), "opencv crop area": crop(cv2.INTER_AREA)}


def tf_ways() -> dict[str, Callable[[bytes, Box], np.ndarray]]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)

  def decode(data, box):
    del box
    return tf.io.decode_jpeg(data, channels=3).numpy()

  def crop(antialias):
    def fn(data, box):
      left, top, right, bottom = box
      x = tf.io.decode_and_crop_jpeg(data, [top, left, bottom - top, right - left], channels=3)
      x = tf.image.resize(x, (SIZE, SIZE), "bilinear", antialias=antialias)
      return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).numpy()
    return fn

  return {"tf decode": decode, "tf crop linear": crop(False), "tf crop antialias": crop(True)}


LIBRARIES = {"pillow": ("pillow", pillow_ways), "opencv": ("opencv-python-headless", opencv_ways),
             "tf": ("tensorflow", tf_ways)}


def available_ways() -> tuple[dict, dict]:
  """({row name: fn(jpeg bytes, box) -> uint8 array}, {library: version}) of the libraries
  installed."""
  ways, versions = {}, {}
  for lib, (dist, make) in LIBRARIES.items():
    try:
      ways.update(make())
    except ImportError:
      continue
    dists = [d for d in (dist, f"{dist}-cpu", "opencv-python") if _version(d)]
    versions[lib] = _version(dists[0]) if dists else "unknown"
  return ways, versions


def _version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return ""


def pixel_checks(ways: dict, files: list[bytes], boxes: list[Box]) -> dict:
  """Largest |difference| between pairs of ways that should agree (where both exist)."""
  pairs = {"opencv decode vs pillow decode": ("opencv decode", "pillow decode"),
           "opencv + pillow antialias vs pillow crop antialias": ("opencv + pillow antialias",
                                                                  "pillow crop antialias"),
           "tf crop linear vs opencv crop linear": ("tf crop linear", "opencv crop linear")}
  out = {}
  for name, (a, b) in pairs.items():
    if a in ways and b in ways:
      out[name] = max(int(np.abs(ways[a](f, x).astype(np.int16) - ways[b](f, x)).max())
                      for f, x in zip(files, boxes))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=300)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--out", default=os.path.join(HERE, "results", "decode_options.json"))
  a = p.parse_args()
  if a.images < 1 or a.rounds < 1:
    raise SystemExit("error: --images and --rounds must be >= 1")
  files = [jpeg(i) for i in range(a.images)]
  rng = np.random.default_rng(0)
  boxes = []
  for data in files:
    with Image.open(io.BytesIO(data)) as im:
      boxes.append(pipeline.crop_box(rng, im.height, im.width, 0.08))
  ways, versions = available_ways()
  for fn in ways.values():  # first calls (TensorFlow's op setup) not timed
    fn(files[0], boxes[0])
  times = {name: [] for name in ways}
  for r in range(a.rounds):
    for name, fn in ways.items():
      t = time.process_time()
      for data, box in zip(files, boxes):
        fn(data, box)
      times[name].append((time.process_time() - t) / len(files) * 1e3)
    print(f"round {r + 1}/{a.rounds}", flush=True)
  median = {name: statistics.median(v) for name, v in times.items()}
  rows = []
  for name in ways:
    own = name.split()[0] + " decode"
    rows.append({"way": name, "ms_per_image": median[name], "best_ms": min(times[name]),
                 "images_per_cpu_s": 1e3 / median[name],
                 "vs_pillow_decode_%": 100 * median["pillow decode"] / median[name],
                 "vs_own_decode_%": 100 * median[own] / median[name]})
  result = {"images": a.images, "rounds": a.rounds, "cpu_count": os.cpu_count(),
            "mean_jpeg_kb": float(np.mean([len(f) for f in files]) / 1024),
            "versions": versions, "rows": rows,
            "max_abs_pixel_difference": pixel_checks(ways, files, boxes)}
  workdir.write_json(a.out, result)
  print(table(rows, ["way", "ms_per_image", "best_ms", "images_per_cpu_s",
                     "vs_pillow_decode_%", "vs_own_decode_%"], "{:.2f}"))
  for name, d in result["max_abs_pixel_difference"].items():
    print(f"max |pixel difference|, {name}: {d}")
  print(f"wrote {os.path.relpath(a.out)}")


if __name__ == "__main__":
  main()
