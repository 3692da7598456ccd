"""The metrics stream: a global step across stages, clean stage names, wall time, train and
eval records, no duplicates after a resume, TensorBoard events readable without TensorFlow
(written without loading PyTorch), and a clear error for W&B without wandb."""
import importlib.util
import json
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import pytest
from tensorboardX.proto import event_pb2

from kswap_jax import checkpoints, loop, metrics_log
from kswap_jax.errors import UserError


def _state():
  return {"step": jnp.zeros((), jnp.int32), "stage_step": jnp.zeros((), jnp.int32),
          "trainable": {"w": jnp.zeros((2,), jnp.float32)}}


def _step(state, batch):
  w = state["trainable"]["w"] + batch
  return ({**state, "step": state["step"] + 1, "stage_step": state["stage_step"] + 1,
           "trainable": {"w": w}}, {"loss": jnp.sum(w), "lr": jnp.float32(0.1)})


def _run(directory: str, stop_at: int | None = None):
  """Two stages of 4 steps ("learn", "forget"), each ending with an evaluation; raises
  KeyboardInterrupt before global step `stop_at`."""
  log = metrics_log.MetricsLog(directory)
  seen = {"n": 0}

  def batches(s):
    seen["n"] += 1
    if stop_at is not None and seen["n"] == stop_at:
      raise KeyboardInterrupt
    return jnp.float32(s + 1)

  def end(name):
    return lambda s: log.results({"evals": [{"after": name, "acc": float(s["step"])}]})

  stages = [loop.Stage(n, 4, _step, batches, end=end(n)) for n in ("learn", "forget")]
  ckpts = checkpoints.Checkpoints(os.path.join(directory, "checkpoints"), 3, 5)
  return loop.run(_state(), stages, ckpts, directory, log_every=1, log=log)


def _records(directory):
  with open(os.path.join(directory, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _events(directory):
  """(tag, step, value) of the scalars in the TensorBoard event files (TFRecord framing)."""
  out = []
  for name in sorted(os.listdir(directory)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_records_carry_global_step_stage_time_and_evals(tmp_path):
  _run(str(tmp_path))
  recs = _records(tmp_path)
  train = [r for r in recs if r["kind"] == "train"]
  assert [r["step"] for r in train] == list(range(1, 9))
  assert [r["stage"] for r in train] == ["learn"] * 4 + ["forget"] * 4
  assert [r["stage_step"] for r in train] == [1, 2, 3, 4] * 2
  assert all({"loss", "lr", "time"} <= set(r) for r in train)
  assert all(a["time"] <= b["time"] for a, b in zip(recs, recs[1:]))
  evals = [(r["step"], r["stage"], r["name"], r["after"], r["value"])
           for r in recs if r["kind"] == "eval"]
  assert evals == [(4, "learn", "evals/acc", "learn", 4.0),
                   (8, "forget", "evals/acc", "forget", 8.0)]
  scalars = _events(str(tmp_path))
  assert [(s, v) for t, s, v in scalars if t == "train/loss"] == [
      (r["step"], pytest.approx(r["loss"])) for r in train]
  assert [(t, s) for t, s, _ in scalars if t.startswith("eval/")] == [("eval/evals/acc", 4),
                                                                     ("eval/evals/acc", 8)]


def test_no_duplicate_records_after_a_resume(tmp_path):
  full = tmp_path / "full"
  _run(str(full))
  cut = tmp_path / "cut"
  with pytest.raises(KeyboardInterrupt):
    _run(str(cut), stop_at=6)  # checkpoint at step 3; steps 4-5 logged, then interrupted
  assert max(r["step"] for r in _records(cut)) == 5
  _run(str(cut))
  strip = lambda recs: [{k: v for k, v in r.items() if k != "time"} for r in recs]  # noqa
  assert strip(_records(cut)) == strip(_records(full))


def test_wandb_without_the_package_is_a_user_error(tmp_path, monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  real = builtins.__import__

  def no_wandb(name, *args, **kwargs):
    if name == "wandb":
      raise ImportError(name)
    return real(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_wandb)
  config = ml_collections.ConfigDict({"log": {"wandb_project": "p"}})
  with pytest.raises(UserError, match="needs wandb: pip install wandb"):
    metrics_log.MetricsLog(str(tmp_path), config).rewind(None)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="tensorboardX imports PyTorch only when it is installed")
def test_tensorboard_events_are_written_without_loading_pytorch(tmp_path):
  code = ("import sys; from kswap_jax import metrics_log; "
          "log = metrics_log.MetricsLog(sys.argv[1]); log.rewind(None); "
          "log.train(0, {'loss': 1.5}); log.tb.flush(); print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, check=True)
  assert out.stdout.split() == ["False"]
  assert _events(str(tmp_path)) == [("train/loss", 0, 1.5)]
