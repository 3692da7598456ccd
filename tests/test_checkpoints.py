"""Tests of kswap_jax.npz: vision_transformer and big_vision `.npz` files."""

import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from kswap_jax import npz
from kswap_jax.errors import UserError
from kswap_jax.models import vit

IMAGE = (8, 8, 3)
PATCH = 2
# our name fragment -> vision_transformer (pre-Linen) name fragment
_TO_VIT = (("MultiHeadDotProductAttention_0/", "MultiHeadDotProductAttention_1/"),
           ("LayerNorm_1/", "LayerNorm_2/"), ("MlpBlock_0/", "MlpBlock_3/"))


def _model(num_classes=10, rep=None, gelu="exact"):
  return vit.ViT(num_classes=num_classes, representation_size=rep, gelu=gelu,
                 **vit.get_variant(f"Nano/{PATCH}"))


@functools.cache
def _init(num_classes=10, rep=None, image=IMAGE):
  """Initial params (cached: tests only read them)."""
  return vit.init_params(_model(num_classes, rep), jax.random.key(0), image)


@functools.cache
def _random_params(num_classes=10, rep=None):
  """Params with every leaf random (the initial head is all zeros)."""
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: jnp.asarray(0.5 * rng.normal(size=x.shape), x.dtype),
                      _init(num_classes, rep))


def _flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def _vit_flat(params, class_row):
  """Our params in the vision_transformer layout, class row prepended to the pos embedding."""
  out = {}
  for k, v in _flat(params).items():
    if k == "pos_embedding":
      k, v = "Transformer/posembed_input/pos_embedding", np.concatenate([class_row, v], axis=1)
    for ours, theirs in _TO_VIT:
      k = k.replace(ours, theirs)
    out[k] = v
  return out


def _write(path, flat):
  np.savez(path, **flat)
  return str(path)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _layer_norm(x, w, name):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * w[f"{name}/scale"] + w[f"{name}/bias"]


def _reference_logits(w, images, gelu="exact"):
  """Plain-numpy (float64) ViT forward on a vision_transformer-layout dict: (B,H,W,C) -> (B,K)."""
  w = {k: v.astype(np.float64) for k, v in w.items()}
  b, h, wd, c = images.shape
  p = PATCH
  x = images.astype(np.float64).reshape(b, h // p, p, wd // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
  x = x @ w["embedding/kernel"].reshape(p * p * c, -1) + w["embedding/bias"]
  cls = np.broadcast_to(w["cls"], (b, 1, x.shape[-1]))
  x = np.concatenate([cls, x], axis=1) + w["Transformer/posembed_input/pos_embedding"]
  depth = 0
  while f"Transformer/encoderblock_{depth}/LayerNorm_0/scale" in w:
    blk = f"Transformer/encoderblock_{depth}/"
    att = blk + "MultiHeadDotProductAttention_1/"
    y = _layer_norm(x, w, blk + "LayerNorm_0")
    q, k, v = (np.einsum("btd,dhk->bthk", y, w[f"{att}{n}/kernel"]) + w[f"{att}{n}/bias"]
               for n in ("query", "key", "value"))
    s = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqs,bshk->bqhk", a, v)
    x = x + np.einsum("bqhk,hkd->bqd", o, w[att + "out/kernel"]) + w[att + "out/bias"]
    y = _layer_norm(x, w, blk + "LayerNorm_2")
    y = y @ w[blk + "MlpBlock_3/Dense_0/kernel"] + w[blk + "MlpBlock_3/Dense_0/bias"]
    if gelu == "exact":
      y = 0.5 * y * (1 + special.erf(y / np.sqrt(2)))
    else:  # the tanh approximation of flax.linen.gelu
      y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    x = x + y @ w[blk + "MlpBlock_3/Dense_1/kernel"] + w[blk + "MlpBlock_3/Dense_1/bias"]
    depth += 1
  assert depth == 2
  x = _layer_norm(x, w, "Transformer/encoder_norm")[:, 0]
  if "pre_logits/kernel" in w:
    x = np.tanh(x @ w["pre_logits/kernel"] + w["pre_logits/bias"])
  return x @ w["head/kernel"] + w["head/bias"]


@pytest.mark.parametrize("rep, gelu", [(None, "exact"), (16, "exact"), (None, "tanh")])
def test_vision_transformer_file_matches_reference_forward(tmp_path, rep, gelu):
  model = _model(rep=rep, gelu=gelu)
  class_row = np.random.default_rng(0).normal(size=(1, 1, 32)).astype(np.float32)
  w = _vit_flat(_random_params(rep=rep), class_row)
  path = _write(tmp_path / "vit.npz", w)
  assert npz.detect_format(w) == npz.VISION_TRANSFORMER

  params = npz.load_pretrained(path, _init(rep=rep))
  images = np.random.default_rng(1).normal(size=(3, *IMAGE)).astype(np.float32)
  got = model.apply({"params": params}, jnp.asarray(images))
  want = _reference_logits(w, images, gelu)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  other = _reference_logits(w, images, "tanh" if gelu == "exact" else "exact")
  assert not np.allclose(other, want, atol=1e-4, rtol=1e-4)  # this tolerance tells them apart


def test_big_vision_round_trip(tmp_path):
  params = _random_params()
  path = str(tmp_path / "sub" / "bv.npz")
  npz.save_npz(path, params)
  assert npz.detect_format(np.load(path).files) == npz.BIG_VISION
  _assert_trees_equal(npz.load_pretrained(path, _init()), params)


def test_big_vision_params_prefix_and_scanned_blocks(tmp_path):
  params = _random_params()
  flat = _flat(params)
  scanned = {}
  for k, v in flat.items():
    if k.startswith("Transformer/encoderblock_0/"):
      rest = k[len("Transformer/encoderblock_0/"):]
      scanned["Transformer/encoderblock/" + rest] = np.stack(
          [v, flat["Transformer/encoderblock_1/" + rest]])
    elif not k.startswith("Transformer/encoderblock_"):
      scanned[k] = v
  path = _write(tmp_path / "bv.npz", {"params/" + k: v for k, v in scanned.items()})
  _assert_trees_equal(npz.load_pretrained(path, _init()), params)


def test_load_casts_to_init_dtype_and_save_writes_float32(tmp_path):
  path = str(tmp_path / "bf16.npz")
  npz.save_npz(path, jax.tree.map(lambda x: x.astype(jnp.bfloat16), _random_params()))
  assert all(v.dtype == np.float32 for v in np.load(path).values())
  init = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _init())
  loaded = npz.load_pretrained(path, init)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded))


