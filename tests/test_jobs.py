"""End-to-end jobs at runlocal size: pretrain, resume, workdir safety, CLI, swap; faults
(divergence, a corrupt newest checkpoint, a second writer, a finished run)."""
import os
import subprocess
import sys

import chex
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from kswap_jax import builders, checkpoints, config_lib, heads, runner, workdir
from kswap_jax import npz as npz_lib
from kswap_jax.data import pipeline
from kswap_jax.errors import UserError
from kswap_jax.methods import swap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg="runlocal"):
  return config_lib.load(os.path.join(ROOT, "configs", name), arg)


def _pretrain_config():
  c = _config("pretrain_digits.py", "runlocal,classes=0-4")
  c.data.fraction = 0.15
  return c


def _quick(*configs):
  """Run-time settings that change no result, for runs whose test resumes nothing: checkpoints
  at the ends of stages only (runlocal saves every 2 steps) and evaluation in batches of 16
  (every evaluation set fills whole padded batches: one compiled shape, not one per set)."""
  for c in configs:
    c.checkpoint.every_steps = 0
    c.data.eval_batch_size = 16


def _fault_config():
  """`_pretrain_config` saving every step, keeping five checkpoints."""
  c = _pretrain_config()
  c.checkpoint.update(every_steps=1, keep=5)
  return c


def _interrupted_run(monkeypatch, config, run_dir: str, at_batch: int) -> None:
  """A pretrain run interrupted (KeyboardInterrupt) when it asks for batch `at_batch`."""
  calls, real = {"n": 0}, pipeline.batch

  def interrupted(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == at_batch:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(pipeline, "batch", interrupted)
  with pytest.raises(KeyboardInterrupt):
    runner.run("pretrain", config, run_dir)
  monkeypatch.setattr(pipeline, "batch", real)


def test_pretrain_end_to_end_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
  full = runner.run("pretrain", _pretrain_config(), str(tmp_path / "a"))
  assert 0 <= full["test_accuracy"] <= 100 and full["steps"] > 4
  assert os.path.exists(tmp_path / "a" / "metrics.jsonl")
  _interrupted_run(monkeypatch, _pretrain_config(), str(tmp_path / "b"), at_batch=4)
  assert checkpoints.Checkpoints(str(tmp_path / "b" / "checkpoints"), 2, 2).latest_step() == 2
  resumed = runner.run("pretrain", _pretrain_config(), str(tmp_path / "b"))
  assert resumed["test_accuracy"] == full["test_accuracy"]
  pa, _ = checkpoints.load_model(str(tmp_path / "a"))
  pb, meta = checkpoints.load_model(str(tmp_path / "b"))
  chex.assert_trees_all_close(pa, pb, atol=1e-6)
  assert [c[2] for c in meta["classes"]] == ["0", "1", "2", "3", "4"]


def test_workdir_with_other_config_is_refused(tmp_path):
  c = _pretrain_config()
  workdir.check_config(str(tmp_path), c)
  c.train.lr = 0.5
  with pytest.raises(UserError, match=r"different config \(fields \['train.lr'\]\)"):
    workdir.check_config(str(tmp_path), c)


def test_workdir_resumes_with_other_run_time_settings(tmp_path):
  c = _pretrain_config()
  workdir.check_config(str(tmp_path), c)
  c.data.cache_images = not c.data.cache_images
  c.data.eval_batch_size += 1
  c.log_every += 1
  workdir.check_config(str(tmp_path), c)  # run-time settings only: accepted
  c.data.image_size += 1
  with pytest.raises(UserError, match=r"\(fields \['data.image_size'\]\)"):
    workdir.check_config(str(tmp_path), c)
  c.data.image_size -= 1
  # A run recorded before a data reading field existed resumes where the field has its default.
  recorded = workdir.read_json(str(tmp_path / "config.json"))
  del recorded["data"]["crop_filter"]
  workdir.write_json(str(tmp_path / "config.json"), recorded)
  workdir.check_config(str(tmp_path), c, record=False)
  c.data.crop_filter = "bilinear"
  with pytest.raises(UserError, match=r"\(fields \['data.crop_filter'\]\)"):
    workdir.check_config(str(tmp_path), c)
  c.data.crop_filter = "antialias"
  c.init.checkpoint = str(tmp_path / "another_model")  # the model a run starts from
  with pytest.raises(UserError, match=r"\(fields \['init.checkpoint'\]\)"):
    workdir.check_config(str(tmp_path), c)
  starts = workdir.read_json(str(tmp_path / "environment.json"))
  assert len(starts) == 2  # one entry per accepted start
  assert starts[-1]["packages"]["jax"] == jax.__version__
  assert starts[-1]["device_count"] == jax.device_count()


def _cli(*args, cwd=ROOT):
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-m", "kswap_jax", *args], capture_output=True,
                        text=True, cwd=cwd, env=env)


