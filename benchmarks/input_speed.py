"""Speed of the training input on a real-size JPEG dataset, against the decode floor.

Builds (once, no download) `synthetic_jpegs`: --images generated JPEG images of about 500 x 375
(smooth colour fields plus noise, quality 90), --classes classes, 90% train / 10% test, as a
TFDS array_record dataset in --data_dir/n<images>_c<classes>. Then, each part in a fresh
process:

  record read     CPU time to read one image's record (its JPEG bytes), --raw_images of them
  raw decode      the decode of the stored JPEG bytes (--raw_images of them, in turn) to
                  uint8 arrays, one thread, by Pillow and, where it is installed, by OpenCV
                  (the same pixels): images per CPU-second, what one core can do at best
                  (every pipeline decodes each image once)
  pipeline        --speed_batches training batches of --batch images as a job reads them:
                  `ExampleSet` with random-resized crop (area 0.08-1) + flip to 224 x 224,
                  resized with each crop filter this machine has ("antialias": Pillow;
                  "bilinear": OpenCV), positions from `EpochSampler`, made by the grain loader
                  (`kswap_jax.data.loader`) with 0, 1 and 2 workers: images per CPU-second
                  (process CPU time, all threads, from the loader's start to its last batch),
                  and that over each raw decode's (goal >= 80%)
  feeding a step  a --variant (default ViT-B/16) full fine-tuning step (AdamW) on --step_batch
                  images from the loader with 0 and 2 workers: the fraction of the time spent
                  waiting for the next batch (the first, compiling step left out); the peak RSS
                  of that process is the peak RSS of such a run
  second start    open the dataset, select all classes, make the first batch (imports and the
                  JAX backend start not timed): seconds, without the label index
                  (`kswap_jax.data.label_index`; its file deleted first) and with it

The raw decodes and the pipeline alternate: after each batch this thread decodes --batch raw
images with each decoder (its own CPU time, taken off the process's for the pipeline), so a
load that changes on a shared machine weighs on all alike; wall-clock throughput is therefore
not measured there (the feeding step shows whether the loader keeps up).

  python benchmarks/input_speed.py [--images 20000] [--quick] [--data_dir DIR] [--out FILE]

--quick: 1,000 images, 10 classes, ViT-Ti/16, fewer batches (a smoke run). Writes
benchmarks/results/input_speed.json (--quick: input_speed_quick.json) and prints a table.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import io
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
NAME = "synthetic_jpegs"
_NOISE = np.random.default_rng(0).normal(0, 12, (640, 640, 1)).astype(np.int16)


def jpeg(i: int) -> bytes:
  """Image i: about 500 x 375 (or 375 x 500) colour fields plus noise, JPEG quality 90."""
  rng = np.random.default_rng(i)
  h, w = (375, 500) if i % 4 else (500, 375)
  h, w = h + int(rng.integers(-40, 41)), w + int(rng.integers(-40, 41))
  fields = [Image.fromarray(rng.integers(0, 256, grid, np.uint8)).resize((w, h), how)
            for grid, how in (((4, 5, 3), Image.BICUBIC), ((24, 32, 3), Image.BILINEAR))]
  y, x = rng.integers(0, 640 - h), rng.integers(0, 640 - w)
  image = (np.asarray(fields[0], np.int16) + fields[1]) // 2 + _NOISE[y:y + h, x:x + w]
  buf = io.BytesIO()
  Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


class SyntheticJpegs(tfds.core.GeneratorBasedBuilder):
  """`images` generated JPEGs of `classes` classes (image i has class i % classes)."""

  VERSION = tfds.core.Version("1.0.0")
  images, classes = 20000, 100  # set before building

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=self.classes)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    n_test = self.images // 10
    return {"train": self._generate_examples(range(n_test, self.images)),
            "test": self._generate_examples(range(n_test))}

  def _generate_examples(self, ids):
    with multiprocessing.Pool() as pool:  # JPEG encoding on every core
      for i, data in zip(ids, pool.imap(jpeg, ids, chunksize=64)):
        yield i, {"image": data, "label": i % self.classes}


def phase_build(a) -> dict:
  """Prepares the dataset in a.data_dir (if not already there): seconds taken."""
  SyntheticJpegs.images, SyntheticJpegs.classes = a.images, a.classes
  builder = SyntheticJpegs(data_dir=a.data_dir, file_format="array_record")
  t = time.perf_counter()
  if not builder.is_prepared():
    # TFDS writes examples past 1 GB to temporary files through TensorFlow: keep all in memory
    shuffle.MAX_MEM_BUFFER_SIZE = max(shuffle.MAX_MEM_BUFFER_SIZE, a.images * 200 * 1024)
    builder.download_and_prepare()
  return {"images": a.images, "classes": a.classes, "build_s": time.perf_counter() - t}


def cpu_seconds() -> float:
  """User + system CPU seconds of this process so far (all threads)."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _train_set(data_dir: str, workers: int, crop_filter: str = "antialias"):
  """(all train images as a training `ExampleSet` (224 px, random-resized crop + flip,
  resized with `crop_filter`), its source)."""
  from kswap_jax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
  src = sources.open_source(NAME, "train", data_dir)
  classes = list(range(len(src.class_names)))
  return pipeline.select(src, classes, classes, image_size=224, channels=3, cache=False,
                         augment=pipeline.Augment("random_resized", 0.08, True, crop_filter),
                         workers=workers), src


