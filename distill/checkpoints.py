"""Orbax checkpoints: named items ``state`` (the train state) and ``config`` (JSON).

Saves go through ``CheckpointManager`` (atomic: a step directory appears only when complete,
``max_to_keep`` from config). They are asynchronous; ``poll`` (called after every training step)
turns a save that failed in the background into ``CheckpointError`` at once, a one-line message
naming the directory and the cause, and the previous checkpoint stays the newest complete one. Restoring takes the newest readable checkpoint: if the newest is
damaged (e.g. truncated files), it warns and falls back to the previous one.

``read_params`` reads only the (EMA) parameters of a finished stage, or of a teacher trained
elsewhere by this code, after checking every parameter's path and shape against the model the
config builds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from distill import paths


def is_finite(tree) -> bool:
  """Whether every floating-point leaf of ``tree`` is free of NaN and infinity.

  Checked on the host, on one replica of each of this process's shards (no compiled program: a
  U-Net's state has dozens of leaf shapes, and a program per shape, or one over all leaves, costs
  seconds of XLA compiles); with several processes, their answers are gathered.
  """
  def local_parts(x):  # one replica of each shard this process holds
    if isinstance(x, jax.Array):
      return [np.asarray(s.data) for s in x.addressable_shards if s.replica_id == 0]
    return [np.asarray(x)]

  ok = all(np.isfinite(part).all() for x in jax.tree.leaves(tree) for part in local_parts(x)
           if jnp.issubdtype(part.dtype, jnp.inexact))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    ok = bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))
  return ok


def _write_replicated_arrays_whole_on_cpu() -> None:
  """On the CPU backend, Orbax writes a replicated array from one replica, whole.

  Its default (replica-parallel writes: each replica writes a slice) slices every array shape with
  a small compiled program, about 8 s of XLA:CPU compiles per process for a U-Net's train state
  on 8 devices, and gains nothing when the devices share one host's memory. A checkpoint written
  either way restores to the same arrays. Accelerator backends keep Orbax's default.
  """
  if jax.default_backend() != "cpu":
    return
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if not getattr(handler, "_use_replica_parallel", False):
    return
  quiet = lambda record: "overriding" not in record.getMessage()  # Orbax warns of overrides
  logging.getLogger("absl").addFilter(quiet)
  try:
    ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False, array_metadata_store=handler._array_metadata_store),  # pylint: disable=protected-access
        override=True)
  finally:
    logging.getLogger("absl").removeFilter(quiet)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written (one line: the directory and the cause)."""


class _BackgroundSaveErrors(logging.Filter):
  """Drops the traceback that Orbax's save thread logs; ``CheckpointError`` reports it."""

  def filter(self, record):
    if record.exc_info and "orbax" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


