"""The command line for users: help, list-valued config arguments, one checkpoint argument
name, `kswap eval` and `kswap export` (npz round trip, timm-named safetensors)."""
import glob
import os
import re
import subprocess
import sys

import chex
import ml_collections
import numpy as np
import pytest
from scipy.special import erf

from kswap_jax import checkpoints, cli, config_lib, export, npz, runner
from kswap_jax.errors import UserError
from kswap_jax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "kswap_jax", *args], capture_output=True,
                        text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_help_lists_every_job_and_exits_0():
  out = _cli("--help")
  assert out.returncode == 0, out.stderr
  for job in cli.JOBS:
    assert re.search(rf"^  {job}\s+\S", out.stdout, re.M), out.stdout
  assert _cli("-h").stdout == out.stdout
  bare = _cli()
  assert bare.returncode == 2 and "swap" in bare.stderr


def test_job_help_lists_flags_its_configs_and_their_defaults():
  out = _cli("swap", "--help")
  assert out.returncode == 0, out.stderr
  for flag in ("--config", "--workdir", "--multihost", "--config.FIELD"):
    assert flag in out.stdout
  assert "configs/swap_digits.py" in out.stdout and "order='lbf'" in out.stdout
  assert "forget_digits" not in out.stdout
  text = cli.job_help("forget")
  assert "configs/forget_digits.py" in text and "swap_digits" not in text
  assert "--model" in cli.job_help("export") and "--format" in cli.job_help("export")


def test_every_config_declares_its_job_and_arguments():
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
    _, consts = cli._module_doc(path)  # pylint: disable=protected-access
    assert consts.get("JOB") in cli.JOBS, path
    assert "runlocal" in cli.config_args(path), path


def test_list_valued_arguments_parse():
  a = config_lib.parse_arg("classes=0-4,7,runlocal,seed=2", classes="0-9", runlocal=False,
                           seed=0)
  assert (a.classes, a.runlocal, a.seed) == ("0-4,7", True, 2)
  with pytest.raises(UserError, match="unknown config argument '7'"):
    config_lib.parse_arg("runlocal,7", classes="0-9", runlocal=False)
  c = config_lib.load(os.path.join(ROOT, "configs", "pretrain_digits.py"), "classes=0-4,7,runlocal")
  assert c.data.classes == "0-4,7" and c.model.variant == "Nano/2"


