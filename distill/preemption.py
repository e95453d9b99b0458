"""Preemption: a SIGTERM during training becomes a checkpoint and a clean exit.

Cloud TPU VMs (and most schedulers) send SIGTERM some time before they stop a worker. While a
training loop runs, ``Watcher`` catches it; the loop asks ``watcher.reached(step)`` after every
step, saves a checkpoint of that step and raises ``Preempted``; ``distill.main`` exits with
status 143 (128 + SIGTERM) and the same command resumes from that checkpoint.

With several processes every process must stop at the *same* step (checkpoint saves are
collective): then ``reached`` is JAX's preemption sync point
(``multihost_utils.reached_preemption_sync_point``), which the coordination service started by
``jax.distributed.initialize`` turns true on all processes at one agreed step after any of them
received SIGTERM.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging

EXIT_STATUS = 128 + signal.SIGTERM


class Preempted(Exception):
  """Training stopped at ``step`` after a SIGTERM; a checkpoint of that step was saved."""

  def __init__(self, name: str, step: int):
    super().__init__(f"{name}: preempted (SIGTERM) at step {step}; its checkpoint is saved. "
                     "Rerun the same command to resume.")
    self.step = step


class Watcher:
  """Context manager: SIGTERM sets a flag while the block runs (single process), the previous
  handler is restored afterwards. Outside a training loop SIGTERM keeps its default effect."""

  def __init__(self):
    self._signalled = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    if not self._signalled:
      logging.warning("SIGTERM received: saving a checkpoint after the current step.")
    self._signalled = True

  def __enter__(self):
    # The multi-process sync point has its own notifier; a handler only in the main thread.
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
    return False

  def reached(self, step: int) -> bool:
    """True when training should save ``step`` and stop (the same answer on every process)."""
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self._signalled
