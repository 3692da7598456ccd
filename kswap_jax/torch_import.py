"""PyTorch ViT checkpoints (`.pth` / `.pt` state dicts, `.safetensors`) into a `models.vit.ViT`.

Three layouts, told apart by their names:

  gs_lora_face: the GS-LoRA face ViT (bjzhb666/GS-LoRA vit_pytorch_face/vit_face.py, `ViT_face`):
    `patch_to_embedding` (a Linear over (p1 p2 c)-flattened patches), `cls_token`,
    `pos_embedding` (1, 1+N, D), `transformer.layers.{i}.{0,1}.fn.{norm,fn}` with a bias-free
    `to_qkv`, `to_out.0`, `net.0` / `net.3`; `mlp_head.0` (the final LayerNorm); `loss.weight`
    (K, D), the CosFace / Softmax class centres (`loss.bias` for Softmax only).
  torchvision (`torchvision.models.VisionTransformer`): `conv_proj`, `class_token`,
    `encoder.pos_embedding` (1, 1+N, D), `encoder.layers.encoder_layer_{i}.{ln_1,
    self_attention.in_proj_*, self_attention.out_proj, ln_2, mlp.0 | mlp.linear_1, mlp.3 |
    mlp.linear_2}`, `encoder.ln`, `heads.head` [`heads.pre_logits`].
  timm (`timm.models.vision_transformer.VisionTransformer`): `patch_embed.proj`, `cls_token`,
    `pos_embed` (1, 1+N, D), `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
    mlp.fc2}`, `norm`, `head` [`pre_logits.fc`].

Linear weights (out, in) become kernels (in, out); a fused qkv (3 I, D) splits into
query/key/value kernels (D, heads, I/heads); conv patch kernels (D, C, p, p) become (p, p, C, D).
`npz.fit` then folds the class row, fits the head and resamples position embeddings.
Reading `.pth` needs PyTorch and `.safetensors` the `safetensors` package: the `torch` extra.
"""
from __future__ import annotations

import importlib
import io
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from kswap_jax import npz, paths, trees
from kswap_jax.errors import UserError

SUFFIXES = (".pth", ".pt", ".safetensors")
GS_LORA_FACE = "gs_lora_face"
TORCHVISION = "torchvision"
TIMM = "timm"
_INSTALL = "pip install 'kswap_jax[torch]'"

# Model settings each layout was trained with; a config's model.* values override them.
MODEL_DEFAULTS = {
    # vit_pytorch_face/vit_face.py: nn.GELU() (line 331) is the exact GELU; nn.LayerNorm(dim)
    # (lines 319, 499) keeps torch's eps 1e-5; scale = dim ** -0.5 (line 346); to_qkv has
    # bias=False (line 354); pos_embedding (1, num_patches + 1, dim) (line 486).
    GS_LORA_FACE: dict(gelu="exact", layernorm_eps=1e-5, attention_scale="width", qkv_bias=False,
                       class_posemb=True),
    # nn.GELU (exact), LayerNorm eps 1e-6, head_dim ** -0.5, qkv biases: our defaults otherwise.
    TORCHVISION: dict(gelu="exact"),
    TIMM: dict(gelu="exact"),
}

