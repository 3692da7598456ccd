"""Training on a device mesh, and on two processes, matches training on one device.

This pytest process has already started jax with one CPU device, so every scenario runs in a
fresh interpreter (`python tests/test_multidevice.py SCENARIO OUT [ARGS]`) whose XLA_FLAGS ask
for fake host devices; it writes its results to OUT as .npz files, compared here with the
same computation run in-process on one device.
"""
import json
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kswap_jax import lora as lora_lib
from kswap_jax import checkpoints, heads, losses, loop, sharding, train, trees
from kswap_jax.data import loader, pipeline, sources
from kswap_jax.errors import UserError
from kswap_jax.methods import forget, swap
from kswap_jax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP_RULES = (("Transformer/.*/MlpBlock_0/Dense_0/kernel", (None, "fsdp")),
             ("Transformer/.*/MlpBlock_0/Dense_1/kernel", ("fsdp", None)))
SWAP_RULES = MLP_RULES + (("lora/.*/Dense_0/B", (None, "fsdp")),)
MESHES = {"dp": {"data": -1}, "fsdp": {"data": 2, "fsdp": -1}}
ATOL = 1e-5
# Params after 3 full-model Adam steps: attention key biases have an exactly zero gradient
# (softmax ignores a per-row shift), so Adam scales reduction-order noise up to ~1e-5 steps.
PARAMS_ATOL = 5e-5


def _net() -> train.Network:
  return train.Network(vit.ViT(num_classes=10, **vit.get_variant("Nano/2")))


def _digits(seed: int, n: int) -> dict[str, np.ndarray]:
  """Digits-like batch: uint8 images (n, 8, 8, 1), int32 labels (n,) in [0, 10)."""
  rng = np.random.default_rng(seed)
  return {"images": rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
          "labels": rng.integers(0, 10, n).astype(np.int32)}


def _pretrain(net):
  """(state, step_fn, batches(s)) of a pretrain-style run: all params trained with CE."""
  params = vit.init_params(net.model, jax.random.key(0), (8, 8, 1))
  tx = train.make_optimizer()
  state = train.init_state(params, None, ".*", {"lr": 1e-3, "weight_decay": 1e-4}, 0, tx)

  def loss_fn(trainable, frozen, hp, batches, rng):
    del hp
    logits = net.apply(trees.combine(frozen, trainable["params"]), None, batches["images"],
                       train=True, rng=rng)
    return losses.cross_entropy(logits, batches["labels"]), {}

  return state, train.make_step(loss_fn, tx, lambda s: 1.0), lambda s: _digits(s, 16)


def _swap(net):
  """(state, step_fn, batches(s)) of a swap stage: LoRA on the MLPs plus the head."""
  params = vit.init_params(net.model, jax.random.key(0), (8, 8, 1))
  lora = lora_lib.init(jax.random.key(1), params, rank=2)
  tx = train.make_optimizer()
  hp = {"lr": 1e-2, "weight_decay": 1e-4, **{k: 1.0 for k in swap.HPARAMS}, "sparse": 1e-3}
  state = train.init_state(params, lora, "head/.*", hp, 0, tx)
  step_fn = train.make_step(swap.stage_loss(net, "swap", "block"), tx, lambda s: 1.0)
  return state, step_fn, lambda s: {n: _digits(10 * s + i, 8)
                                    for i, n in enumerate(("retain", "learn", "forget"))}


def _forget(net):
  """(state, step_fn, batches(s)) of a GS-LoRA task: CosFace head, group-sparse LoRA."""
  params = vit.init_params(net.model, jax.random.key(0), (8, 8, 1))
  lora = lora_lib.init(jax.random.key(1), params, rank=2)
  tx = train.make_optimizer()
  hp = {"lr": 1e-2, "weight_decay": 1e-4, "beta": 0.5, "bound": 50.0, "alpha": 1e-2,
        "proto_bound": 0.0, "w_f": 0.0, "w_r": 0.0}
  state = train.init_state(params, lora, "", hp, 0, tx)
  loss = forget.make_loss(forget.get_method("gs_lora"), heads.HeadNetwork(net, "cosface"),
                             "block")
  step_fn = train.make_step(loss, tx, lambda s: 1.0)
  return state, step_fn, lambda s: {"retain": _digits(10 * s, 8), "forget": _digits(10 * s + 1, 8),
                                    "ctx": {"stage_step": np.int32(s),
                                            "stage": {"alpha_warmup": np.int32(0)}}}


SETUPS = {"pretrain": (_pretrain, MLP_RULES), "swap": (_swap, SWAP_RULES),
          "forget": (_forget, SWAP_RULES)}