@pytest.mark.parametrize("args, message", [
    (["nojob"], "first argument must be a job"),
    (["pretrain", "--config", "configs/pretrain_digits.py:runlocal,bogus=1", "--workdir", "w"],
     "unknown config argument 'bogus'"),
    (["pretrain", "--config", "configs/pretrain_digits.py:runlocal", "--workdir", "{w}",
      "--config.data.classes=0,11"], "data.classes: class ids [11] are out of range 0-9"),
    (["pretrain", "--config", "configs/pretrain_digits.py:runlocal", "--workdir", "{w}",
      "--config.model.variant=Z/2"], "unknown ViT variant 'Z/2'"),
    (["pretrain", "--config", "configs/pretrain_digits.py:runlocal", "--workdir", "{w}",
      "--config.data.dataset=imagenet_nope"], "unknown dataset 'imagenet_nope'"),
    (["pretrain", "--config", "configs/pretrain_digits.py:runlocal", "--workdir", "{w}",
      "--config.host_memory=kept"], "host_memory='kept' is not one of"),
])
def test_cli_bad_input_gives_one_line_error(tmp_path, args, message):
  out = _cli(*[a.replace("{w}", str(tmp_path / "w")) for a in args])
  assert out.returncode == 2, out.stderr[-2000:]
  assert message in out.stderr
  assert len([line for line in out.stderr.splitlines() if "error" in line]) == 1


def test_swap_plan_and_head_growth():
  assert [k for k, _, _ in swap.plan("lbf")] == ["learn", "forget"]
  assert swap.plan("lbf")[1][1] == "retain+learn" and swap.plan("fbl")[0][1] == "retain"
  assert [k for k, _, _ in swap.plan("simultaneous")] == ["swap"]
  assert swap.plan("lbf", "paired") == [("learn", "retain", ("learn",)),
                                        ("forget", "retain", ("learn", "forget"))]
  assert swap.plan("fbl", "paired") == swap.plan("fbl")  # no stage trains on R + L
  with pytest.raises(UserError, match="order='bfl'"):
    swap.plan("bfl")
  with pytest.raises(UserError, match="learn_replay='mixed'"):
    swap.plan("lbf", "mixed")
  params = {"head": {"kernel": np.ones((4, 3), np.float32), "bias": np.ones(3, np.float32)}}
  grown = heads.grow_head(params, 2, jax.random.key(0))
  assert grown["head"]["kernel"].shape == (4, 5)
  np.testing.assert_array_equal(grown["head"]["kernel"][:, :3], 1.0)
  np.testing.assert_array_equal(grown["head"]["bias"], [1, 1, 1, 0, 0])


def test_swap_stage_losses_match_their_formulas():
  from kswap_jax import lora as lora_lib, losses, train
  from kswap_jax.models import vit
  model = vit.ViT(num_classes=4, **vit.get_variant("Nano/2"))
  params = vit.init_params(model, jax.random.key(0), (8, 8, 1))
  net = train.Network(model, lora_scale=0.5)
  lora = jax.tree_util.tree_map(lambda x: x + 0.1,
                                lora_lib.init(jax.random.key(1), params, rank=2))
  rng = np.random.default_rng(0)
  mk = lambda y: {"images": rng.integers(0, 255, (3, 8, 8, 1)).astype(np.uint8),  # noqa: E731
                  "labels": np.array(y, np.int32)}
  batches = {"retain": mk([0, 1, 0]), "forget": mk([2, 2, 2]), "learn": mk([3, 3, 3])}
  hp = dict(learn=1.5, retain_in_learn=0.3, retain=0.7, forget=0.2, bound=3.0, sparse=0.01)
  trainable = {"lora": lora, "params": {}}
  ce = {n: losses.cross_entropy(net.apply(params, lora, b["images"]), b["labels"])
        for n, b in batches.items()}
  s = losses.group_sparse(lora)
  bounded = 0.2 * max(0.0, 3.0 - ce["forget"])
  expect = {  # (kind, the sets it is given) -> the loss
      ("learn", ("learn", "retain")): 1.5 * ce["learn"] + 0.3 * ce["retain"] + 0.01 * s,
      ("forget", ("forget", "retain")): 0.7 * ce["retain"] + bounded + 0.01 * s,
      # LBF's forget stage with learn_replay="paired": L its own weighted term
      ("forget", ("forget", "learn", "retain")):
          1.5 * ce["learn"] + 0.7 * ce["retain"] + bounded + 0.01 * s,
      ("swap", ("forget", "learn", "retain")):
          1.5 * ce["learn"] + 0.7 * ce["retain"] + bounded + 0.01 * s,
  }
  for (kind, names), value in expect.items():
    used = {k: batches[k] for k in names}
    # dropout off (model dropout 0), so train=True equals the eval forward
    loss, _ = swap.stage_loss(net, kind, "block")(trainable, params, hp, used,
                                                   jax.random.key(0))
    np.testing.assert_allclose(loss, value, rtol=1e-5)


