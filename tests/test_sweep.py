"""Sweeps: each vmapped member equals its single run; chunking; refused keys; pure pieces."""
import json
import os
import subprocess
import sys
from unittest import mock

import chex
import jax
import numpy as np
import pytest
from ml_collections import config_flags

from kswap_jax import lora as lora_lib
from kswap_jax import checkpoints, config_lib, runner, sharding, sweep, trees, workdir
from kswap_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMBERS = ({"train.lr": 1e-2, "weights.forget": 0.2},
           {"train.lr": 3e-3, "weights.forget": 1.0})
ACCS = ("acc_r", "acc_f", "acc_l")


def _config(**overrides):
  c = config_flags.config_flags._LoadConfigModule(  # pylint: disable=protected-access
      "sweep_swap_digits.py", os.path.join(ROOT, "configs", "sweep_swap_digits.py")
  ).get_config("runlocal,order=simultaneous")
  c.base.init.pretrain.data.fraction = 0.15
  for s in ("retain", "forget", "learn"):
    c.base.sets[s].fraction = 0.2
  c.grid = {}
  c.members = MEMBERS
  _quick_settings(c)
  c.update(overrides)
  return c


def _quick_settings(c, eval_batch_size: int = 16):
  """Run-time settings that change no result, for a study, its pretraining and its members'
  single runs: checkpoints at the ends of stages only (runlocal saves every 2 steps; the resume
  test below sets its own) and, unless eval_batch_size is 0, evaluation in batches of that
  size, so that every evaluation set fills whole (padded) batches and each network compiles
  one evaluation shape, not one per set size."""
  for cfg in (c, c.base, c.base.init.pretrain):
    cfg.checkpoint.every_steps = 0
    if eval_batch_size and "data" in cfg:
      cfg.data.eval_batch_size = eval_batch_size


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  d = tmp_path_factory.mktemp("sweep")
  return d, runner.sweep(_config(), str(d))


def test_members_equal_single_runs(swept, tmp_path):
  d, res = swept
  assert [r["member"] for r in res["members"]] == [0, 1]
  for f in ("sweep.json", "pareto.png", "best/model/model.json"):
    assert os.path.exists(d / f)
  pretrained, _ = checkpoints.load_model(str(d / "pretrain"))
  base = _config().base
  base.init.checkpoint = str(d / "pretrain")
  scale = base.lora.alpha / base.lora.rank
  for i, assignment in enumerate(MEMBERS):
    single = runner.run("swap", sweep.member_config(base, assignment), str(tmp_path / str(i)))
    last = single["evals"][-1]
    for k in ACCS:
      assert res["members"][i][k] == pytest.approx(last[k], abs=1e-5), (i, k)
    alone, _ = checkpoints.load_model(str(tmp_path / str(i)))
    t = res["trainable"][i]
    merged = lora_lib.merge(trees.combine(pretrained, t["params"]), t["lora"], scale)
    chex.assert_trees_all_close(merged, alone, atol=1e-5)
  best, meta = checkpoints.load_model(str(d / "best"))
  assert meta["sweep_member"]["member"] == res["best"]
  assert res["best"] == int(np.argmax([r["val_acc_r"] + r["val_acc_l"] - r["val_acc_f"]
                                       for r in res["members"]]))
  assert best["head"]["kernel"].shape[-1] == 10


# Learning rates high enough that the tiny model forgets within a few steps, so validation H
# differs between epochs and the best-LoRA choice matters.
class _Interrupt(Exception):
  pass


FORGET_MEMBERS = ({"weights.beta": 0.5, "weights.bound": 5.0, "weights.w_f": 0.2,
                   "train.lr": 5e-2},
                  {"weights.beta": [0.5, 2.0], "train.lr": 2e-2, "weights.alpha": 1e-2})


def _forget_config():
  c = config_lib.load(os.path.join(ROOT, "configs", "sweep_forget_digits.py"),
                      "runlocal,method=gs_lora_pp")
  c.base.sets.retain.per_class = 4  # tasks of 12 and 9 steps, LoRA chosen after each epoch
  c.base.train.epochs = 3
  c.grid = {}
  c.members = FORGET_MEMBERS
  _quick_settings(c, eval_batch_size=0)  # a forget run evaluates in one shape already
  return c