def test_posemb_resampled_to_new_grid(tmp_path):
  flat = _flat(_random_params())
  row = np.arange(32, dtype=np.float32)
  flat["pos_embedding"] = np.broadcast_to(row, (1, 16, 32)).copy()  # constant 4x4 grid
  path = _write(tmp_path / "bv.npz", flat)
  pos = npz.load_pretrained(path, _init(image=(16, 16, 3)))["pos_embedding"]
  assert pos.shape == (1, 64, 32)
  np.testing.assert_allclose(np.asarray(pos), np.broadcast_to(row, (1, 64, 32)), atol=1e-5)


def test_posemb_class_row_folded_into_cls_before_resampling(tmp_path):
  params = _random_params()
  class_row = np.full((1, 1, 32), 3.0, np.float32)
  path = _write(tmp_path / "vit.npz", _vit_flat(params, class_row))
  loaded = npz.load_pretrained(path, _init(image=(16, 16, 3)))
  assert loaded["pos_embedding"].shape == (1, 64, 32)
  np.testing.assert_allclose(np.asarray(loaded["cls"]), np.asarray(params["cls"]) + 3.0)


def test_resample_posemb_rejects_non_square_grid():
  with pytest.raises(UserError, match="square"):
    npz.resample_posemb(np.zeros((1, 16, 4), np.float32), 32)


def test_head_kept_from_init_when_class_count_differs(tmp_path):
  params = _random_params(num_classes=10)
  path = _write(tmp_path / "bv.npz", _flat(params))
  init = _init(num_classes=5)
  loaded = npz.load_pretrained(path, init)
  _assert_trees_equal(loaded["head"], init["head"])
  _assert_trees_equal(loaded["Transformer"], params["Transformer"])


def test_dont_load_keeps_init_head_when_shapes_match(tmp_path):
  params = _random_params()
  path = _write(tmp_path / "bv.npz", _flat(params))
  init = _init()
  loaded = npz.load_pretrained(path, init, dont_load=("head/.*",))
  _assert_trees_equal(loaded["head"], init["head"])
  _assert_trees_equal(loaded["embedding"], params["embedding"])