def _flat(tree) -> dict[str, np.ndarray]:
  """{"a/b/leaf": value} of a tree of replicated or fully addressable arrays."""
  return {sharding.path_str(p): np.asarray(x.addressable_data(0) if x.is_fully_replicated
                                           else x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _train(kind: str, mesh_axes, rules, steps: int = 2):
  """(final state, losses (steps,)) of `steps` updates of setup `kind` on a mesh."""
  state, step_fn, batches = SETUPS[kind][0](_net())
  mesh = sharding.make_mesh(mesh_axes)
  state = sharding.shard_state(state, mesh, rules)
  step = sharding.compile_step(step_fn, mesh, jax.tree.map(lambda x: x.sharding, state))
  put = lambda tree: jax.tree.map(lambda x: jax.device_put(
      x, sharding.data_sharding(mesh) if np.ndim(x) else sharding.replicated(mesh)), tree)
  out = []
  for s in range(steps):
    state, metrics = step(state, put(batches(s)))
    out.append(metrics["loss"])
  return state, np.asarray(out)


def _kernel_spec(state, path="Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"):
  leaves = jax.tree_util.tree_flatten_with_path(train.full_params(state))[0]
  return {sharding.path_str(p): x.sharding.spec for p, x in leaves}[path]


# ---- scenarios, each run in its own interpreter ----

def scenario_steps(out: str, kind: str) -> None:
  """Both meshes of MESHES on all devices; fsdp state must stay sharded after the steps."""
  for name, axes in MESHES.items():
    rules = SETUPS[kind][1] if "fsdp" in axes else ()
    state, loss = _train(kind, axes, rules)
    if rules:
      assert _kernel_spec(state) == jax.P(None, "fsdp"), _kernel_spec(state)
    np.savez(os.path.join(out, f"{name}.npz"), loss=loss, **_flat(state["trainable"]))
  try:
    sharding.shard_state(SETUPS[kind][0](_net())[0], sharding.make_mesh(MESHES["fsdp"]),
                         (("head/kernel", (None, "fsdp")),))
    raise AssertionError("a head of 10 classes split 4 ways was accepted")
  except UserError as e:
    assert "cannot split a dim of 10" in str(e), e


def _ckpt_state(mesh_axes, trained: bool):
  """A pretrain state placed on an fsdp mesh: after one update, or freshly initialised."""
  if trained:
    return _train("pretrain", mesh_axes, MLP_RULES, steps=1)[0]
  return sharding.shard_state(_pretrain(_net())[0], sharding.make_mesh(mesh_axes), MLP_RULES)


def scenario_save(out: str, ckpt_dir: str) -> None:
  state = _ckpt_state({"data": 2, "fsdp": -1}, trained=True)
  ckpts = checkpoints.Checkpoints(ckpt_dir, 1, 1)
  ckpts.maybe_save(1, state, force=True)
  ckpts.close()
  np.savez(os.path.join(out, "saved.npz"), **_flat(state))


def _restore(ckpt_dir: str, mesh_axes):
  ckpts = checkpoints.Checkpoints(ckpt_dir, 1, 1)
  state = ckpts.restore(_ckpt_state(mesh_axes, trained=False))
  ckpts.close()
  return state


def scenario_restore(out: str, ckpt_dir: str) -> None:
  state = _restore(ckpt_dir, {"data": 2, "fsdp": -1})
  assert _kernel_spec(state) == jax.P(None, "fsdp"), _kernel_spec(state)
  np.savez(os.path.join(out, "restored.npz"), **_flat(state))


def _memory_set(seen: list) -> pipeline.ExampleSet:
  """32 in-memory 8x8 images; `seen` records every image index read."""
  data = _digits(99, 32)

  def image(i):
    seen.append(int(i))
    return data["images"][i]

  src = sources.Source("memory", "train", data["labels"], [str(k) for k in range(10)], image)
  return pipeline.ExampleSet(src, np.arange(32), data["labels"], 8, 1)


def _host_run(ckpt_dir: str, steps: int = 3):
  """Pretrain-style steps on global batches from `pipeline.batch`, then save and restore.

  Returns (losses (steps,), trained state, restored state, image indices this process read).
  """
  seen = []
  examples = _memory_set(seen)
  sampler = pipeline.EpochSampler(len(examples), 16, 0)
  state, step_fn, _ = _pretrain(_net())
  mesh = sharding.make_mesh({"data": -1})
  fresh = sharding.shard_state(state, mesh)
  state = sharding.shard_state(state, mesh)
  step = sharding.compile_step(step_fn, mesh, jax.tree.map(lambda x: x.sharding, state))
  out = []
  for s in range(steps):
    state, metrics = step(state, pipeline.batch(examples, sampler.positions(s),
                                                sharding.data_sharding(mesh)))
    out.append(metrics["loss"])
  ckpts = checkpoints.Checkpoints(ckpt_dir, 1, 1)
  ckpts.maybe_save(steps, state, force=True)
  ckpts.close()
  restored = checkpoints.Checkpoints(ckpt_dir, 1, 1).restore(fresh)
  return np.asarray([x.addressable_data(0) for x in out]), state, restored, sorted(set(seen))


def _init_multihost(port: str, pid: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(pid))
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)


def scenario_multihost(out: str, ckpt_dir: str, port: str, pid: str) -> None:
  _init_multihost(port, pid)
  loss, state, restored, seen = _host_run(ckpt_dir)
  np.savez(os.path.join(out, f"process_{pid}.npz"), loss=loss, seen=np.asarray(seen),
           **{f"trained/{k}": v for k, v in _flat(state).items()},
           **{f"restored/{k}": v for k, v in _flat(restored).items()})
  jax.distributed.shutdown()


RESUME_STAGES = (("a", 2, 0), ("b", 3, 1))  # (name, steps, sampler seed)


def scenario_multihost_resume(out: str, run_dir: str, port: str, pid: str, stop_at: str) -> None:
  """`loop.run` of two stages on global batches split over both processes' devices; stopped
  once its checkpoint of step `stop_at` is written (0: never). A run that ends writes
  <out>/<run_dir name>_<pid>.npz: the final state, the (stage index, stage step) of every
  batch this process made, and each input state restored (step, restored, iterator state)."""
  _init_multihost(port, pid)
  examples = _memory_set([])
  mesh = sharding.make_mesh({"data": -1})
  put = sharding.data_sharding(mesh)
  made, restored = [], []

  def step_fn(state, b):
    # Each slot of each batch weighs in differently, in step order: any other batch shows.
    # Sums of integer pixels are exact in float32, so the reduction order does not matter.
    slot = jnp.arange(1, 17, dtype=jnp.float32)[:, None, None, None]
    w = 0.9 * state["trainable"]["w"] + jnp.sum(slot * b["images"].astype(jnp.float32), 0)
    return ({"step": state["step"] + 1, "stage_step": state["stage_step"] + 1,
             "trainable": {"w": w}}, {"loss": jnp.mean(w)})

  def batches(stage, sampler, s):
    made.append((stage, s))
    return pipeline.batch(examples, sampler.positions(s), put)

  step = sharding.compile_step(step_fn, mesh)
  stages = [loop.Stage(name, n, step, lambda s, k=k, smp=pipeline.EpochSampler(
      len(examples), 16, seed): batches(k, smp, s))
            for k, (name, n, seed) in enumerate(RESUME_STAGES)]
  state = jax.device_put({"step": np.int32(0), "stage_step": np.int32(0),
                          "trainable": {"w": np.zeros((8, 8, 1), np.float32)}},
                         sharding.replicated(mesh))
  restore_input = checkpoints.Checkpoints.restore_input
  save = checkpoints.Checkpoints.maybe_save

  def recorded_restore(self, at, iterator):
    ok = restore_input(self, at, iterator)
    restored.append((at, ok, iterator.get_state()["next_index"]))
    return ok

  def stop_after(self, at, state, force=False, iterator=None):
    save(self, at, state, force, iterator)
    if at == int(stop_at):
      raise KeyboardInterrupt

  with pytest.MonkeyPatch.context() as m:
    m.setattr(checkpoints.Checkpoints, "restore_input", recorded_restore)
    m.setattr(checkpoints.Checkpoints, "maybe_save", stop_after)
    ckpts = checkpoints.Checkpoints(os.path.join(run_dir, "ckpt"), 2, 3)
    try:
      state = loop.run(state, stages, ckpts, run_dir, log_every=100, ahead=loader.Ahead(2))
    except KeyboardInterrupt:
      assert int(stop_at)
    else:
      assert not int(stop_at)
      np.savez(os.path.join(out, f"{os.path.basename(run_dir)}_{pid}.npz"),
               made=np.asarray(made).reshape(-1, 2),
               restored=np.asarray(restored, np.int64).reshape(-1, 3), **_flat(state))
  jax.distributed.shutdown()


# ---- tests ----

def _env(devices: int) -> dict[str, str]:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def _spawn(scenario: str, *args, devices: int = 8) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, __file__, scenario, *map(str, args)],
                          env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _check(*procs: subprocess.Popen, timeout: int = 600) -> None:
  for p in procs:
    log, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, log[-4000:]