_BLOCK = r"(\d+)"
# Per layout: (module-name regex, our name ('{}' = block index), converter kind).
_LAYOUTS = {
    GS_LORA_FACE: (
        (r"patch_to_embedding", "embedding", "patch_linear"),
        (r"cls_token", "cls", "param"),
        (r"pos_embedding", "pos_embedding", "param"),
        (rf"transformer\.layers\.{_BLOCK}\.0\.fn\.norm", "LayerNorm_0", "norm"),
        (rf"transformer\.layers\.{_BLOCK}\.0\.fn\.fn\.to_qkv", "MultiHeadDotProductAttention_0",
         "qkv"),
        (rf"transformer\.layers\.{_BLOCK}\.0\.fn\.fn\.to_out\.0",
         "MultiHeadDotProductAttention_0/out", "out"),
        (rf"transformer\.layers\.{_BLOCK}\.1\.fn\.norm", "LayerNorm_1", "norm"),
        (rf"transformer\.layers\.{_BLOCK}\.1\.fn\.fn\.net\.0", "MlpBlock_0/Dense_0", "dense"),
        (rf"transformer\.layers\.{_BLOCK}\.1\.fn\.fn\.net\.3", "MlpBlock_0/Dense_1", "dense"),
        (r"mlp_head\.0", "Transformer/encoder_norm", "norm"),
        (r"loss", "head", "dense"),
    ),
    TORCHVISION: (
        (r"conv_proj", "embedding", "patch_conv"),
        (r"class_token", "cls", "param"),
        (r"encoder\.pos_embedding", "pos_embedding", "param"),
        (rf"encoder\.layers\.encoder_layer_{_BLOCK}\.ln_1", "LayerNorm_0", "norm"),
        (rf"encoder\.layers\.encoder_layer_{_BLOCK}\.self_attention",
         "MultiHeadDotProductAttention_0", "qkv"),
        (rf"encoder\.layers\.encoder_layer_{_BLOCK}\.self_attention\.out_proj",
         "MultiHeadDotProductAttention_0/out", "out"),
        (rf"encoder\.layers\.encoder_layer_{_BLOCK}\.ln_2", "LayerNorm_1", "norm"),
        # mlp.linear_1 / linear_2: the names of torchvision's older releases (MLPBlock version 1).
        (rf"encoder\.layers\.encoder_layer_{_BLOCK}\.mlp\.(?:0|linear_1)", "MlpBlock_0/Dense_0",
         "dense"),
        (rf"encoder\.layers\.encoder_layer_{_BLOCK}\.mlp\.(?:3|linear_2)", "MlpBlock_0/Dense_1",
         "dense"),
        (r"encoder\.ln", "Transformer/encoder_norm", "norm"),
        (r"heads\.pre_logits", "pre_logits", "dense"),
        (r"heads\.head", "head", "dense"),
    ),
    TIMM: (
        (r"patch_embed\.proj", "embedding", "patch_conv"),
        (r"cls_token", "cls", "param"),
        (r"pos_embed", "pos_embedding", "param"),
        (rf"blocks\.{_BLOCK}\.norm1", "LayerNorm_0", "norm"),
        (rf"blocks\.{_BLOCK}\.attn\.qkv", "MultiHeadDotProductAttention_0", "qkv"),
        (rf"blocks\.{_BLOCK}\.attn\.proj", "MultiHeadDotProductAttention_0/out", "out"),
        (rf"blocks\.{_BLOCK}\.norm2", "LayerNorm_1", "norm"),
        (rf"blocks\.{_BLOCK}\.mlp\.fc1", "MlpBlock_0/Dense_0", "dense"),
        (rf"blocks\.{_BLOCK}\.mlp\.fc2", "MlpBlock_0/Dense_1", "dense"),
        (r"norm", "Transformer/encoder_norm", "norm"),
        (r"pre_logits\.fc", "pre_logits", "dense"),
        (r"head", "head", "dense"),
    ),
}
# A state dict's leaf name -> ours, by converter kind (torch.nn.MultiheadAttention's fused
# projection is `in_proj_weight` / `in_proj_bias`).
_LEAVES = {"weight": "weight", "bias": "bias", "in_proj_weight": "weight",
           "in_proj_bias": "bias"}
_SIGNATURES = {GS_LORA_FACE: re.compile(r"^(patch_to_embedding\.|transformer\.layers\.)"),
               TORCHVISION: re.compile(r"^(conv_proj\.|encoder\.layers\.encoder_layer_)"),
               TIMM: re.compile(r"^(patch_embed\.proj\.|blocks\.\d+\.)")}


def _import(module: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise UserError(f"reading {what} needs the {module.split('.')[0]!r} package, which is not "
                    f"installed; run: {_INSTALL}") from None


def read_state(path: str) -> dict[str, np.ndarray]:
  """The arrays of a `.pth` / `.pt` / `.safetensors` state dict by name, as float32 numpy.

  A state dict nested under 'state_dict' or 'model' and a 'module.' prefix on every name
  (torch.nn.DataParallel) are unwrapped.
  """
  target = paths.of(path)
  if not target.is_file():
    raise UserError(f"pretrained checkpoint not found: {path}")
  # A local file is read in place; a bucket's is read into memory first.
  source = os.fspath(target) if not paths.is_url(path) else io.BytesIO(target.read_bytes())
  if path.endswith(".safetensors"):
    st = _import("safetensors.numpy", "a .safetensors checkpoint")
    try:
      state = st.load_file(source) if isinstance(source, str) else st.load(source.getvalue())
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"could not read {path} as .safetensors ({type(e).__name__}: "
                      f"{str(e)[:160]}); give a safetensors file of ViT weights") from None
  else:
    torch = _import("torch", "a .pth / .pt checkpoint")
    try:
      obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f"could not read {path} as a PyTorch state dict ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160]}); give a torch.save'd state dict of ViT "
                      "weights") from None
    for key in ("state_dict", "model"):
      if isinstance(obj, dict) and isinstance(obj.get(key), dict):
        obj = obj[key]
    if not isinstance(obj, dict):
      raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict; save the "
                      "model's state_dict() instead of the model")
    state = {k: v.detach().float().numpy() for k, v in obj.items() if torch.is_tensor(v)}
  state = {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in state.items()}
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module."):]: v for k, v in state.items()}
  return state


