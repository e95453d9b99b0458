"""Orbax checkpoints: named items ``state`` (the train state) and ``config`` (JSON).

Saves go through ``CheckpointManager`` (atomic: a step directory appears only when complete,
``max_to_keep`` from config). Restoring takes the newest readable checkpoint: if the newest is
damaged (e.g. truncated files), it warns and falls back to the previous one.
"""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath


def _finite(tree) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


class Checkpoints:
  """A stage's checkpoints in ``directory``."""

  def __init__(self, directory, *, max_to_keep: int | None = 3):
    self.directory = epath.Path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "config"))

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, config) -> None:
    """Saves ``state`` and ``config`` (a ConfigDict or dict) at ``step``; refuses non-finite."""
    if not _finite(state):
      raise FloatingPointError(f"refusing to checkpoint step {step}: the state holds NaN or "
                               "infinite values.")
    if hasattr(config, "to_json_best_effort"):
      config = json.loads(config.to_json_best_effort())
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config)), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

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
    self._manager.close()