def _batches(examples, batch: int, workers: int, steps: int):
  """The grain loader over `steps` training batches of `examples`, as loop.run makes them."""
  from kswap_jax import sharding  # pylint: disable=g-import-not-at-top
  from kswap_jax.data import loader, pipeline  # pylint: disable=g-import-not-at-top
  sampler = pipeline.EpochSampler(len(examples), batch, seed=0)
  put = sharding.data_sharding(sharding.make_mesh())
  return loader.iterate(lambda s: pipeline.batch(examples, sampler.positions(s), put), steps,
                        ahead=loader.Ahead(workers))


def decoders() -> dict[str, Callable[[list[bytes]], None]]:
  """The raw decodes, JPEG files -> uint8 (H, W, 3) arrays: Pillow's, and where it is
  installed OpenCV's (the same pixels, faster; crop_filter "bilinear" decodes with it)."""
  def pillow(files):
    for b in files:
      with Image.open(io.BytesIO(b)) as im:
        np.asarray(im.convert("RGB"))

  if importlib.util.find_spec("cv2") is None:
    return {"pillow": pillow}
  from kswap_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  def opencv(files):
    for b in files:
      pipeline.decode_jpeg(b, 3)

  return {"pillow": pillow, "opencv": opencv}


def crop_filters() -> list[str]:
  """The `Augment.crop_filter`s this machine can run: "bilinear" needs OpenCV."""
  return ["antialias", "bilinear"] if "opencv" in decoders() else ["antialias"]