def _load(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return dict(f)


def test_mesh_from_config():
  assert sharding.make_mesh({"data": -1, "rules": ()}).axis_names == ("data",)
  assert sharding.data_sharding(sharding.make_mesh()).spec == jax.P(("data",))
  with pytest.raises(UserError, match=r"mesh \{'data': 3\} does not fit 1 devices"):
    sharding.make_mesh({"data": 3})
  with pytest.raises(UserError, match="at most one -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1})


def test_opt_state_follows_param_rules():
  state = _swap(_net())[0]
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1})
  shardings = sharding.state_shardings(state, mesh, SWAP_RULES + (("head/kernel", ("fsdp",)),))
  specs = {sharding.path_str(p): s.spec
           for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  lora_b = "lora/Transformer/encoderblock_1/MlpBlock_0/Dense_0/B"
  assert specs[f"trainable/{lora_b}"] == jax.P(None, "fsdp")
  assert specs[f"opt/inner_state/0/mu/{lora_b}"] == jax.P(None, "fsdp")
  assert specs["opt/inner_state/0/nu/params/head/kernel"] == jax.P("fsdp")
  assert specs["params/Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel"] == jax.P(
      "fsdp", None)
  assert specs["opt/inner_state/0/count"] == specs["rng"] == jax.P()


@pytest.mark.parametrize("kind", ["pretrain", "swap", "forget"])
def test_step_matches_one_device(kind, tmp_path):
  proc = _spawn("steps", tmp_path, kind)
  state, loss = _train(kind, {"data": -1}, ())
  want = {"loss": loss, **_flat(state["trainable"])}
  _check(proc)
  for name in MESHES:
    chex.assert_trees_all_close(_load(tmp_path / f"{name}.npz"), want, atol=ATOL)


def test_checkpoint_restores_on_fewer_devices(tmp_path):
  ckpt = tmp_path / "ckpt"
  _check(_spawn("save", tmp_path, ckpt, devices=8))
  _check(_spawn("restore", tmp_path, ckpt, devices=4))
  saved = _load(tmp_path / "saved.npz")
  chex.assert_trees_all_close(_load(tmp_path / "restored.npz"), saved, atol=0)
  one = _restore(str(ckpt), {"data": 1, "fsdp": -1})
  chex.assert_trees_all_close(_flat(one), saved, atol=0)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  procs = [_spawn("multihost", tmp_path, tmp_path / "ckpt", port, i, devices=2)
           for i in range(2)]
  loss, state, restored, seen = _host_run(str(tmp_path / "ckpt1"))
  _check(*procs)
  runs = [_load(tmp_path / f"process_{i}.npz") for i in range(2)]
  for r in runs:
    np.testing.assert_allclose(r["loss"], loss, atol=ATOL)
    trained = {k[len("trained/"):]: v for k, v in r.items() if k.startswith("trained/")}
    chex.assert_trees_all_close(trained, _flat(state), atol=PARAMS_ATOL)
    chex.assert_trees_all_close({k[len("restored/"):]: v for k, v in r.items()
                                 if k.startswith("restored/")}, trained, atol=0)
  chex.assert_trees_all_close(_flat(restored), _flat(state), atol=0)
  # Each process read only its half of every global batch.
  sampler = pipeline.EpochSampler(32, 16, 0)
  for i, r in enumerate(runs):
    mine = {int(p) for s in range(len(loss)) for p in sampler.positions(s)[8 * i:8 * (i + 1)]}
    assert set(r["seen"]) == mine
  assert set(runs[0]["seen"]) | set(runs[1]["seen"]) == set(seen)


def test_two_processes_resume_with_their_input_states(tmp_path):
  """Interrupted inside stage b and resumed, two processes read the batches of an
  uninterrupted run: each restores its own saved grain state and makes only the rest."""
  def run(name, stop_at):
    port = _free_port()
    return [_spawn("multihost_resume", tmp_path, tmp_path / name, port, i, stop_at, devices=2)
            for i in range(2)]

  _check(*run("full", 0), *run("resumed", 4))  # checkpoint 4: stage b (steps 3-5), step 2
  for i in range(2):
    saved = tmp_path / "resumed" / "ckpt" / "4" / "input" / f"process_{i}-of-2.json"
    assert json.loads(saved.read_text()) == loader.state_at(2)
  _check(*run("resumed", 0))
  full = [_load(tmp_path / f"full_{i}.npz") for i in range(2)]
  for i in range(2):
    resumed = _load(tmp_path / f"resumed_{i}.npz")
    # Sums of integer pixels are exact, so even the cross-process reduction matches exactly.
    chex.assert_trees_all_equal(resumed["trainable/w"], full[0]["trainable/w"])
    assert int(resumed["step"]) == 5
    assert full[i]["made"].tolist() == [[k, s] for k, (_, n, _) in enumerate(RESUME_STAGES)
                                        for s in range(n)]
    assert resumed["made"].tolist() == [[1, 2]]
    assert resumed["restored"].tolist() == [[4, 1, 2]] and not len(full[i]["restored"])


if __name__ == "__main__":
  globals()[f"scenario_{sys.argv[1]}"](*sys.argv[2:])
