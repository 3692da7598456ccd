"""orbax checkpoints of a run: the train state every N steps, and exported models.

  workdir/checkpoints/<step> train-state checkpoints (last K kept), to resume a run: the state
                             (item "default") and the input iterator's state (item "input",
                             grain's per-process JSON; absent in older checkpoints)
  workdir/model/             exported model: params (orbax) + model.json (config, classes)

Folders are local paths or bucket URLs (`kswap_jax.paths`; orbax takes `epath.Path`s). orbax
saves and restores collectively; only process 0 writes model.json and moves folders.
"""
from __future__ import annotations

import os

import grain.checkpoint
import jax
import ml_collections
import orbax.checkpoint as ocp

from kswap_jax import paths, workdir
from kswap_jax.errors import UserError


class Checkpoints:
  """orbax CheckpointManager for the train state and the input iterator: save every N steps,
  keep K, resume."""

  def __init__(self, directory: str, every_steps: int, keep: int):
    self.every = every_steps
    self.manager = ocp.CheckpointManager(
        paths.of(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_handlers={"default": ocp.StandardCheckpointHandler(),
                       "input": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, state):
    """The newest checkpoint that restores onto the shardings and shapes of `state`, or None.

    A newer one that does not restore (a truncated file, a crash mid-write) is set aside as
    corrupt_<step> beside the others, never deleted, and the run resumes from the one before.
    """
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            default=ocp.args.StandardRestore(target)))["default"]
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        continue
      for bad, why in failed:
        self._set_aside(bad, why, step)
      return restored
    if failed:
      step, why = failed[0]
      raise UserError(f"no checkpoint in {self.manager.directory} restores onto this run's state "
                      f"(step {step}: {why}); they are corrupt or from another run; use a new "
                      "--workdir")
    return None

  def _set_aside(self, step: int, why: str, resume: int) -> None:
    directory = paths.of(self.manager.directory)
    aside = directory / f"corrupt_{step}"
    n = 1
    while aside.exists():
      aside, n = directory / f"corrupt_{step}.{n}", n + 1
    if workdir.is_main():
      (directory / str(step)).rename(aside)
      print(f"checkpoint {directory}/{step} does not restore ({why}); kept as {aside}, "
            f"resuming from step {resume}", flush=True)
    self.manager.reload()

  def due(self, step: int, force: bool = False) -> bool:
    """Whether `maybe_save(step, ..., force)` writes a checkpoint."""
    return ((force or bool(self.every and step % self.every == 0))
            and self.manager.latest_step() != step)

  def restore_input(self, step: int, iterator: grain.DatasetIterator) -> bool:
    """Sets `iterator` to the input state saved at `step`; False (iterator unchanged) when no
    checkpoint of `step` has one (it was written before input states were, or by another
    process count)."""
    if step not in self.manager.all_steps() or "input" not in self.manager.item_metadata(step):
      return False
    try:
      self.manager.restore(step, args=ocp.args.Composite(
          input=grain.checkpoint.CheckpointRestore(iterator)))
    except ValueError:  # grain's "File ... does not exist": no file of this process count
      return False
    return True

  def maybe_save(self, step: int, state, force: bool = False,
                 iterator: grain.DatasetIterator | None = None) -> None:
    """Saves `state` (and the input `iterator`'s state, if given) when due."""
    if self.due(step, force):
      items = {"default": ocp.args.StandardSave(state)}
      if iterator is not None:
        items["input"] = grain.checkpoint.CheckpointSave(iterator)
      self.manager.save(step, args=ocp.args.Composite(**items))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def export_model(directory: str, params, model_config: ml_collections.ConfigDict,
                 label_space: list, extra: dict | None = None) -> None:
  """Writes params (orbax) and model.json; a failed export leaves an older one intact."""
  directory = paths.of(directory)
  tmp = directory.parent / f"{directory.name}.tmp"
  ckptr = ocp.StandardCheckpointer()
  if tmp.exists() and workdir.is_main():
    tmp.rmtree()
  ckptr.save(tmp / "params", params)
  ckptr.wait_until_finished()
  workdir.write_json(os.fspath(tmp / "model.json"),
                     {"model": model_config.to_dict(), "classes": label_space, **(extra or {})})
  if workdir.is_main():
    if directory.exists():
      old = directory.parent / f"{directory.name}.old"
      directory.rename(old)
      tmp.rename(directory)
      old.rmtree()
    else:
      tmp.rename(directory)


def load_model(directory: str) -> tuple[dict, dict]:
  """(params, model.json dict) of an exported model; a run's workdir also works."""
  for d in (paths.of(directory), paths.of(directory) / "model"):
    if (d / "model.json").exists():
      try:
        meta = workdir.read_json(os.fspath(d / "model.json"))
        params = ocp.StandardCheckpointer().restore(d / "params")
        if not isinstance(meta, dict) or not {"model", "classes"} <= set(meta) or not params:
          raise ValueError("model.json needs 'model' and 'classes', and params/ a params tree")
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"exported model {d} cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}); export it again or give another "
                        "model") from None
      return params, meta
  raise UserError(f"no exported model at {directory!r} (expected model.json there or in "
                  "its model/ folder); run a pretrain job first or give a .npz, .pth or "
                  ".safetensors file")