def phase_speed(a) -> dict:
  """Images per CPU-second of the raw decodes and of the pipeline with 0, 1 and 2 workers and
  each crop filter, each raw decode of a batch's worth of images after each batch (module
  docstring)."""
  builder = tfds.builder(NAME, data_dir=a.data_dir)
  raw = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
  t = time.thread_time()
  data = [raw[int(i)]["image"] for i in np.linspace(0, len(raw) - 1, a.raw_images).astype(int)]
  read_ms = (time.thread_time() - t) / len(data) * 1e3
  floors = decoders()
  for decode in floors.values():
    decode(data[:a.batch])
  examples, _ = _train_set(a.data_dir, 0)
  it = _batches(examples, a.batch, 0, 1)  # JAX's first transfer, not timed
  next(it)["images"].block_until_ready()
  it.close()
  raw_n, raw_cpu, rows = 0, dict.fromkeys(floors, 0.0), []
  for crop_filter, workers in ((f, w) for f in crop_filters() for w in (0, 1, 2)):
    examples, _ = _train_set(a.data_dir, workers, crop_filter)
    spent, c = dict.fromkeys(floors, 0.0), cpu_seconds()
    it = _batches(examples, a.batch, workers, a.speed_batches)
    for b in it:
      b["images"].block_until_ready()
      files = [data[(raw_n + k) % len(data)] for k in range(a.batch)]
      for name, decode in floors.items():
        t = time.thread_time()
        decode(files)
        spent[name] += time.thread_time() - t
      raw_n += a.batch
    it.close()
    n, cpu = a.speed_batches * a.batch, cpu_seconds() - c - sum(spent.values())
    row = {"crop_filter": crop_filter, "workers": workers, "images": n,
           "images_per_cpu_s": n / cpu}
    for name, seconds in spent.items():
      raw_cpu[name] += seconds
      row[f"{name}_decode_images_per_cpu_s"] = n / seconds
      row[f"vs_{name}_decode_per_core_%"] = 100 * seconds / cpu
    rows.append(row)
  return {"raw_decode": {name: {"images": raw_n, "images_per_cpu_s": raw_n / seconds}
                         for name, seconds in raw_cpu.items()},
          "distinct_images": len(data), "record_read_cpu_ms": read_ms,
          "mean_jpeg_kb": float(np.mean([len(b) for b in data]) / 1024), "pipeline": rows}


