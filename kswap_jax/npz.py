"""Pretrained ViT `.npz` files: load into a `models.vit.ViT` params tree, export.

Two layouts are read, told apart by their keys (flat, '/'-joined):

  vision_transformer (also AugReg): pre-Linen block names `MultiHeadDotProductAttention_1`,
    `LayerNorm_2`, `MlpBlock_3`, and `Transformer/posembed_input/pos_embedding` (1, 1+N, D)
    whose first row belongs to the class token.
  big_vision: our names; `pos_embedding` (1, N, D) at the top level, no class row; maybe under
    `params/`; maybe with scanned blocks `Transformer/encoderblock/...` stacked on axis 0.

The class row is folded into `cls` when the model adds no position embedding to the class token
(`model.class_posemb` False), so the loaded model computes the same function as the original one.
`fit` (shared with `torch_import`) turns any file's params, renamed to ours, into the model's tree.
"""
from __future__ import annotations

import math
import re
import zipfile
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from kswap_jax import paths, trees, workdir
from kswap_jax.errors import UserError

VISION_TRANSFORMER = "vision_transformer"
BIG_VISION = "big_vision"
# Both layouts come from models trained with flax.linen.gelu, whose default is the tanh
# approximation (vision_transformer vit_jax/models_vit.py MlpBlock, big_vision models/vit.py):
# a model that loads them computes with it, unless its config sets model.gelu.
GELU = "tanh"

# vision_transformer name -> our name, applied in order to every key.
_VIT_RENAMES = (
    (re.compile(r"^Transformer/posembed_input/pos_embedding$"), "pos_embedding"),
    (re.compile(r"^(Transformer/encoderblock_\d+)/MultiHeadDotProductAttention_1/"),
     r"\1/MultiHeadDotProductAttention_0/"),
    (re.compile(r"^(Transformer/encoderblock_\d+)/LayerNorm_2/"), r"\1/LayerNorm_1/"),
    (re.compile(r"^(Transformer/encoderblock_\d+)/MlpBlock_3/"), r"\1/MlpBlock_0/"),
)
_SCANNED = "Transformer/encoderblock/"
_MAX_LISTED = 5


