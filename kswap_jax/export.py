"""Writes an exported model (`checkpoints.export_model`: params with any LoRA already merged)
as a file other tools read (`kswap export`):

  npz          big_vision layout, '/'-joined param names (`npz.save_npz`); `npz.load_pretrained`
               and big_vision read it back
  safetensors  timm ViT names and layouts (`timm_state_dict`), for
               `timm.create_model(..., pretrained_cfg_overlay=dict(file=PATH))` or
               `load_state_dict(safetensors.numpy.load_file(PATH))`
"""
from __future__ import annotations

import re

import numpy as np

from kswap_jax import checkpoints, npz, trees, workdir
from kswap_jax.errors import UserError

FORMATS = ("npz", "safetensors")


def export(model: str, fmt: str, out: str) -> None:
  """Writes the exported model in `model` (a model directory or a workdir) to `out`."""
  if fmt not in FORMATS:
    raise UserError(f"--format={fmt!r}; use one of {FORMATS}")
  params, meta = checkpoints.load_model(model)
  flat = {k: np.asarray(v) for k, v in trees.flatten(params).items()}
  if any(re.search(r"(^|/)lora(/|$)|/[AB]$", k) for k in flat):
    raise UserError(f"the model in {model} holds LoRA factors; export a released (merged) model")
  if fmt == "npz":
    npz.save_npz(out, params)
  else:
    from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
    tensors = timm_state_dict(flat, meta["model"].get("class_posemb", False))
    with workdir.atomic_file(out, "wb") as f:
      f.write(save(tensors, metadata={"format": "pt", "source": "kswap_jax"}))
  print(f"wrote {out} ({fmt}, {len(flat)} params of {model})", flush=True)


def timm_state_dict(flat: dict[str, np.ndarray], class_posemb: bool) -> dict[str, np.ndarray]:
  """Our flat ViT params ('/' paths) -> timm `VisionTransformer` tensors (float32, contiguous).

  Dense kernels (in, out) become torch Linear weights (out, in); the patch conv (p, p, C, D)
  becomes (D, C, p, p); query/key/value (D, H, D/H) fuse into attn.qkv (3D, D); the position
  embedding gets a zero class-token row unless `class_posemb` (then it has one already).
  """
  f = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  d = f["cls"].shape[-1]
  pos = f["pos_embedding"]
  if not class_posemb:
    pos = np.concatenate([np.zeros((1, 1, d), np.float32), pos], axis=1)
  out = {"patch_embed.proj.weight": f["embedding/kernel"].transpose(3, 2, 0, 1),
         "patch_embed.proj.bias": f["embedding/bias"], "cls_token": f["cls"], "pos_embed": pos,
         "norm.weight": f["Transformer/encoder_norm/scale"],
         "norm.bias": f["Transformer/encoder_norm/bias"]}
  if "head/kernel" in f:
    out["head.weight"] = f["head/kernel"].T
    if "head/bias" in f:
      out["head.bias"] = f["head/bias"]
  blocks = sorted({int(m.group(1)) for k in f
                   if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))})
  for i in blocks:
    b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
    attn = b + "MultiHeadDotProductAttention_0/"
    qkv = [f[f"{attn}{n}/kernel"].reshape(d, d).T for n in ("query", "key", "value")]
    out.update({
        t + "norm1.weight": f[b + "LayerNorm_0/scale"], t + "norm1.bias": f[b + "LayerNorm_0/bias"],
        t + "attn.qkv.weight": np.concatenate(qkv),
        t + "attn.proj.weight": f[attn + "out/kernel"].reshape(d, d).T,
        t + "attn.proj.bias": f[attn + "out/bias"],
        t + "norm2.weight": f[b + "LayerNorm_1/scale"], t + "norm2.bias": f[b + "LayerNorm_1/bias"],
        t + "mlp.fc1.weight": f[b + "MlpBlock_0/Dense_0/kernel"].T,
        t + "mlp.fc1.bias": f[b + "MlpBlock_0/Dense_0/bias"],
        t + "mlp.fc2.weight": f[b + "MlpBlock_0/Dense_1/kernel"].T,
        t + "mlp.fc2.bias": f[b + "MlpBlock_0/Dense_1/bias"]})
    if f"{attn}query/bias" in f:
      out[t + "attn.qkv.bias"] = np.concatenate(
          [f[f"{attn}{n}/bias"].reshape(d) for n in ("query", "key", "value")])
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