def detect_format(path: str, keys: Iterable[str]) -> str:
  """GS_LORA_FACE, TORCHVISION or TIMM from a state dict's names."""
  keys = list(keys)
  for fmt, signature in _SIGNATURES.items():
    if any(signature.match(k) for k in keys):
      return fmt
  raise UserError(f"{path} is not a ViT state dict this library reads (names such as "
                  f"{keys[:3]}); give a torchvision, timm or GS-LoRA face ViT checkpoint")


def _split_heads(kernel: np.ndarray, heads: int) -> np.ndarray:
  """(D, I) -> (D, heads, I / heads): heads are the major part of torch's (h d) axis."""
  return kernel.reshape(kernel.shape[0], heads, -1)


def _convert(kind: str, leaf: str | None, a: np.ndarray, heads: int,
             channels: int) -> dict[str, np.ndarray]:
  """One state-dict array -> {our leaf path: array} (leaf: 'weight', 'bias' or None)."""
  if kind == "param":
    return {"": a}
  if kind == "norm":
    return {"scale" if leaf == "weight" else "bias": a}
  if leaf == "bias":
    if kind == "qkv":
      return {f"{n}/bias": b.reshape(heads, -1)
              for n, b in zip(("query", "key", "value"), np.split(a, 3))}
    return {"bias": a}
  if kind == "qkv":  # (3 I, D) -> three (D, heads, I / heads)
    return {f"{n}/kernel": _split_heads(w.T, heads)
            for n, w in zip(("query", "key", "value"), np.split(a, 3))}
  if kind == "out":  # (D, I) -> (heads, I / heads, D)
    return {"kernel": a.T.reshape(heads, -1, a.shape[0])}
  if kind == "patch_conv":  # (D, C, p, p) -> (p, p, C, D)
    return {"kernel": a.transpose(2, 3, 1, 0)}
  if kind == "patch_linear":  # (D, p*p*C) over (p1 p2 c)-flattened patches -> (p, p, C, D)
    p = int(round((a.shape[1] / channels) ** 0.5))
    if p * p * channels != a.shape[1]:
      return {"kernel": a.T}  # reported as a shape mismatch
    return {"kernel": a.T.reshape(p, p, channels, a.shape[0])}
  return {"kernel": a.T}  # dense


def to_flat(path: str, fmt: str, state: dict[str, np.ndarray], heads: int,
            channels: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(our name -> array, our name -> the file's name) of a state dict in layout `fmt`.

  Names no rule maps keep their file name (reported as unexpected when they do not fit).
  """
  lora = [k for k in state if re.search(r"(^|\.)lora_[AB]$", k)]
  if lora:
    raise UserError(f"{path} holds LoRA factors ({lora[0]}, ...); import the pretrained "
                    "backbone (trained with --lora_rank 0), not a forgetting run's weights")
  rules = [(re.compile(p), name, kind) for p, name, kind in _LAYOUTS[fmt]]
  flat, file_key = {}, {}
  for key, a in state.items():
    module, _, leaf = key.rpartition(".")
    candidates = [(module, _LEAVES.get(leaf))] if leaf in _LEAVES else []
    candidates.append((key, None))
    for (name, leaf_name), (pattern, ours, kind) in (
        (c, r) for c in candidates for r in rules):
      m = pattern.fullmatch(name)
      if m is None or (kind == "param") != (leaf_name is None):
        continue
      prefix = f"Transformer/encoderblock_{m.group(1)}/{ours}" if m.groups() else ours
      for sub, v in _convert(kind, leaf_name, a, heads, channels).items():
        flat[f"{prefix}/{sub}" if sub else prefix] = v
        file_key[f"{prefix}/{sub}" if sub else prefix] = key
      break
    else:
      flat[key] = a
      file_key[key] = key
  if "head/kernel" in flat and "head/bias" not in flat:  # CosFace class centres have no bias
    flat["head/bias"] = np.zeros(flat["head/kernel"].shape[-1], np.float32)
  return flat, file_key


def model_defaults(path: str) -> dict[str, Any]:
  """The model settings (`MODEL_DEFAULTS`) of the layout of the checkpoint at `path`."""
  return dict(MODEL_DEFAULTS[detect_format(path, read_state(path))])


def load_pretrained(path: str, init_params: Any, dont_load: Iterable[str] = (), *,
                    head_rows: Sequence[int] = (), head_total: int = 0) -> Any:
  """Pretrained params from a PyTorch ViT checkpoint, shaped like `init_params` (`npz.fit`)."""
  state = read_state(path)
  fmt = detect_format(path, state)
  init = trees.flatten(init_params)
  kernel = init["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
  flat, file_key = to_flat(path, fmt, state, heads=kernel.shape[1],
                           channels=init["embedding/kernel"].shape[2])
  return npz.fit(path, fmt, flat, init_params, file_key, dont_load, head_rows=head_rows,
                 head_total=head_total)