def phase_train(a) -> dict:
  """Waiting for input while feeding a ViT train step, with 0 and 2 workers."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from kswap_jax import losses, train, trees  # pylint: disable=g-import-not-at-top
  from kswap_jax.models import vit  # pylint: disable=g-import-not-at-top

  src = _train_set(a.data_dir, 0)[1]
  cfg = ml_collections.ConfigDict(dict(variant=a.variant, num_classes=len(src.class_names),
                                       dropout=0.0, dtype="float32"))
  net = train.Network(vit.make_model(cfg))
  params = vit.init_params(net.model, jax.random.key(0), (224, 224, 3))
  tx = train.make_optimizer()

  def loss(trainable, frozen, hp, batch, rng):
    del hp
    logits = net.apply(trees.combine(frozen, trainable["params"]), None, batch["images"],
                       train=True, rng=rng)
    return losses.cross_entropy(logits, batch["labels"]), {}

  step = jax.jit(train.make_step(loss, tx, lambda s: 1.0), donate_argnums=0)
  state = train.init_state(params, None, ".*", {"lr": 1e-4, "weight_decay": 0.05}, 0, tx)
  rows = []
  for workers in (0, 2):
    examples, _ = _train_set(a.data_dir, workers)
    it = _batches(examples, a.step_batch, workers, a.train_steps + 1)
    state, m = step(state, next(it))  # compiles (first time)
    jax.block_until_ready(m)
    wait = busy = 0.0
    for _ in range(a.train_steps):
      t = time.perf_counter()
      batch = next(it)
      jax.block_until_ready(batch)
      t1 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      wait, busy = wait + t1 - t, busy + time.perf_counter() - t1
    it.close()
    rows.append({"workers": workers, "steps": a.train_steps, "step_s": busy / a.train_steps,
                 "wait_s": wait / a.train_steps, "waiting_%": 100 * wait / (wait + busy)})
  return {"variant": a.variant, "batch": a.step_batch, "rows": rows, "peak_rss_mb": peak_rss_mb()}


def phase_start(a) -> dict:
  """Seconds from opening the dataset to its first training batch; --uncached deletes the
  label index first."""
  from kswap_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.make_mesh()  # imports and the backend start are not timed
  if a.uncached:
    builder = tfds.builder(NAME, data_dir=a.data_dir)
    for f in glob.glob(os.path.join(builder.data_dir, "kswap_labels_*.npy")):
      os.remove(f)
  t = time.perf_counter()
  examples, _ = _train_set(a.data_dir, 0)
  it = _batches(examples, a.step_batch, 0, 1)
  next(it)["images"].block_until_ready()
  return {"first_batch_s": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}


def child(a, phase: str, *extra: str) -> dict:
  """Runs `phase` in a fresh process (niced as this one); its JSON result. Every part runs in
  its own process, as the peak RSS a process reports includes its parent's at the fork."""
  args = [sys.executable, os.path.abspath(__file__), "--phase", phase, "--data_dir",
          a.data_dir, "--images", str(a.images), "--classes", str(a.classes), "--batch",
          str(a.batch), "--speed_batches", str(a.speed_batches), "--raw_images",
          str(a.raw_images), "--variant", a.variant, "--step_batch",
          str(a.step_batch), "--train_steps", str(a.train_steps), *extra]
  env = {**os.environ, "KSWAP_CACHE": os.path.join(a.data_dir, "label_cache"),
         "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"phase {phase} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=20000)
  p.add_argument("--classes", type=int, default=100)
  p.add_argument("--quick", action="store_true")
  p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "kswap_input_speed"))
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--speed_batches", type=int, default=20)
  p.add_argument("--raw_images", type=int, default=1000)
  p.add_argument("--variant", default="B/16")
  p.add_argument("--step_batch", type=int, default=16)
  p.add_argument("--train_steps", type=int, default=3)
  p.add_argument("--note", default="")
  p.add_argument("--out", default="")
  p.add_argument("--phase", choices=("build", "speed", "train", "start"),
                 help=argparse.SUPPRESS)
  p.add_argument("--uncached", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.phase:
    print(json.dumps(globals()[f"phase_{a.phase}"](a)))
    return
  if a.quick:
    a.images, a.classes, a.variant = 1000, 10, "Ti/16"
    a.speed_batches, a.raw_images, a.step_batch, a.train_steps = 4, 200, 8, 2
  a.data_dir = os.path.join(a.data_dir, f"n{a.images}_c{a.classes}")
  built = child(a, "build")
  load_before = os.getloadavg()[0]
  speed = child(a, "speed")
  starts = {"without_label_index": child(a, "start", "--uncached"),
            "with_label_index": child(a, "start")}
  feed = child(a, "train")

  from kswap_jax import workdir  # pylint: disable=g-import-not-at-top
  from kswap_jax.progress import table  # pylint: disable=g-import-not-at-top
  config = {k: v for k, v in vars(a).items()
            if k not in ("data_dir", "phase", "uncached", "out", "note")}
  result = {"cpu_count": os.cpu_count(), "config": config, "note": a.note, "dataset": built,
            "load_average_1min": [load_before, os.getloadavg()[0]],  # before speed, at the end
            **speed, "second_start": starts, "feeding_step": feed}
  out = a.out or os.path.join(RESULTS, "input_speed_quick.json" if a.quick else
                              "input_speed.json")
  workdir.write_json(out, result)
  print(f"reading a record (the JPEG's bytes) from the array_record file: "
        f"{speed['record_read_cpu_ms']:.2f} ms of CPU")
  for name, raw in speed["raw_decode"].items():
    print(f"raw JPEG decode ({name}, 1 thread): {raw['images_per_cpu_s']:.0f} images per "
          f"CPU-second, {speed['mean_jpeg_kb']:.0f} KiB a file")
  print(table(speed["pipeline"], ["crop_filter", "workers", "images_per_cpu_s",
                                  *(f"vs_{name}_decode_per_core_%" for name in
                                    speed["raw_decode"])], "{:.1f}"))
  print(f"feeding a ViT-{a.variant} step ({a.step_batch} images):")
  print(table(feed["rows"], ["workers", "step_s", "wait_s", "waiting_%"], "{:.3f}"))
  print(f"peak RSS of that run: {feed['peak_rss_mb']:.0f} MiB")
  print(table([{"start": k, **v} for k, v in starts.items()],
              ["start", "first_batch_s", "peak_rss_mb"], "{:.2f}"))
  print(f"wrote {os.path.relpath(out)}")


if __name__ == "__main__":
  main()