@pytest.mark.parametrize("order", ["lbf", "simultaneous"])
def test_swap_digits_runlocal(tmp_path, order):
  c = _config("swap_digits.py", f"runlocal,order={order}")
  c.init.pretrain.data.fraction = 0.15
  for s in ("retain", "forget", "learn"):
    c.sets[s].fraction = 0.2
  _quick(c, c.init.pretrain)
  res = runner.run("swap", c, str(tmp_path))
  kinds = [k for k, _, _ in swap.plan(order)]
  assert [r["after"] for r in res["evals"]] == ["pretrained"] + kinds
  assert all(0 <= r[k] <= 100 for r in res["evals"] for k in ("acc_r", "acc_f", "acc_l"))
  assert len(res["blocks"][kinds[-1]]) == 2
  for f in ("results.json", "accuracy.png", "lora_blocks.png", "model/model.json"):
    assert os.path.exists(tmp_path / f)
  _, meta = checkpoints.load_model(str(tmp_path))
  assert meta["model"]["num_classes"] == 10 and meta["classes"][-1][2] == "9"


def test_swap_starts_from_a_npz_on_the_digits_config(tmp_path):
  """A .npz init.checkpoint on a config that would pretrain: its head's classes and model are
  the pretraining's."""
  from kswap_jax.models import vit  # pylint: disable=g-import-not-at-top
  c = _config("swap_digits.py")
  for s in ("retain", "forget", "learn"):
    c.sets[s].fraction = 0.2
  model = vit.ViT(num_classes=7, **vit.get_variant(c.init.pretrain.model.variant))
  c.init.checkpoint = str(tmp_path / "digits0-6.npz")
  _quick(c)
  npz_lib.save_npz(c.init.checkpoint, vit.init_params(model, jax.random.key(0), (8, 8, 1)))
  res = runner.run("swap", c, str(tmp_path / "run"))
  assert [r["after"] for r in res["evals"]] == ["pretrained", "learn", "forget"]
  assert not os.path.exists(tmp_path / "run" / "pretrain")
  _, meta = checkpoints.load_model(str(tmp_path / "run"))
  assert [e[2] for e in meta["classes"]] == [str(d) for d in range(10)]


def _mock_source_fn(num_classes_per_ds):
  """as_data_source_fn for tfds.testing.mock_data: 3 images per class, controlled labels."""
  def fn(builder, split, *args, **kwargs):
    del args, kwargs
    k = num_classes_per_ds.get(builder.name, 10)
    rng = np.random.default_rng(abs(hash((builder.name, str(split)))) % 2**32)
    return [{"image": rng.integers(0, 255, (20, 24, 3), np.uint8), "label": i % k}
            for i in range(3 * k)]
  return fn


@pytest.mark.parametrize("learn", ["cub", "plants"])
def test_swap_imagenet100_config_on_mock_data(tmp_path, learn):
  c = _config("swap_imagenet100.py", f"runlocal,learn={learn}")
  names = list(tfds.builder("imagenet2012").info.features["label"].names)
  wanted = [names.index(w) for w in config_lib.IMAGENET100[:10]]

  def imagenet_fn(builder, split, *args, **kwargs):
    if builder.name != "imagenet2012":
      return _mock_source_fn({})(builder, split)
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 255, (40, 30, 3), np.uint8), "label": wanted[i % 10]}
            for i in range(40)]

  from kswap_jax.models import vit
  model = vit.ViT(num_classes=10, **vit.get_variant("Nano/8"))
  npz = str(tmp_path / "in100.npz")
  npz_lib.save_npz(npz, vit.init_params(model, jax.random.key(3), (32, 32, 3)))
  c.init.checkpoint = npz
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE,
                              as_data_source_fn=imagenet_fn):
    res = runner.run("swap", c, str(tmp_path / "run"))
  assert [r["after"] for r in res["evals"]] == ["pretrained", "learn", "forget"]


def test_atomic_file_keeps_old_file_on_error_and_uses_umask_permissions(tmp_path):
  path = tmp_path / "results.json"
  old_mask = os.umask(0o027)
  try:
    workdir.write_json(str(path), {"a": 1})
    assert (path.stat().st_mode & 0o777) == 0o640
  finally:
    os.umask(old_mask)
  with pytest.raises(RuntimeError):
    with workdir.atomic_file(str(path)) as f:
      f.write('{"a": 2, "b"')
      raise RuntimeError("interrupted")
  assert workdir.read_json(str(path)) == {"a": 1}
  assert os.listdir(tmp_path) == ["results.json"]  # no temp file left