@pytest.fixture(scope="module")
def forget_swept(tmp_path_factory):
  """GS-LoRA++ (per-member prototypes, merged models and best-LoRA selection), interrupted
  inside task 1 and resumed."""
  d = tmp_path_factory.mktemp("forget_sweep")
  c = _forget_config()
  c.checkpoint.every_steps = 1
  save = checkpoints.Checkpoints.maybe_save

  def crash_after_step_15(self, step, state, force=False, iterator=None):
    save(self, step, state, force, iterator)
    if step == 15 and "chunk_0" in str(self.manager.directory):  # inside task 1 (steps 13-21)
      self.manager.wait_until_finished()
      raise _Interrupt

  with mock.patch.object(checkpoints.Checkpoints, "maybe_save", crash_after_step_15):
    with pytest.raises(_Interrupt):
      runner.sweep(c, str(d))
  return d, runner.sweep(c, str(d))


def _forget_rows_close(got_rows: list[dict], want_rows: list[dict]) -> None:
  for got, want in zip(got_rows, want_rows, strict=True):
    for k in ("acc_r", "acc_f", "acc_o", "acc_f_before", "H", "val_H"):
      np.testing.assert_allclose(got[k], want[k], atol=1e-5, equal_nan=True, err_msg=k)


def test_forget_members_equal_single_runs_after_a_resume(forget_swept, tmp_path):
  d, res = forget_swept
  base = _forget_config().base
  base.init.checkpoint = str(d / "pretrain")
  for i, assignment in enumerate(FORGET_MEMBERS):
    single = runner.run("forget", sweep.member_config(base, assignment), str(tmp_path / str(i)))
    row = res["members"][i]
    _forget_rows_close(row["tasks"], single["tasks"])
    assert row["H"] == pytest.approx(np.mean([r["H"] for r in single["tasks"]]))
    alone, _ = checkpoints.load_model(str(tmp_path / str(i) / "task_1" / "model"))
    if i == res["best"]:
      best, meta = checkpoints.load_model(str(d / "best"))
      chex.assert_trees_all_close(best, alone, atol=1e-5)
      assert meta["sweep_member"]["member"] == i
  assert res["best"] == int(np.argmax([r["val_H"] for r in res["members"]]))
  assert os.path.exists(d / "pareto.png")


def test_forget_members_split_over_devices_match_one_device(forget_swept, tmp_path):
  """8 fake devices, mesh sweep=2 x data=4."""
  d, res = forget_swept
  rows = _on_fake_devices("forget", d / "pretrain", tmp_path)
  for a, b in zip(res["members"], rows, strict=True):
    _forget_rows_close(b["tasks"], a["tasks"])


def test_forget_member_without_a_beta_per_task_is_refused_before_training(forget_swept,
                                                                         tmp_path):
  d, _ = forget_swept
  c = _forget_config()
  c.base.init.checkpoint = str(d / "pretrain")
  c.members = (FORGET_MEMBERS[0], {"weights.beta": [0.5]})
  with pytest.raises(UserError, match=r"weights.beta=\[0.5\] has no entry for task 1"):
    runner.sweep(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "chunk_0")


def test_chunks_equal_one_chunk(swept, tmp_path):
  d, res = swept
  c = _config(members_per_chunk=1)
  c.base.init.checkpoint = str(d / "pretrain")
  chunked = runner.sweep(c, str(tmp_path))
  assert os.path.exists(tmp_path / "chunk_1")
  for a, b in zip(res["members"], chunked["members"]):
    for k in ACCS + tuple(f"val_{k}" for k in ACCS):
      assert a[k] == pytest.approx(b[k], abs=1e-5)
  chex.assert_trees_all_close(res["trainable"], chunked["trainable"], atol=1e-5)