def test_dont_load_allows_names_absent_from_file(tmp_path):
  flat = _flat(_random_params())
  del flat["pos_embedding"]
  init = _init()
  loaded = npz.load_pretrained(_write(tmp_path / "bv.npz", flat), init,
                                       dont_load=("pos_embedding",))
  _assert_trees_equal(loaded["pos_embedding"], init["pos_embedding"])


def test_pre_logits_dropped_when_model_has_none(tmp_path):
  params = _random_params(rep=16)
  path = _write(tmp_path / "vit.npz", _vit_flat(params, np.zeros((1, 1, 32), np.float32)))
  init = _init()
  loaded = npz.load_pretrained(path, init)
  assert "pre_logits" not in loaded
  _assert_trees_equal(loaded["head"], init["head"])  # its input width was the pre_logits width


def _bv_file(tmp_path, edit):
  flat = _flat(_random_params())
  edit(flat)
  return _write(tmp_path / "bv.npz", flat)


@pytest.mark.parametrize("edit, expected", [
    (lambda f: f.update(extra=np.zeros(3)), "unexpected in file: extra"),
    (lambda f: f.pop("Transformer/encoder_norm/scale"),
     "missing in file: Transformer/encoder_norm/scale"),
    (lambda f: f.update({"Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias": np.zeros(7)}),
     "Transformer/encoderblock_0/MlpBlock_0/Dense_0/bias: file (7) vs model (64)"),
])
def test_mismatch_raises_user_error_naming_param(tmp_path, edit, expected):
  with pytest.raises(UserError) as e:
    npz.load_pretrained(_bv_file(tmp_path, edit), _init())
  assert expected in str(e.value)
  assert "\n" not in str(e.value)


def test_vision_transformer_unexpected_name_reported_as_in_file(tmp_path):
  flat = _vit_flat(_random_params(), np.zeros((1, 1, 32), np.float32))
  flat["Transformer/encoderblock_0/MlpBlock_3/Dense_2/bias"] = np.zeros(3)
  with pytest.raises(UserError, match="unexpected in file: .*MlpBlock_3/Dense_2/bias"):
    npz.load_pretrained(_write(tmp_path / "vit.npz", flat), _init())


def test_long_name_lists_truncated(tmp_path):
  path = _bv_file(tmp_path, lambda f: f.update({f"extra_{i}": np.zeros(1) for i in range(9)}))
  with pytest.raises(UserError, match=r"\.\.\. and 4 more"):
    npz.load_pretrained(path, _init())


def test_missing_file(tmp_path):
  path = str(tmp_path / "nope.npz")
  with pytest.raises(UserError, match=f"pretrained checkpoint not found: {path}"):
    npz.load_pretrained(path, _init())


def test_unreadable_file(tmp_path):
  path = tmp_path / "bad.npz"
  path.write_text("not an archive")
  with pytest.raises(UserError, match="could not read pretrained checkpoint"):
    npz.load_pretrained(str(path), _init())


def test_invalid_dont_load_regex(tmp_path):
  path = _bv_file(tmp_path, lambda f: None)
  with pytest.raises(UserError, match="dont_load regex"):
    npz.load_pretrained(path, _init(), dont_load=("head/(",))


