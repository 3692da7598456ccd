"""The labels of a TFDS split, read from its records once and kept in a file for later runs.

A prepared dataset's labels are stored per whole split (`train`, `test`, ...) as int64 (N,)
`.npy` files, first beside the data:

  <data_dir>/<dataset>[/<config>]/<version>/kswap_labels_<split>.npy

else, where that folder cannot be written (a read-only or shared data dir), under
`$KSWAP_CACHE` (default `~/.cache/kswap_jax`) / <dataset>[/<config>]/<version>/. Any slice or
sum of splits ("train[:90%]", "train+test") takes its labels from those files, through the
split's file instructions. A file whose length does not match its split (a rebuilt dataset)
is read again.
"""
from __future__ import annotations

import io
import os
from typing import Callable

from etils import epath
import numpy as np

from kswap_jax import paths, progress, workdir


def cache_root() -> epath.Path:
  """$KSWAP_CACHE, else ~/.cache/kswap_jax: the label files of unwritable data dirs."""
  return paths.of(os.environ.get("KSWAP_CACHE") or os.path.expanduser("~/.cache/kswap_jax"))


def _file_name(split: str, label_key: str) -> str:
  return f"kswap_labels_{split}.npy" if label_key == "label" else \
      f"kswap_labels_{split}.{label_key.replace('/', '.')}.npy"


def _locations(builder, split: str, label_key: str) -> list[epath.Path]:
  """Where the labels of a whole split are kept: beside the data, then in `cache_root()`."""
  name = _file_name(split, label_key)
  return [paths.of(builder.data_dir) / name,
          cache_root() / builder.info.full_name / name]


def _load(builder, split: str, label_key: str, n: int) -> np.ndarray | None:
  for path in _locations(builder, split, label_key):
    if path.exists():
      labels = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
      if labels.shape == (n,):
        return labels
  return None


def _save(builder, split: str, label_key: str, labels: np.ndarray) -> epath.Path | None:
  """Writes the label file (process 0) to the first writable location; its path, or None."""
  buf = io.BytesIO()
  np.save(buf, labels)
  for path in _locations(builder, split, label_key):
    try:
      with workdir.atomic_file(os.fspath(path), "wb") as f:
        f.write(buf.getvalue())
      return path
    except OSError:
      continue
  return None


def whole_split(builder, split: str, label_key: str,
                read: Callable[[str], Callable[[np.ndarray], np.ndarray]]) -> np.ndarray:
  """(N,) labels of the whole split `split`, from its label file, else read and stored.

  read(split) gives a function from record indices (k,) to their labels (k,).
  """
  n = builder.info.splits[split].num_examples
  labels = _load(builder, split, label_key, n)
  if labels is not None:
    return labels
  get = read(split)
  tick = progress.Ticker(f"reading the labels of {builder.name} {split} (once)", n)
  chunk = 4096
  labels = np.empty(n, np.int64)
  for start in range(0, n, chunk):
    labels[start:start + chunk] = get(np.arange(start, min(n, start + chunk)))
    tick(start + chunk)
  if workdir.is_main():
    path = _save(builder, split, label_key, labels)
    if n > chunk:
      progress.say(f"labels of {builder.name} {split}: {n} records read; kept in {path}")
  return labels


def labels(builder, split: str, label_key: str,
           read: Callable[[str], Callable[[np.ndarray], np.ndarray]]) -> np.ndarray:
  """(N,) labels of `split`, any slice or sum of splits ("train[:90%]+test"), in record
  order: the matching ranges of the whole splits' labels (`whole_split`)."""
  shards = {}  # shard file -> (whole split, offset of its first record there)
  for whole, info in builder.info.splits.items():
    offset = 0
    for f in info.file_instructions:
      shards[os.path.basename(f.filename)] = (whole, offset)
      offset += f.examples_in_shard
  full, parts = {}, []
  for f in builder.info.splits[split].file_instructions:
    whole, offset = shards[os.path.basename(f.filename)]
    if whole not in full:
      full[whole] = whole_split(builder, whole, label_key, read)
    parts.append(full[whole][offset + f.skip:offset + f.skip + f.take])
  return np.concatenate(parts) if parts else np.zeros(0, np.int64)