# --- faults ----------------------------------------------------------------------------

def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  c = _fault_config()
  c.train.lr = 1e10
  c.log_every = 1
  with pytest.raises(UserError, match=r"training diverged at step \d+ of \d+ in stage pretrain"):
    runner.run("pretrain", c, str(tmp_path))
  ckpts = checkpoints.Checkpoints(str(tmp_path / "checkpoints"), 1, 5)
  assert ckpts.latest_step() is not None
  for step in ckpts.manager.all_steps():  # every kept checkpoint holds finite params
    leaves = jax.tree.leaves(ckpts.manager.restore(step, args=ocp.args.Composite(
        default=ocp.args.StandardRestore()))["default"]["trainable"])
    assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
  ckpts.close()
  assert not workdir.finished(str(tmp_path))
  assert not os.path.exists(tmp_path / "model")


def test_a_diverged_study_member_is_marked_and_the_others_finish(tmp_path):
  c = config_lib.load(os.path.join(ROOT, "configs", "sweep_swap_digits.py"),
                      "runlocal,order=simultaneous")
  c.base.init.pretrain.data.fraction = 0.15
  for s in ("retain", "forget", "learn"):
    c.base.sets[s].fraction = 0.2
  c.grid = {}
  c.members = ({"train.lr": 1e-2}, {"train.lr": 1e10})
  c.checkpoint.every_steps = 0
  _quick(c.base, c.base.init.pretrain)
  res = runner.sweep(c, str(tmp_path))
  good, bad = res["members"]
  assert bad.get("diverged") and bad["score"] == -np.inf
  assert not good.get("diverged") and np.isfinite(good["score"])
  assert res["best"] == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(res["trainable"][0]))
  best, meta = checkpoints.load_model(str(tmp_path / "best"))
  assert meta["sweep_member"]["member"] == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(best))


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_before_it(tmp_path,
                                                                               monkeypatch,
                                                                               capsys):
  full = runner.run("pretrain", _fault_config(), str(tmp_path / "a"))
  _interrupted_run(monkeypatch, _fault_config(), str(tmp_path / "b"), at_batch=5)
  ckpt_dir = tmp_path / "b" / "checkpoints"
  assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [1, 2, 3, 4]
  files = [os.path.join(d, f) for d, _, fs in os.walk(ckpt_dir / "4") for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:  # a crash mid-write: the largest data file cut in half
    f.truncate(os.path.getsize(biggest) // 2)
  capsys.readouterr()
  resumed = runner.run("pretrain", _fault_config(), str(tmp_path / "b"))
  out = capsys.readouterr().out
  assert f"checkpoint {ckpt_dir}/4 does not restore" in out
  assert "resuming from step 3: stage pretrain, step 3 of" in out
  assert os.path.isdir(ckpt_dir / "corrupt_4")  # kept aside, not deleted
  assert resumed["test_accuracy"] == full["test_accuracy"]
  pa, _ = checkpoints.load_model(str(tmp_path / "a"))
  pb, _ = checkpoints.load_model(str(tmp_path / "b"))
  chex.assert_trees_all_close(pa, pb, atol=1e-6)
  # a finished run is reported, not trained again
  metrics = (tmp_path / "b" / "metrics.jsonl").read_text()
  again = runner.run("pretrain", _fault_config(), str(tmp_path / "b"))
  assert "has finished" in capsys.readouterr().out
  assert again == resumed and (tmp_path / "b" / "metrics.jsonl").read_text() == metrics


def test_a_second_writer_is_refused_with_one_line(tmp_path):
  c = _fault_config()
  run_dir = str(tmp_path / "run")
  with workdir.lock(workdir.open_dir(run_dir)):
    proc = subprocess.run(
        [sys.executable, "-m", "kswap_jax", "pretrain", "--config",
         "configs/pretrain_digits.py:runlocal,classes=0-4", "--workdir", run_dir,
         "--config.data.fraction=0.15"], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT})
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if "error" in line]
  assert errors == [f"kswap pretrain: error: workdir {run_dir} is in use by another kswap "
                    "process; wait for it to end or give another --workdir"]
  assert os.listdir(run_dir) == []
  assert runner.run("pretrain", c, run_dir)["steps"] > 0  # the lock is free again


@pytest.mark.parametrize("rank, alpha", [(8, 1.0), (4, 2.0)])
def test_network_lora_scale_is_alpha_over_rank(rank, alpha):
  c = _config("swap_digits.py")
  c.lora.update(rank=rank, alpha=alpha)
  model_cfg = ml_collections.ConfigDict(dict(variant="Nano/2", num_classes=3))
  assert builders.network(c, model_cfg).lora_scale == pytest.approx(alpha / rank)