def test_members_split_over_devices_match_one_device(swept, tmp_path):
  """8 fake devices, mesh sweep=2 x data=4, chunk size from the memory estimate."""
  d, res = swept
  rows = _on_fake_devices("swap", d / "pretrain", tmp_path, memory_estimate=True)
  for a, b in zip(res["members"], rows):
    for k in ACCS + tuple(f"val_{k}" for k in ACCS):
      assert a[k] == pytest.approx(b[k], abs=1e-5)
  with np.load(tmp_path / "trainable.npz") as f:
    got = dict(f)
  want = {f"{i}/{sharding.path_str(p)}": np.asarray(x) for i, t in enumerate(res["trainable"])
          for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  chex.assert_trees_all_close(got, want, atol=1e-5)


DISPOSE_MEMBERS = ({"weights.gc": 0.3, "train.lr.dispose": 3e-3},
                   {"weights.gc": 2.0, "train.lr.dispose": 1e-3})


def test_dispose_members_equal_single_runs(tmp_path):
  c = config_lib.load(os.path.join(ROOT, "configs", "sweep_dispose_digits.py"), "runlocal")
  c.grid = {}
  c.members = DISPOSE_MEMBERS
  _quick_settings(c)
  res = runner.sweep(c, str(tmp_path / "sweep"))
  for f in ("sweep.json", "pareto.png", "best/model/model.json", "transfer/checkpoints"):
    assert os.path.exists(tmp_path / "sweep" / f)
  base = c.base
  base.init.checkpoint = str(tmp_path / "sweep" / "pretrain")
  for i, assignment in enumerate(DISPOSE_MEMBERS):
    single = runner.run("dispose", sweep.member_config(base, assignment), str(tmp_path / str(i)))
    row, last = res["members"][i], single["evals"][-1]
    assert last["after"] == "dispose"
    for k in ("target_acc", "source_acc"):
      assert row[k] == pytest.approx(last[k], abs=1e-5), (i, k)
    for variant, accs in single["pl"].items():
      assert row[f"pl_{variant}"] == pytest.approx(accs["scrubbed"], abs=1e-5), (i, variant)
      assert row[f"pl_unscrubbed_{variant}"] == pytest.approx(accs["unscrubbed"], abs=1e-5)
      if accs["leakage"] == accs["leakage"]:
        assert row[f"leakage_{variant}"] == pytest.approx(accs["leakage"], abs=1e-5)
    alone, _ = checkpoints.load_model(str(tmp_path / str(i) / "model"))
    # Full fine-tuning: every param but the attention key biases, whose gradient is exactly
    # zero (softmax ignores a per-row shift), so Adam turns float noise into lr-sized steps.
    got = {sharding.path_str(p): x for p, x in
           jax.tree_util.tree_flatten_with_path(res["trainable"][i]["params"])[0]}
    want = {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(alone)[0]}
    assert got.keys() == want.keys()
    keep = [k for k in got if not k.endswith("key/bias")]
    chex.assert_trees_all_close({k: got[k] for k in keep}, {k: want[k] for k in keep},
                                atol=1e-5)
  assert res["best"] == int(np.argmax([r["score"] for r in res["members"]]))


def test_fit_members_from_memory_estimates():
  # one member: 100 bytes, each further member 30, shared 70
  assert sweep.fit_members(100, 130, n=10, budget=200) == 4
  assert sweep.fit_members(100, 130, n=10, budget=200, devices=2) == 8
  assert sweep.fit_members(100, 130, n=3, budget=10**9) == 3
  assert sweep.fit_members(100, 130, n=5, budget=10**9, devices=2) == 4
  with pytest.raises(UserError, match="more than the .* budget"):
    sweep.fit_members(100, 130, n=10, budget=90)


def test_shape_changing_keys_make_groups_run_one_after_another(swept, tmp_path):
  d, res = swept
  c = _config(members=({**MEMBERS[0], "lora.rank": 4}, MEMBERS[0], MEMBERS[1],
                       {**MEMBERS[1], "lora.rank": 4}))
  c.base.init.pretrain.checkpoint.every_steps = 0
  out = runner.sweep(c, str(tmp_path))
  assert os.path.exists(tmp_path / "group_0") and os.path.exists(tmp_path / "group_1")
  assert os.path.exists(tmp_path / "pretrain")  # one pretraining, shared by both groups
  assert not os.path.exists(tmp_path / "group_0" / "pretrain")
  ranks = [lora_lib.layers(t["lora"])[next(iter(lora_lib.layers(t["lora"])))]["A"].shape[-1]
           for t in out["trainable"]]
  assert ranks == [4, 8, 8, 4]
  for a, b in zip(res["members"], out["members"][1:3]):  # the rank-8 group = the base sweep
    for k in ACCS:
      assert a[k] == pytest.approx(b[k], abs=1e-5)
  assert [r["member"] for r in out["members"]] == [0, 1, 2, 3]
  assert out["best"] == int(np.argmax([r["score"] for r in out["members"]]))


def test_finished_study_stays_valid_when_only_a_swept_default_changes(swept):
  d, res = swept
  c = _config()
  c.base.train.lr *= 7  # every member sets train.lr: the finished study is reported as it is
  again = runner.sweep(c, str(d))
  assert again["best"] == res["best"] and "trainable" not in again
  assert [r["score"] for r in again["members"]] == [r["score"] for r in res["members"]]
  c.base.train.weight_decay += 0.1  # no member sets it: another study
  with pytest.raises(UserError, match=r"different config \(fields \['base.train.weight_decay'\]"):
    runner.sweep(c, str(d))


def test_study_whose_base_seed_changes_is_refused_though_every_member_sets_seed(tmp_path):
  c = _config(members=tuple({**m, "seed": 3} for m in MEMBERS))
  workdir.check_config(str(tmp_path), c)  # what a started study records
  c.base.seed += 1  # the members' shared data order follows it
  with pytest.raises(UserError, match=r"different config \(fields \['base.seed'\]\)"):
    runner.sweep(c, str(tmp_path))


def test_unknown_keys_are_refused(tmp_path):
  with pytest.raises(UserError, match=r"sweep keys \['lora.rnak'\] are not fields"):
    runner.sweep(_config(members=({"lora.rnak": 4},)), str(tmp_path))
  assert not os.path.exists(tmp_path / "config.json")  # the corrected config may use the dir


def test_grid_expansion_and_pareto_front():
  got = sweep.expand({"train": {"lr": [1, 2]}, "seed": [0, 1]}, [{"seed": 5}])
  assert got[0] == {"seed": 5} and len(got) == 5
  assert {"seed": 1, "train.lr": 2} in got
  c = sweep.member_config(_config().base, {"train.lr": 1, "seed": 3})
  assert c.train.lr == 1.0 and isinstance(c.train.lr, float) and c.seed == 3
  assert [list(r) for r in sweep.chunks(5, 2)] == [[0, 1], [2, 3], [4]]
  front = sweep.pareto_front(np.array([90, 80, 95, 70]), np.array([5, 1, 10, 3]))
  assert front.tolist() == [True, True, True, False]
  with pytest.raises(UserError, match="no members"):
    sweep.expand({}, [])


def _on_fake_devices(method: str, pretrain, out, memory_estimate: bool = False) -> list[dict]:
  """Rows of `_run_on_fake_devices(method, ...)`, run in a process with 8 CPU devices."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__, method, str(pretrain), str(out)], env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "members in chunks of 2, 2 member group(s) side by side" in proc.stdout
  assert ("memory: " in proc.stdout) == memory_estimate
  with open(os.path.join(out, "rows.json")) as f:
    return json.load(f)


def _run_on_fake_devices(method: str, pretrain: str, out: str) -> None:
  """`python tests/test_sweep.py METHOD PRETRAIN OUT`: the swap fixture's sweep (chunk size
  from the memory estimate) or the forget fixture's, on mesh sweep=2 x data=4."""
  c = _config(members_per_chunk=-1) if method == "swap" else _forget_config()
  c.base.init.checkpoint = pretrain
  c.mesh.update(sweep=2, data=4)
  res = runner.sweep(c, os.path.join(out, "run"))
  with open(os.path.join(out, "rows.json"), "w") as f:
    json.dump(res["members"], f)
  np.savez(os.path.join(out, "trainable.npz"), **{
      f"{i}/{sharding.path_str(p)}": np.asarray(x)
      for i, t in enumerate(res.get("trainable", ()))
      for p, x in jax.tree_util.tree_flatten_with_path(t)[0]})


if __name__ == "__main__":
  _run_on_fake_devices(*sys.argv[1:])
