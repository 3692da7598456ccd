"""Bad input through the CLI: exit code 2, one `kswap JOB: error: ...` line naming the problem,
and the workdir left as it was (no config.json, no pretraining)."""
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = ("pretrain", "--config", "configs/pretrain_digits.py:runlocal")
SWAP = ("swap", "--config", "configs/swap_digits.py:runlocal")
FOLDER = ("--config.data.dataset=folder:{tmp}/images", "--config.data.classes=0-1",
          "--config.data.channels=1")


def _images(tmp):
  """{tmp}/images: train/ and test/, classes a and b of four 8x8 grey PNGs each."""
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for c in ("a", "b"):
      os.makedirs(os.path.join(tmp, "images", split, c))
      for i in range(4):
        Image.fromarray(rng.integers(0, 255, (8, 8), np.uint8)).save(
            os.path.join(tmp, "images", split, c, f"{i}.png"))


def _empty_class(tmp):
  _images(tmp)
  for i in range(4):
    os.remove(os.path.join(tmp, "images", "train", "b", f"{i}.png"))


def _not_an_image(tmp):
  _images(tmp)
  with open(os.path.join(tmp, "images", "train", "a", "1.png"), "wb") as f:
    f.write(b"not an image")


def _file(tmp):
  with open(os.path.join(tmp, "file"), "w") as f:
    f.write("a file, not a folder")


def _corrupt_model(tmp):
  os.makedirs(os.path.join(tmp, "model", "params"))
  with open(os.path.join(tmp, "model", "model.json"), "w") as f:
    json.dump({"model": {}, "classes": []}, f)


def _case(name, args, *messages, setup=None, workdir="{tmp}/w", before_pretraining=False):
  return pytest.param(args, messages, setup, workdir, before_pretraining, id=name)


CASES = [
    _case("field_typo", (*PRETRAIN, "--config.train.lrr=1"),
          "unknown config field 'train.lrr'", "did you mean one of: train.lr"),
    _case("missing_config_file", ("pretrain", "--config", "configs/nope.py"),
          "config file 'configs/nope.py' not found"),
    _case("batch_size_0", (*PRETRAIN, "--config.train.batch_size=0"), "train.batch_size=0"),
    _case("batch_size_negative", (*PRETRAIN, "--config.train.batch_size=-4"),
          "train.batch_size=-4"),
    _case("lr_0", (*PRETRAIN, "--config.train.lr=0"), "train.lr=0"),
    _case("lr_negative", (*PRETRAIN, "--config.train.lr=-1"), "train.lr=-1"),
    _case("image_size_0", (*PRETRAIN, "--config.data.image_size=0"), "data.image_size=0"),
    _case("eval_batch_size_0", (*PRETRAIN, "--config.data.eval_batch_size=0"),
          "data.eval_batch_size=0"),
    _case("epochs_0", (*PRETRAIN, "--config.train.epochs=0"), "train.epochs=0"),
    _case("config_argument_type", ("pretrain", "--config", "configs/pretrain_digits.py:seed=abc"),
          "config argument seed='abc' must be of type int"),
    _case("lora_rank_0", (*SWAP, "--config.lora.rank=0"), "lora.rank=0"),
    _case("folder_empty_class", (*PRETRAIN, *FOLDER), "{tmp}/images/train/b",
          setup=_empty_class),
    _case("folder_not_an_image", (*PRETRAIN, *FOLDER), "{tmp}/images/train/a/1.png",
          setup=_not_an_image),
    # Refused by the runner before it writes to the workdir:
    _case("workdir_is_a_file", PRETRAIN, "{tmp}/file", setup=_file, workdir="{tmp}/file"),
    _case("workdir_under_a_file", PRETRAIN, "{tmp}/file", setup=_file,
          workdir="{tmp}/file/sub"),
    _case("workdir_cannot_be_created", PRETRAIN, "/proc/kswap_no/such",
          workdir="/proc/kswap_no/such"),
    _case("corrupt_init_checkpoint", (*SWAP, "--config.init.checkpoint={tmp}/model"),
          "{tmp}/model", setup=_corrupt_model),
    _case("sweep_member_wrong_type", ("sweep", "--config", "configs/sweep_swap_digits.py:runlocal",
                                      '--config.members=({"train.lr": "abc"},)'),
          "train.lr", "abc"),
    _case("learn_set_unknown_dataset", (*SWAP, "--config.sets.learn.dataset=nope_dataset"),
          "unknown dataset 'nope_dataset'", before_pretraining=True),
]


def _snapshot(path):
  """{relative path: sha256} of every file under `path` (or of `path` itself), None if absent."""
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return {".": hashlib.sha256(f.read()).hexdigest()}
  out = {}
  for d, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(d, name), "rb") as f:
        out[os.path.relpath(os.path.join(d, name), path)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.mark.parametrize("args, messages, setup, workdir, before_pretraining", CASES)
def test_bad_input_is_one_error_line_and_leaves_the_workdir(tmp_path, args, messages, setup,
                                                           workdir, before_pretraining):
  fill = lambda s: s.replace("{tmp}", str(tmp_path))  # noqa: E731
  if setup:
    setup(str(tmp_path))
  workdir = fill(workdir)
  before = _snapshot(workdir)
  env = {**os.environ, "PYTHONPATH": ROOT, "TFDS_DATA_DIR": str(tmp_path / "tfds")}
  out = subprocess.run([sys.executable, "-m", "kswap_jax", *map(fill, args), "--workdir", workdir],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert out.returncode == 2, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert errors[0].startswith(f"kswap {args[0]}: error: "), errors[0]
  for m in map(fill, messages):
    assert m in errors[0]
  if before is None:
    assert not os.path.exists(workdir) or not os.listdir(workdir), os.listdir(workdir)
  else:
    assert _snapshot(workdir) == before
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  if before_pretraining:  # refused before the pretraining stage began (its header line)
    assert not re.search(r"^pretrain:", out.stdout, re.M), out.stdout[-3000:]