def test_one_name_for_the_checkpoint_argument():
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
    assert "ckpt" not in cli.config_args(path), path
  files = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "configs", "*.py")),
           *glob.glob(os.path.join(ROOT, "tpu_scripts", "*"))]
  for f in files:
    with open(f) as fh:
      assert "ckpt=" not in fh.read(), f
  c = config_lib.load(os.path.join(ROOT, "configs", "dispose_cifar10.py"), "checkpoint=/x.npz")
  assert c.init.checkpoint == "/x.npz"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A finished runlocal pretrain run on digits 0-4: (workdir, config, results)."""
  c = config_lib.load(os.path.join(ROOT, "configs", "pretrain_digits.py"),
                      "runlocal,classes=0-4")
  c.data.fraction = 0.15
  d = str(tmp_path_factory.mktemp("pre") / "run")
  return d, c, runner.run("pretrain", c, d)


def test_eval_reproduces_the_jobs_table(pretrained, tmp_path):
  d, c, results = pretrained
  out = runner.evaluate("pretrain", c, os.path.join(d, "model"), str(tmp_path))
  assert out["test_accuracy"] == results["test_accuracy"]
  assert out["per_class"] == results["per_class"]
  assert os.path.exists(tmp_path / "eval.json")
  # a workdir without an exported model: its latest checkpoint's model
  os.rename(os.path.join(d, "model"), os.path.join(d, "model_aside"))
  try:
    again = runner.evaluate("pretrain", c, d, str(tmp_path / "ckpt"))
  finally:
    os.rename(os.path.join(d, "model_aside"), os.path.join(d, "model"))
  assert again["test_accuracy"] == results["test_accuracy"]


def test_eval_cli_and_bad_model(pretrained, tmp_path):
  d, _, results = pretrained
  out = _cli("eval", "--model", d, "--config", "configs/pretrain_digits.py:runlocal,classes=0-4",
             "--config.data.fraction=0.15", "--workdir", str(tmp_path))
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"{results['test_accuracy']:.2f}" in out.stdout
  bad = _cli("eval", "--model", str(tmp_path / "nothing"), "--config",
             "configs/pretrain_digits.py:runlocal,classes=0-4")
  assert bad.returncode == 2 and "no exported model" in bad.stderr


def test_export_npz_round_trip(pretrained, tmp_path):
  d, _, _ = pretrained
  params, meta = checkpoints.load_model(d)
  export.export(d, "npz", str(tmp_path / "m.npz"))
  back = npz.load_pretrained(str(tmp_path / "m.npz"), params)
  chex.assert_trees_all_close(back, params, atol=0)


def _timm_forward(t: dict, images: np.ndarray, heads: int, eps: float) -> np.ndarray:
  """timm ViT forward in numpy on exported tensors: images (B, H, W, C) -> logits (B, K)."""
  w = t["patch_embed.proj.weight"]  # (D, C, p, p)
  d, _, p, _ = w.shape
  b, h, wd, c = images.shape
  patches = images.reshape(b, h // p, p, wd // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  x = patches.reshape(b, -1, c * p * p) @ w.reshape(d, -1).T + t["patch_embed.proj.bias"]
  x = np.concatenate([np.broadcast_to(t["cls_token"], (b, 1, d)), x], 1) + t["pos_embed"]

  def ln(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]

  i = 0
  while f"blocks.{i}.norm1.weight" in t:
    k = f"blocks.{i}."
    qkv = ln(x, k + "norm1") @ t[k + "attn.qkv.weight"].T + t[k + "attn.qkv.bias"]
    q, kk, v = (a.reshape(b, -1, heads, d // heads).transpose(0, 2, 1, 3)
                for a in np.split(qkv, 3, -1))
    s = q @ kk.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
    s = np.exp(s - s.max(-1, keepdims=True))
    a = (s / s.sum(-1, keepdims=True)) @ v
    x = x + a.transpose(0, 2, 1, 3).reshape(b, -1, d) @ t[k + "attn.proj.weight"].T \
        + t[k + "attn.proj.bias"]
    y = ln(x, k + "norm2") @ t[k + "mlp.fc1.weight"].T + t[k + "mlp.fc1.bias"]
    y = 0.5 * y * (1 + erf(y / np.sqrt(2)))
    x = x + y @ t[k + "mlp.fc2.weight"].T + t[k + "mlp.fc2.bias"]
    i += 1
  return ln(x, "norm")[:, 0] @ t["head.weight"].T + t["head.bias"]


def test_export_safetensors_has_timm_names_and_computes_our_model(pretrained, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  d, _, _ = pretrained
  params, meta = checkpoints.load_model(d)
  export.export(d, "safetensors", str(tmp_path / "m.safetensors"))
  t = load_file(str(tmp_path / "m.safetensors"))
  cfg = ml_collections.ConfigDict(meta["model"])
  model = vit.make_model(cfg)
  depth, width = model.depth, model.width
  assert t["patch_embed.proj.weight"].shape == (width, 1, 2, 2)
  assert t["cls_token"].shape == (1, 1, width) and t["pos_embed"].shape == (1, 17, width)
  assert t["blocks.0.attn.qkv.weight"].shape == (3 * width, width)
  assert t["blocks.0.mlp.fc1.weight"].shape == (model.mlp_dim, width)
  assert t["head.weight"].shape == (5, width)
  assert {k for k in t if k.startswith(f"blocks.{depth - 1}.")} == {
      f"blocks.{depth - 1}.{n}" for n in (
          "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
          "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
          "mlp.fc2.weight", "mlp.fc2.bias")}
  images = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
  ours = np.asarray(model.apply({"params": params}, images))
  theirs = _timm_forward(t, images, model.num_heads, model.layernorm_eps)
  np.testing.assert_allclose(theirs, ours, atol=2e-4, rtol=1e-4)


def test_export_refuses_a_bad_format(pretrained):
  with pytest.raises(UserError, match="--format"):
    export.export(pretrained[0], "onnx", "/tmp/x")