class Checkpoints:
  """A stage's checkpoints in ``directory`` (made absolute: Orbax needs it)."""

  def __init__(self, directory, *, max_to_keep: int | None = 3, writable: bool = True):
    """``writable``: check at once (process 0) that saves can be written there; a directory
    that is only read from (sampling) may be read-only."""
    self.directory = epath.Path(paths.resolve(directory))
    if writable and jax.process_index() == 0:
      try:
        paths.check_writable(self.directory, what="checkpoint directory")
      except ValueError as e:
        raise CheckpointError(str(e)) from None
    _write_replicated_arrays_whole_on_cpu()
    self._pending = None  # the step of a save that may still be running
    self._filter = _BackgroundSaveErrors()
    logging.getLogger("absl").addFilter(self._filter)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=writable,
            # The step directory is made in save(), so a directory that cannot be written
            # fails there, and no background thread is left waiting for it.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False)),
        item_names=("state", "config"))

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, config) -> None:
    """Saves ``state`` and ``config`` (a ConfigDict or dict) at ``step``; refuses non-finite."""
    if not is_finite(state):
      raise FloatingPointError(f"refusing to checkpoint step {step}: the state holds NaN or "
                               "infinite values.")
    if hasattr(config, "to_json_best_effort"):
      config = json.loads(config.to_json_best_effort())
    self.wait()  # the previous save first, so its failure is reported as its own
    with self._reporting(step):
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)), force=True)
    self._pending = step

  def poll(self) -> None:
    """Raises ``CheckpointError`` if a background save has failed; never blocks on one."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the running save (if any) is complete; ``CheckpointError`` if it failed."""
    step, self._pending = self._pending, None
    with self._reporting(step):
      self._manager.wait_until_finished()

  @contextlib.contextmanager
  def _reporting(self, step):
    try:
      yield
    except Exception as e:  # Orbax and the file system raise many kinds
      cause = str(e).splitlines()[0] if str(e) else ""
      raise CheckpointError(
          f"saving checkpoint {step} in {str(self.directory)!r} failed ({type(e).__name__}: "
          f"{cause}); {self._resume_point()}") from None

  def _resume_point(self) -> str:
    try:
      steps = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
    except OSError:
      steps = []
    if steps:
      return f"a rerun resumes from step {steps[-1]}, the newest complete checkpoint there."
    return "no complete checkpoint is there, so a rerun starts the stage afresh."

  def restore_latest(self, abstract_state):
    """``(step, state)`` of the newest readable checkpoint, or ``(None, None)`` if none is.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings) that the
    restored arrays take.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return step, restored.state
      except Exception as e:  # a damaged checkpoint can fail in many ways
        logging.warning("checkpoint %s/%d is unreadable (%s: %s); moving it to %s and falling "
                        "back to the previous one.", self.directory, step, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "", self._unreadable_dir())
        self._set_aside(step)
    return None, None

  def _unreadable_dir(self) -> epath.Path:
    return self.directory.parent / (self.directory.name + "_unreadable")

  def _set_aside(self, step: int) -> None:
    """Moves a damaged step out of the manager's directory so a rerun never trusts it."""
    if jax.process_index() == 0:
      target = self._unreadable_dir()
      target.mkdir(parents=True, exist_ok=True)
      destination = target / str(step)
      if destination.exists():
        destination.rmtree()
      (self.directory / str(step)).rename(destination)
    self._manager.reload()

  def restore_config(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()
      logging.getLogger("absl").removeFilter(self._filter)


def state_dir(path) -> tuple[epath.Path, int]:
  """``(…/<step>/state, step)`` for a step directory, a ``checkpoints`` directory (its newest
  step) or a stage directory holding ``checkpoints/``."""
  path = epath.Path(paths.resolve(path))
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / "state").is_dir() and path.name.isdigit():
    return path / "state", int(path.name)
  steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and
                 (p / "state").is_dir()) if path.is_dir() else []
  if not steps:
    raise ValueError(f"no checkpoint found at {str(path)!r}: pass a stage directory, its "
                     "checkpoints/ directory or one step directory of it.")
  return path / str(steps[-1]) / "state", steps[-1]


def _shapes(tree) -> dict[str, tuple]:
  flat = traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {}
  return {k: tuple(getattr(v, "shape", ())) for k, v in flat.items()}


def _quiet_step_metadata(record) -> bool:
  return "Metadata file does not exist" not in record.getMessage()


def _stored_shapes(directory: epath.Path) -> dict[str, dict[str, tuple]]:
  """``{key: {parameter path: shape}}`` of a checkpoint's state. Orbax's metadata of every array
  (the optimiser state's too) takes about a millisecond per array to read, so on a local disk
  it is read once per finished checkpoint and process (keyed by the directory's modification
  time: a checkpoint written again at the same step is read again)."""
  if os.path.isdir(str(directory)):
    return _stored_shapes_cached(str(directory), os.stat(str(directory)).st_mtime_ns)
  return _read_stored_shapes(directory)  # gs:// and other remote paths: read each time


@functools.lru_cache(maxsize=64)
def _stored_shapes_cached(directory: str, mtime_ns: int) -> dict[str, dict[str, tuple]]:
  del mtime_ns  # part of the cache key only
  return _read_stored_shapes(epath.Path(directory))


def _read_stored_shapes(directory: epath.Path) -> dict[str, dict[str, tuple]]:
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(_quiet_step_metadata)  # the step's metadata sits one level up: expected
  try:
    metadata = ocp.StandardCheckpointer().metadata(directory).item_metadata.tree
  finally:
    absl_logger.removeFilter(_quiet_step_metadata)
  return {key: _shapes(dict(value)) if isinstance(value, Mapping) else {}
          for key, value in metadata.items()}


def read_params(path, abstract_params, *, key: str = "ema_params", what: str = "teacher"):
  """Reads ``state[key]`` of a checkpoint into the shapes and shardings of ``abstract_params``.

  Raises a one-line ``ValueError`` naming the first parameter path that is missing, extra or
  of another shape, before reading any array.
  """
  directory, step = state_dir(path)
  stored = _stored_shapes(directory)
  if key not in stored:
    raise ValueError(f"{what} checkpoint {str(directory)!r} has no {key!r}: it was not written "
                     "by distill's training loop.")
  found, expected = stored[key], _shapes(abstract_params)
  for name in sorted(set(found) | set(expected)):
    if found.get(name) != expected.get(name):
      raise ValueError(
          f"{what} checkpoint {str(directory)!r} does not match the model config at parameter "
          f"{name}: checkpoint shape {found.get(name, 'absent')} vs config shape "
          f"{expected.get(name, 'absent')}; set --config.model.* to the teacher's architecture.")
  item = {key: abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(directory, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))
  return step, restored[key]
