"""Random-access image-classification sources: TFDS datasets by name, or a local folder.

A `Source` has `labels` (N,) int64, `class_names` (K,), `image(i)` -> uint8 (H, W, C), and
where it keeps image files, `encoded(i)` -> the file's bytes. TFDS datasets are read with
`builder.as_data_source`, which needs no TensorFlow for array_record files (JPEG/PNG decoded
with Pillow); their labels are read once per split and kept in a file (`label_index`).
TFRecord-format datasets are refused with the command that converts them. `folder:/path` reads
`/path/<split>/<class name>/<image file>`; opening it reads every file's header and refuses
(UserError naming it) a class folder without images or a file Pillow cannot identify. A file
truncated past its header is refused when first decoded.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from kswap_jax.data import digits, label_index, scenes
from kswap_jax.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclasses.dataclass
class Source:
  """encoded: None, or a function of i: the stored file (JPEG, PNG, ...) of image i, or None
  where it has none. Pillow decodes a file whose mode is "L" or "RGB" to `image(i)` (whose grey
  images may repeat their one channel)."""
  name: str
  split: str
  labels: np.ndarray
  class_names: list[str]
  image: Callable[[int], np.ndarray]
  encoded: Callable[[int], bytes | None] | None = None

  def __len__(self) -> int:
    return len(self.labels)


# The datasets this package builds itself (no download): name -> prepare(data_dir) -> builder.
EMBEDDED = {digits.NAME: digits.prepare, scenes.NAME: scenes.prepare}


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def open_source(name: str, split: str, data_dir: str | None = None,
                image_key: str = "image", label_key: str = "label") -> Source:
  """Opens split `split` of dataset `name` ("cifar100", "sklearn_digits", "folder:/path")."""
  if name.startswith("folder:"):
    return _folder_source(name[len("folder:"):], split)
  builder, ds = data_source(name, split, data_dir)
  features = builder.info.features
  label_feature = nested(features, label_key)
  if image_key not in features or label_feature is None:
    raise UserError(f"dataset {name!r} has features {sorted(features)}; set data image_key/"
                    f"label_key to the image and class-label features")
  read = functools.partial(_label_reader, builder, image_key, label_key)
  if builder.info.splits:
    labels = label_index.labels(builder, split, label_key, read)
  else:  # no split records (`tfds.testing.mock_data`): read this split's labels each time
    labels = read(split)(np.arange(len(ds)))
  names = getattr(label_feature, "names", None) or [str(c) for c in range(255)]
  return Source(name, split, labels, list(names), lambda i: np.asarray(ds[int(i)][image_key]),
                _files(builder, split, image_key))


def data_source(name: str, split: str, data_dir: str | None = None):
  """(TFDS builder, random-access data source of split `split`) of dataset `name` (a TFDS name
  or an embedded one, built first); a UserError saying what to do when it cannot be read."""
  if name.startswith("folder:"):
    raise UserError(f"data.dataset={name!r} is an image folder, which has none of the records "
                    "a TFDS dataset has (e.g. boxes or masks for detection or segmentation); "
                    "use a TFDS dataset (e.g. coco/2017, scene_parse150)")
  data_dir = data_dir or default_data_dir()
  if name in EMBEDDED:
    builder = EMBEDDED[name](data_dir)
  else:
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise UserError(f"unknown dataset {name!r}; use a TFDS name (e.g. 'cifar100'), "
                      f"'{digits.NAME}', or 'folder:/path/to/dir'") from None
  try:
    return builder, builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise UserError(f"dataset {name!r} is not prepared in {data_dir}; build it there (e.g. "
                      f"`tfds build {name} --data_dir {data_dir} --file_format array_record`) "
                      f"or set data.data_dir") from None
    if isinstance(e, NotImplementedError):  # stored as TFRecord files: no random access
      raise UserError(f"dataset {name!r} in {builder.data_dir} is stored as "
                      f"{builder.info.file_format.value} files, which cannot be read by index; "
                      f"convert it once (needs TensorFlow): `tfds convert_format "
                      f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record`"
                      ) from None
    raise UserError(f"split {split!r} of {name!r} cannot be read ({str(e)[:200]}); available "
                    f"splits: {sorted(builder.info.splits)}") from None


def nested(record, path: str):
  """record["a"]["b"] for path "a/b" (features or a record); None where a part is missing."""
  for part in path.split("/"):
    try:
      record = record[part]
    except (KeyError, TypeError):
      return None
  return record


def image_label(value) -> int:
  """An image's class from its label feature: a class label as it is; of a sequence of object
  labels ("objects/label") the most frequent; of a mask (H, W[, C]) holding class + 1 (0:
  none; channel 0) the most frequent class of its pixels; -1 when there is none (ours)."""
  v = np.asarray(value)
  if v.ndim == 0:
    return int(v)
  if v.ndim >= 2:
    v = v[..., 0] if v.ndim == 3 else v
    v = v[v > 0].astype(np.int64) - 1
  v = v.reshape(-1).astype(np.int64)
  return int(np.bincount(v).argmax()) if v.size else -1


def _label_reader(builder, image_key: str, label_key: str,
                  split: str) -> Callable[[np.ndarray], np.ndarray]:
  """A function from record indices (k,) of `split` to their labels (k,) int64, which reads
  `Image` features without decoding them: decoding every JPEG of a large dataset would take
  long. Where that read needs TensorFlow (`tfds.testing.mock_data` encodes its fake images for
  a decoder), the records are read decoded."""
  ds = builder.as_data_source(split=split)
  if isinstance(builder.info.features[image_key], tfds.features.Image):
    raw = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    try:
      if len(raw):
        raw[0]  # pylint: disable=pointless-statement
      ds = raw
    except ImportError:
      pass
  return lambda idx: np.fromiter((image_label(nested(ds[int(i)], label_key)) for i in idx),
                                 np.int64, len(idx))


def _files(builder, split: str, image_key: str) -> Callable[[int], bytes | None] | None:
  """`Source.encoded` of a TFDS split: its uint8 `Image` feature `image_key` as stored (None
  for another feature; each file None where reading it so needs TensorFlow, as
  `tfds.testing.mock_data` does)."""
  feature = builder.info.features[image_key]
  if not isinstance(feature, tfds.features.Image) or feature.np_dtype != np.uint8:
    return None
  raw = builder.as_data_source(split=split, decoders={image_key: tfds.decode.SkipDecoding()})

  def encoded(i: int) -> bytes | None:
    try:
      return raw[int(i)][image_key]
    except ImportError:
      return None

  return encoded


def _folder_source(root: str, split: str) -> Source:
  d = os.path.join(root, split)
  if not os.path.isdir(d):
    avail = sorted(os.listdir(root)) if os.path.isdir(root) else []
    raise UserError(f"folder dataset {root!r} has no split folder {split!r}; found {avail}")
  # Class names and ids come from the union of all split folders, so splits agree.
  classes = sorted({c for s in os.listdir(root) if os.path.isdir(os.path.join(root, s))
                    for c in os.listdir(os.path.join(root, s))
                    if os.path.isdir(os.path.join(root, s, c))})
  files, labels = [], []
  for k, c in enumerate(classes):
    cdir = os.path.join(d, c)
    if not os.path.isdir(cdir):
      continue
    found = [os.path.join(cdir, f) for f in sorted(os.listdir(cdir))
             if f.lower().endswith(IMAGE_SUFFIXES)]
    if not found:
      raise UserError(f"class folder {cdir!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                      f"add images or remove the folder")
    for path in found:
      try:
        Image.open(path).close()  # reads the header only
      except OSError:  # PIL.UnidentifiedImageError included
        raise UserError(f"file {path!r} is not an image Pillow can read; replace or remove "
                        f"it") from None
    files.extend(found)
    labels.extend([k] * len(found))
  if not files:
    raise UserError(f"folder dataset {d!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                    f"in class subfolders")

  def image(i: int) -> np.ndarray:
    try:
      with Image.open(files[int(i)]) as im:
        return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError) as e:  # Pillow's errors for truncated or corrupt data
      raise UserError(f"image file {files[int(i)]!r} cannot be decoded ({e}); replace or "
                      f"remove it") from None

  def encoded(i: int) -> bytes:
    with open(files[int(i)], "rb") as f:
      return f.read()

  return Source(f"folder:{root}", split, np.asarray(labels, np.int64), classes, image, encoded)


def parse_classes(spec: Any, class_names: Sequence[str], what: str) -> list[int]:
  """Class ids from a spec: list of ids / names, or a string "0-4,7" or "cat,dog"."""
  if isinstance(spec, str):
    spec = [s.strip() for s in spec.split(",") if s.strip()]
  out: list[int] = []
  for item in spec:
    if isinstance(item, str) and "-" in item and all(p.isdigit() for p in item.split("-", 1)):
      lo, hi = map(int, item.split("-", 1))
      out.extend(range(lo, hi + 1))
    elif isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.isdigit()):
      out.append(int(item))
    elif item in class_names:
      out.append(list(class_names).index(item))
    else:
      raise UserError(f"{what}: unknown class {item!r}; allowed: ids 0-{len(class_names) - 1} "
                      f"or names such as {list(class_names)[:5]}")
  bad = [c for c in out if not 0 <= c < len(class_names)]
  if bad:
    raise UserError(f"{what}: class ids {bad} are out of range 0-{len(class_names) - 1}")
  if not out:
    raise UserError(f"{what}: the class list is empty; name at least one class")
  if len(set(out)) != len(out):
    raise UserError(f"{what}: class list {out} repeats a class")
  return out
