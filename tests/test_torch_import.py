"""PyTorch checkpoint import (`kswap_jax.torch_import`) against independent reference models.

The GS-LoRA face ViT (the model of `benchmarks/step_speed_torch.py`) and a torchvision-layout ViT
(built here) are made in PyTorch with tiny sizes and random weights, saved, imported, and their
logits compared with ours. timm-layout state dicts (`.safetensors` and `.pth`) are checked
against a plain-numpy forward; the `.safetensors` path needs no PyTorch.
"""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import special

from kswap_jax import builders, npz, torch_import
from kswap_jax.errors import UserError
from kswap_jax.models import vit
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")

IMAGE, PATCH, CLASSES = 8, 2, 5
WIDTH, DEPTH, MLP, HEADS = 32, 2, 64, 2  # Nano
TOL = dict(atol=2e-4, rtol=2e-4)


def _images(n=3, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


def _ours(path, **model):
  """Our tiny ViT with `model` settings, its params loaded from `path`: images -> logits."""
  cfg = ml_collections.ConfigDict(dict(variant=f"Nano/{PATCH}", num_classes=CLASSES, **model))
  m = vit.make_model(cfg)
  init = vit.init_params(m, jax.random.key(0), (IMAGE, IMAGE, 3))
  params = torch_import.load_pretrained(str(path), init)
  return lambda images: np.asarray(m.apply({"params": params}, jnp.asarray(images)))


# ---------------------------------------------------------------- PyTorch reference models


def _torch():
  return pytest.importorskip("torch")


def _face_vit(torch):
  """The structure of GS-LoRA's `ViT_face` (vit_pytorch_face/vit_face.py) at tiny sizes, without
  LoRA (`benchmarks/step_speed_torch.py`): images -> the embedding."""
  if BENCHMARKS not in sys.path:
    sys.path.insert(0, BENCHMARKS)
  import step_speed_torch  # pylint: disable=g-import-not-at-top
  return step_speed_torch.face_vit(torch, image=IMAGE, patch=PATCH, width=WIDTH, depth=DEPTH,
                                   heads=HEADS, mlp=MLP, classes=CLASSES, dropout=0.0, rank=0)


def _torchvision_vit(torch):
  """torchvision `VisionTransformer` names and ops (nn.MultiheadAttention) at tiny sizes."""
  nn = torch.nn

  class EncoderBlock(nn.Module):
    def __init__(self):
      super().__init__()
      self.ln_1 = nn.LayerNorm(WIDTH, eps=1e-6)
      self.self_attention = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
      self.ln_2 = nn.LayerNorm(WIDTH, eps=1e-6)
      self.mlp = nn.Sequential(nn.Linear(WIDTH, MLP), nn.GELU(), nn.Dropout(0.0),
                               nn.Linear(MLP, WIDTH), nn.Dropout(0.0))

    def forward(self, x):
      y = self.ln_1(x)
      x = x + self.self_attention(y, y, y, need_weights=False)[0]
      return x + self.mlp(self.ln_2(x))

  class Encoder(nn.Module):
    def __init__(self):
      super().__init__()
      self.pos_embedding = nn.Parameter(torch.randn(1, (IMAGE // PATCH) ** 2 + 1, WIDTH))
      self.layers = nn.Sequential()
      for i in range(DEPTH):
        self.layers.add_module(f"encoder_layer_{i}", EncoderBlock())
      self.ln = nn.LayerNorm(WIDTH, eps=1e-6)

    def forward(self, x):
      return self.ln(self.layers(x + self.pos_embedding))

  class VisionTransformer(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv_proj = nn.Conv2d(3, WIDTH, PATCH, PATCH)
      self.class_token = nn.Parameter(torch.randn(1, 1, WIDTH))
      self.encoder = Encoder()
      self.heads = nn.Sequential()
      self.heads.add_module("head", nn.Linear(WIDTH, CLASSES))

    def forward(self, img):
      x = self.conv_proj(img).flatten(2).transpose(1, 2)
      x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], 1)
      return self.heads(self.encoder(x)[:, 0])

  return VisionTransformer()


def _randomize(torch, module):
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.5 * torch.randn_like(p))
  return module.eval()


def _torch_logits(torch, module, images):
  with torch.no_grad():
    return module(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


FACE = dict(gelu="exact", attention_scale="width", layernorm_eps=1e-5, qkv_bias=False)


@pytest.mark.parametrize("class_posemb", [True, False])
def test_gs_lora_face_vit_matches_the_authors_structure(tmp_path, class_posemb):
  torch = _torch()
  torch.manual_seed(0)
  ref = _randomize(torch, _face_vit(torch))
  path = tmp_path / "Backbone_VIT_checkpoint.pth"
  torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)  # DataParallel
  assert torch_import.detect_format(str(path), torch_import.read_state(str(path))) == \
      torch_import.GS_LORA_FACE
  images = _images()
  want = _torch_logits(torch, ref, images) @ ref.loss.weight.detach().numpy().T  # linear head
  np.testing.assert_allclose(_ours(path, **FACE, class_posemb=class_posemb)(images), want,
                             **TOL)
  head_scaled = _ours(path, **{**FACE, "attention_scale": "head"})(images)
  assert not np.allclose(head_scaled, want, **TOL)  # the width scale is what matches


def test_gs_lora_face_defaults_come_from_the_file(tmp_path):
  torch = _torch()
  path = tmp_path / "face.pth"
  torch.save(_face_vit(torch).state_dict(), path)
  assert builders.pretrained_defaults(str(path)) == torch_import.MODEL_DEFAULTS[
      torch_import.GS_LORA_FACE]
  assert builders.pretrained_defaults(str(path))["attention_scale"] == "width"


def test_lora_factors_refused(tmp_path):
  torch = _torch()
  state = _face_vit(torch).state_dict()
  state["transformer.layers.0.1.fn.fn.net.0.lora_A"] = torch.zeros(8, WIDTH)
  path = tmp_path / "forgot.pth"
  torch.save(state, path)
  with pytest.raises(UserError, match="LoRA factors"):
    _ours(path, **FACE)


@pytest.mark.parametrize("legacy_mlp_names", [False, True])
def test_torchvision_layout_matches_torch(tmp_path, legacy_mlp_names):
  torch = _torch()
  torch.manual_seed(1)
  ref = _randomize(torch, _torchvision_vit(torch))
  state = ref.state_dict()
  if legacy_mlp_names:  # torchvision's released vit_b_16 weights name the MLP linear_1/linear_2
    state = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
             for k, v in state.items()}
  path = tmp_path / "vit_tv.pth"
  torch.save(state, path)
  assert builders.pretrained_defaults(str(path)) == {"gelu": "exact"}
  images = _images(seed=2)
  np.testing.assert_allclose(_ours(path, gelu="exact")(images),
                             _torch_logits(torch, ref, images), **TOL)


# ---------------------------------------------------------------- timm layout, no PyTorch


def _timm_state(seed=3, classes=CLASSES, scale=0.5):
  """A timm-named ViT state dict of random float32 arrays N(0, scale^2)."""
  rng = np.random.default_rng(seed)
  r = lambda *s: (scale * rng.normal(size=s)).astype(np.float32)  # noqa: E731
  sd = {"patch_embed.proj.weight": r(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": r(WIDTH),
        "cls_token": r(1, 1, WIDTH), "pos_embed": r(1, (IMAGE // PATCH) ** 2 + 1, WIDTH),
        "norm.weight": r(WIDTH), "norm.bias": r(WIDTH), "head.weight": r(classes, WIDTH),
        "head.bias": r(classes)}
  for i in range(DEPTH):
    b = f"blocks.{i}."
    sd.update({b + "norm1.weight": r(WIDTH), b + "norm1.bias": r(WIDTH),
               b + "attn.qkv.weight": r(3 * WIDTH, WIDTH), b + "attn.qkv.bias": r(3 * WIDTH),
               b + "attn.proj.weight": r(WIDTH, WIDTH), b + "attn.proj.bias": r(WIDTH),
               b + "norm2.weight": r(WIDTH), b + "norm2.bias": r(WIDTH),
               b + "mlp.fc1.weight": r(MLP, WIDTH), b + "mlp.fc1.bias": r(MLP),
               b + "mlp.fc2.weight": r(WIDTH, MLP), b + "mlp.fc2.bias": r(WIDTH)})
  return sd


def _np_timm_logits(sd, images):
  """Plain-numpy (float64) forward of a timm-named ViT state dict: (B, H, W, C) -> (B, K)."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}

  def ln(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * sd[name + ".weight"] + sd[name + ".bias"]

  def lin(x, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]

  b, h, w, c = images.shape
  p = PATCH
  x = images.astype(np.float64).reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 5, 2, 4).reshape(b, -1, c * p * p)  # (C, p, p) as the conv weight
  x = x @ sd["patch_embed.proj.weight"].reshape(WIDTH, -1).T + sd["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, WIDTH)), x], 1) + sd["pos_embed"]
  for i in range(DEPTH):
    blk = f"blocks.{i}."
    qkv = lin(ln(x, blk + "norm1"), blk + "attn.qkv").reshape(b, -1, 3, HEADS, WIDTH // HEADS)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(WIDTH // HEADS)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, -1, WIDTH)
    x = x + lin(o, blk + "attn.proj")
    y = lin(ln(x, blk + "norm2"), blk + "mlp.fc1")
    x = x + lin(0.5 * y * (1 + special.erf(y / np.sqrt(2))), blk + "mlp.fc2")
  return lin(ln(x, "norm")[:, 0], "head")


def _save_safetensors(path, sd):
  st = pytest.importorskip("safetensors.numpy")
  st.save_file(sd, str(path))
  return path


def test_timm_safetensors_matches_numpy_reference(tmp_path):
  sd = _timm_state()
  path = _save_safetensors(tmp_path / "vit_timm.safetensors", sd)
  images = _images(seed=4)
  want = _np_timm_logits(sd, images)
  exact = _ours(path, gelu="exact")(images)
  np.testing.assert_allclose(exact, want, **TOL)
  tanh = _ours(path, gelu="tanh")(images)  # the reference tells the two GELUs apart
  assert np.abs(tanh - want).max() > 10 * np.abs(exact - want).max()


def test_timm_pth_matches_numpy_reference(tmp_path):
  torch = _torch()
  sd = _timm_state(seed=5)
  path = tmp_path / "vit_timm.pth"
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, path)
  images = _images(seed=6)
  np.testing.assert_allclose(_ours(path, gelu="exact")(images), _np_timm_logits(sd, images),
                             **TOL)


def test_unknown_names_reported_with_the_files_names(tmp_path):
  sd = _timm_state()
  sd["blocks.0.ls1.gamma"] = np.ones(WIDTH, np.float32)  # LayerScale: not in our ViT
  path = _save_safetensors(tmp_path / "ls.safetensors", sd)
  with pytest.raises(UserError, match=r"unexpected in file: blocks\.0\.ls1\.gamma"):
    _ours(path)


def test_not_a_vit_state_dict(tmp_path):
  path = _save_safetensors(tmp_path / "x.safetensors", {"conv1.weight": np.zeros((2, 2))})
  with pytest.raises(UserError, match="not a ViT state dict"):
    torch_import.load_pretrained(str(path), {})


# ---------------------------------------------------------------- head rows, missing extra


def test_imagenet_head_cut_to_the_chosen_classes(tmp_path):
  """A 1000-output head and 5 chosen classes: exactly those rows, in label-space order."""
  sd = _timm_state(classes=1000)
  path = str(_save_safetensors(tmp_path / "in1k.safetensors", sd))
  rows = [999, 3, 500, 0, 42]
  m = vit.ViT(num_classes=len(rows), **vit.get_variant(f"Nano/{PATCH}"))
  init = vit.init_params(m, jax.random.key(0), (IMAGE, IMAGE, 3))
  params = torch_import.load_pretrained(path, init, head_rows=rows, head_total=1000)
  np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]),
                                sd["head.weight"][rows].T)
  np.testing.assert_array_equal(np.asarray(params["head"]["bias"]), sd["head.bias"][rows])
  # A head over another label space (here 1000 rows, but 1001 classes named) is not cut.
  kept = torch_import.load_pretrained(path, init, head_rows=rows, head_total=1001)
  np.testing.assert_array_equal(np.asarray(kept["head"]["kernel"]),
                                np.asarray(init["head"]["kernel"]))


def test_select_head_rows_numpy():
  kernel = np.arange(4 * 1000, dtype=np.float32).reshape(4, 1000)
  bias = np.arange(1000, dtype=np.float32)
  out = npz.select_head_rows({"head/kernel": kernel, "head/bias": bias}, [7, 2, 999])
  np.testing.assert_array_equal(out["head/kernel"], np.stack([kernel[:, 7], kernel[:, 2],
                                                              kernel[:, 999]], 1))
  np.testing.assert_array_equal(out["head/bias"], [7.0, 2.0, 999.0])


def test_missing_torch_names_the_extra(tmp_path, monkeypatch):
  path = tmp_path / "w.pth"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(UserError, match=r"needs the 'torch' package.*kswap_jax\[torch\]"):
    torch_import.read_state(str(path))


def test_missing_safetensors_names_the_extra(tmp_path, monkeypatch):
  path = tmp_path / "w.safetensors"
  path.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "safetensors", None)
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(UserError, match=r"needs the 'safetensors' package.*kswap_jax\[torch\]"):
    torch_import.read_state(str(path))


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_safetensors_export_reads_back_as_the_same_params(tmp_path, qkv_bias):
  """`kswap export --format safetensors` (timm names) and the timm import are inverses."""
  from kswap_jax import export, trees  # pylint: disable=g-import-not-at-top
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  cfg = ml_collections.ConfigDict(dict(variant=f"Nano/{PATCH}", num_classes=CLASSES,
                                       qkv_bias=qkv_bias))
  m = vit.make_model(cfg)
  init = vit.init_params(m, jax.random.key(0), (IMAGE, IMAGE, 3))
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), init)
  flat = {k: np.asarray(v) for k, v in trees.flatten(params).items()}
  path = tmp_path / "model.safetensors"
  safetensors_numpy.save_file(export.timm_state_dict(flat, class_posemb=False), str(path))
  back = trees.flatten(torch_import.load_pretrained(str(path), init))
  assert sorted(back) == sorted(flat)
  for k, v in flat.items():
    np.testing.assert_allclose(np.asarray(back[k]), v, rtol=1e-6, atol=1e-6, err_msg=k)