def test_a_npz_init_computes_with_the_tanh_gelu(tmp_path):
  """AugReg / big_vision files were trained with the tanh GELU: a model that starts from one
  uses it, unless the config sets model.gelu."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from kswap_jax import builders  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "vit.npz")
  npz.save_npz(path, _random_params(num_classes=10))
  config = ml_collections.ConfigDict(dict(
      seed=0, model=dict(variant=f"Nano/{PATCH}", dropout=0.0),
      data=dict(dataset="sklearn_digits", train_split="train", data_dir="", image_size=8,
                channels=3, image_key="image", label_key="label"),
      init=dict(checkpoint=path, dataset="sklearn_digits", classes="0-9")))
  _, model_cfg, _ = builders.initial_model(config, path)
  assert model_cfg.gelu == "tanh" and vit.make_model(model_cfg).gelu == "tanh"
  config.model.gelu = "exact"
  assert builders.initial_model(config, path)[1].gelu == "exact"


def _digits_config(path, classes="0-9", **model):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      seed=0, model=dict(variant=f"Nano/{PATCH}", dropout=0.0, **model),
      data=dict(dataset="sklearn_digits", train_split="train", data_dir="", image_size=8,
                channels=3, image_key="image", label_key="label"),
      init=dict(checkpoint=path, dataset="sklearn_digits", classes=classes)))


def test_head_over_the_whole_dataset_keeps_the_chosen_rows(tmp_path):
  """A 10-output digits head and classes "7,3,0": head rows 7, 3, 0 in that order."""
  from kswap_jax import builders  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "vit.npz")
  w = _random_params(num_classes=10)
  npz.save_npz(path, w)
  params, model_cfg, labels = builders.initial_model(_digits_config(path, "7,3,0"), path)
  assert model_cfg.num_classes == 3 and [c for _, c, _ in labels.entries] == [7, 3, 0]
  kernel, bias = np.asarray(w["head"]["kernel"]), np.asarray(w["head"]["bias"])
  np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]),
                                np.stack([kernel[:, 7], kernel[:, 3], kernel[:, 0]], axis=1))
  np.testing.assert_array_equal(np.asarray(params["head"]["bias"]), bias[[7, 3, 0]])


def test_head_over_another_label_space_is_not_cut(tmp_path):
  """12 outputs for a 10-class dataset: not its label ids; the initial head is kept."""
  from kswap_jax import builders  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "vit.npz")
  npz.save_npz(path, _random_params(num_classes=12))
  params, _, _ = builders.initial_model(_digits_config(path, "7,3,0"), path)
  np.testing.assert_array_equal(np.asarray(params["head"]["kernel"]), 0.0)


def test_class_posemb_model_keeps_or_gains_the_class_row(tmp_path):
  """A vision_transformer file into a model whose pos_embedding covers the class token: the
  row is kept (not folded); a big_vision file gets a zero row; both compute the same logits
  as the folded model."""
  model = vit.ViT(num_classes=10, class_posemb=True, **vit.get_variant(f"Nano/{PATCH}"))
  init = vit.init_params(model, jax.random.key(0), IMAGE)
  assert init["pos_embedding"].shape == (1, 17, 32)
  class_row = np.random.default_rng(0).normal(size=(1, 1, 32)).astype(np.float32)
  w = _vit_flat(_random_params(), class_row)
  params = npz.load_pretrained(_write(tmp_path / "vit.npz", w), init)
  np.testing.assert_array_equal(np.asarray(params["pos_embedding"]),
                                w["Transformer/posembed_input/pos_embedding"])
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, *IMAGE)), jnp.float32)
  folded = npz.load_pretrained(str(tmp_path / "vit.npz"), _init())
  np.testing.assert_allclose(model.apply({"params": params}, images),
                             _model().apply({"params": folded}, images), atol=1e-5)
  npz.save_npz(str(tmp_path / "bv.npz"), _random_params())
  bv = npz.load_pretrained(str(tmp_path / "bv.npz"), init)
  np.testing.assert_array_equal(np.asarray(bv["pos_embedding"])[:, 0], 0.0)
  np.testing.assert_allclose(model.apply({"params": bv}, images),
                             _model().apply({"params": _random_params()}, images), atol=1e-5)


@pytest.mark.parametrize("field, value, match", [
    ("attention_scale", "dim", "attention_scale"), ("layernorm_eps", 0.0, "layernorm_eps"),
    ("qkv_bias", "no", "qkv_bias"), ("class_posemb", 1, "class_posemb")])
def test_bad_model_fields_refused(field, value, match):
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({"variant": "Nano/2", "num_classes": 2, field: value})
  with pytest.raises(UserError, match=match):
    vit.make_model(cfg)


def test_exported_model_without_the_new_fields_loads_with_todays_model(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from kswap_jax import builders, checkpoints  # pylint: disable=g-import-not-at-top
  old = ml_collections.ConfigDict(dict(variant=f"Nano/{PATCH}", num_classes=10, dropout=0.0,
                                       dtype="float32", attention="einsum"))
  checkpoints.export_model(str(tmp_path / "model"), _random_params(), old,
                           [["sklearn_digits", c, str(c)] for c in range(10)])
  params, model_cfg, _ = builders.initial_model(_digits_config(""), str(tmp_path / "model"))
  m = vit.make_model(model_cfg)
  assert (m.attention_scale, m.layernorm_eps, m.qkv_bias, m.class_posemb) == (
      "head", 1e-6, True, False)
  images = jnp.zeros((1, *IMAGE))
  np.testing.assert_array_equal(m.apply({"params": params}, images),
                                _model().apply({"params": _random_params()}, images))