def read_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an `.npz` file (a local path or a URL, `kswap_jax.paths`) by key."""
  target = paths.of(path)
  if not target.is_file():
    raise UserError(f"pretrained checkpoint not found: {path}")
  try:
    with target.open("rb") as raw:
      f = np.load(raw, allow_pickle=False)
      if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
      with f:
        return {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise UserError(f"could not read pretrained checkpoint {path} as .npz "
                    f"({type(e).__name__}: {e}); give a .npz file of ViT params") from None


def detect_format(keys: Iterable[str]) -> str:
  """VISION_TRANSFORMER if the keys use its names, else BIG_VISION."""
  vit = re.compile(r"(^|/)(posembed_input|MultiHeadDotProductAttention_1|MlpBlock_3)/")
  return VISION_TRANSFORMER if any(vit.search(k) for k in keys) else BIG_VISION


def _strip_params_prefix(flat: dict[str, Any]) -> dict[str, Any]:
  """Drops a `params/` prefix shared by all keys."""
  if flat and all(k.startswith("params/") for k in flat):
    return {k[len("params/"):]: v for k, v in flat.items()}
  return flat


def _vit_name(key: str) -> str:
  for pattern, repl in _VIT_RENAMES:
    key = pattern.sub(repl, key)
  return key


def _unscan(flat: dict[str, Any]) -> dict[str, Any]:
  """`Transformer/encoderblock/X` (depth, ...) -> `Transformer/encoderblock_{i}/X` (...)."""
  out = {}
  for k, v in flat.items():
    if k.startswith(_SCANNED):
      for i, block in enumerate(v):
        out[f"Transformer/encoderblock_{i}/{k[len(_SCANNED):]}"] = block
    else:
      out[k] = v
  return out


def class_rows(num_tokens: int) -> int:
  """1 if a position embedding of `num_tokens` rows has a class row, else 0.

  Patch grids are square (images are), and N and 1+N are never both squares for N > 0.
  """
  return 0 if math.isqrt(num_tokens) ** 2 == num_tokens else 1


def _fold_class_row(flat: dict[str, Any]) -> dict[str, Any]:
  """pos_embedding (1, 1+N, D) with a class row -> (1, N, D); the row is added to cls (1, 1, D)."""
  pos, cls = flat.get("pos_embedding"), flat.get("cls")
  if pos is None or cls is None or pos.ndim != 3 or not class_rows(pos.shape[1]):
    return flat
  out = dict(flat, pos_embedding=pos[:, 1:])
  if cls.shape == pos[:, :1].shape:
    out["cls"] = (cls.astype(np.float32) + pos[:, :1].astype(np.float32)).astype(cls.dtype)
  return out


def _add_class_row(flat: dict[str, Any]) -> dict[str, Any]:
  """pos_embedding (1, N, D) -> (1, 1+N, D) with a zero class row (the same function)."""
  pos = flat.get("pos_embedding")
  if pos is None or pos.ndim != 3 or class_rows(pos.shape[1]):
    return flat
  return dict(flat, pos_embedding=np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1))


def resample_posemb(posemb: np.ndarray, num_tokens: int) -> np.ndarray:
  """Bilinear resize of a square grid of position embeddings: (1, N, D) -> (1, num_tokens, D)."""
  old, new = math.isqrt(posemb.shape[1]), math.isqrt(num_tokens)
  if old * old != posemb.shape[1] or new * new != num_tokens:
    raise UserError(f"cannot resample position embeddings from {posemb.shape[1]} to {num_tokens} "
                    "tokens: only square patch grids are supported; use square images")
  grid = jnp.asarray(posemb[0], jnp.float32).reshape(old, old, -1)
  grid = jax.image.resize(grid, (new, new, grid.shape[-1]), method="bilinear")
  return np.asarray(grid).reshape(1, num_tokens, -1).astype(posemb.dtype)


def _matcher(dont_load: Iterable[str]) -> Callable[[str], bool]:
  """Full-match of a name against any of the regexes."""
  patterns = trees.compile_patterns(dont_load, "init.dont_load")
  return lambda name: any(p.fullmatch(name) for p in patterns)


def select_head_rows(flat: dict[str, Any], rows: Sequence[int]) -> dict[str, Any]:
  """head/kernel (D, K) and head/bias (K,) -> the outputs `rows`, in that order: (D, len(rows))."""
  rows = np.asarray(rows, dtype=np.int64)
  return dict(flat, **{k: np.take(flat[k], rows, axis=-1)
                       for k in ("head/kernel", "head/bias") if k in flat})


def _adapt_head(flat: dict[str, Any], init: dict[str, Any], head_rows: Sequence[int],
                head_total: int) -> dict[str, Any]:
  """Drops pre_logits absent from the model; a head of another shape keeps the rows
  `head_rows` if it has exactly `head_total` outputs, else gives way to the initial head."""
  out = dict(flat)
  if not any(k.startswith("pre_logits/") for k in init):
    dropped = [k for k in out if k.startswith("pre_logits/")]
    for k in dropped:
      del out[k]
    if dropped:
      logging.info("load_pretrained: dropping pre_logits (the model has no representation layer)")
  heads = [k for k in init if k.startswith("head/")]
  if not any(k in out and np.shape(out[k]) != np.shape(init[k]) for k in heads):
    return out
  kernel, want = np.shape(out.get("head/kernel")), np.shape(init.get("head/kernel"))
  if (len(head_rows) and len(kernel) == 2 and kernel[-1] == head_total
      and (kernel[0], len(head_rows)) == want):
    logging.info("load_pretrained: keeping %d of the checkpoint head's %d outputs",
                 len(head_rows), head_total)
    return select_head_rows(out, head_rows)
  logging.info("load_pretrained: keeping the initial head: checkpoint head/kernel %s vs model %s",
               kernel, want)
  out.update({k: init[k] for k in heads})
  return out


def _shape(s) -> str:
  return "(" + ",".join(map(str, s)) + ")"


def _listed(names: list[str]) -> str:
  more = len(names) - _MAX_LISTED
  return ", ".join(names[:_MAX_LISTED]) + (f" ... and {more} more" if more > 0 else "")


def _check_fit(path: str, fmt: str, flat: dict[str, Any], init: dict[str, Any],
               file_key: dict[str, str]) -> None:
  """Raises a one-line UserError naming missing, unexpected and mis-shaped params."""
  missing = sorted(k for k in init if k not in flat)
  unexpected = sorted(file_key.get(k, k) for k in flat if k not in init)
  mismatched = sorted(f"{k}: file {_shape(np.shape(flat[k]))} vs model {_shape(np.shape(v))}"
                      for k, v in init.items() if k in flat and np.shape(flat[k]) != np.shape(v))
  problems = [f"{label}: {_listed(names)}" for label, names in (
      ("missing in file", missing), ("unexpected in file", unexpected),
      ("shape mismatch", mismatched)) if names]
  if problems:
    raise UserError(f"pretrained checkpoint {path} ({fmt} format) does not fit the model: "
                    f"{'; '.join(problems)}; change the model variant to match the checkpoint "
                    "or keep initial values with dont_load regexes")


def load_pretrained(path: str, init_params: Any, dont_load: Iterable[str] = (), *,
                    head_rows: Sequence[int] = (), head_total: int = 0) -> Any:
  """Pretrained params from a ViT `.npz` file, shaped like `init_params` (see `fit`).

  path: a vision_transformer/AugReg or big_vision `.npz` file.
  """
  raw = _strip_params_prefix(read_npz(path))
  fmt = detect_format(raw)
  file_key = {(_vit_name(k) if fmt == VISION_TRANSFORMER else k): k for k in raw}
  flat = _unscan({k: raw[v] for k, v in file_key.items()})
  return fit(path, fmt, _add_class_row(flat), init_params, file_key, dont_load,
             head_rows=head_rows, head_total=head_total)


def fit(path: str, fmt: str, flat: dict[str, Any], init_params: Any,
        file_key: dict[str, str], dont_load: Iterable[str] = (), *,
        head_rows: Sequence[int] = (), head_total: int = 0) -> Any:
  """A checkpoint's params, under our '/'-joined names, as a tree like `init_params`.

  Args:
    path, fmt: the file and its layout (for messages).
    flat: our name -> array; `pos_embedding` (1, 1+N, D) holds the class token's row.
    init_params: params of the target `ViT` (structure, shapes, dtypes and fallback values).
    file_key: our name -> the file's name, for messages.
    dont_load: regexes; params whose 'a/b/leaf' name fully matches one keep their initial value.
    head_rows, head_total: a head of another shape with exactly `head_total` outputs keeps the
      outputs `head_rows`, in that order (the label space's classes as ids of the dataset the
      head was trained on); any other head of another shape keeps its initial value.

  Returns:
    A tree like `init_params` (same dtypes). The class row is folded into `cls` unless the model
    has one (`model.class_posemb`); pre_logits absent from the model are dropped; position
    embeddings are resized bilinearly to the model's grid.
  """
  skip = _matcher(dont_load)
  init = trees.flatten(init_params)
  pos_init = init.get("pos_embedding")
  rows = class_rows(pos_init.shape[1]) if pos_init is not None else 0
  if not rows:
    flat = _fold_class_row(flat)
  flat = {k: v for k, v in flat.items() if not skip(k)}
  flat.update({k: v for k, v in init.items() if skip(k)})
  flat = _adapt_head(flat, init, head_rows, head_total)
  pos = flat.get("pos_embedding")
  if (pos is not None and pos_init is not None and pos.ndim == 3 and pos.shape[0] == 1
      and pos.shape[1] != pos_init.shape[1] and pos.shape[2] == pos_init.shape[2]):
    logging.info("load_pretrained: resampling pos_embedding %s -> %s", pos.shape, pos_init.shape)
    flat["pos_embedding"] = np.concatenate(
        [pos[:, :rows], resample_posemb(pos[:, rows:], pos_init.shape[1] - rows)], axis=1)
  _check_fit(path, fmt, flat, init, file_key)
  loaded = {k: jnp.asarray(flat[k], dtype=v.dtype) for k, v in init.items()}
  return trees.unflatten(loaded)


def save_npz(path: str, params: Any) -> None:
  """Writes params as a big_vision-layout `.npz` ('/'-joined keys), atomically.

  bfloat16 leaves are stored as float32 (numpy has no portable bfloat16 format).
  """
  flat = {k: np.asarray(jax.device_get(v)) for k, v in trees.flatten(params).items()}
  flat = {k: v.astype(np.float32) if v.dtype == jnp.bfloat16 else v
          for k, v in flat.items()}
  with workdir.atomic_file(path, "wb") as f:
    np.savez(f, **flat)
