"""Progress of the whole run: which link of how many is running, and an ETA for all of it.

Every training log line ends with ``link i/n`` and the run's ETA: the current link's remaining
steps at its measured steps/s, the later links' steps at the same rate scaled by their relative
step cost (``STEP_COST``), and, when the eval stage follows, its network evaluations at the
forward-pass share of that rate (``FORWARD_SHARE``). The eval stage logs ``cell k/K`` and the
ETA of its remaining cells from the cells it has timed. Estimates, marked ``≈``.
"""

from __future__ import annotations

import dataclasses
import time

# Time of one training step relative to a teacher step at the same batch size: stage one runs
# the teacher's two branches without gradient beside the student; stage two runs two teacher
# DDIM steps (the training-step table of BENCHMARKS.md measures 1.24–1.25× and 1.32–1.45×), and
# an encoder's step the same work upwards.
# teacher_v (a latent teacher's ε→v fine-tuning) trains with the teacher's objective.
# The parts a text-to-image chain trains first are other networks: per example, configs/emoji.py's
# autoencoder step costs 2.1 and its CLIP step 0.46 of its U-Net's teacher step (7.1, 1.6 and
# 3.4 ms on 2 cores); other sizes make these rough.
STEP_COST = {"teacher": 1.0, "teacher_v": 1.0, "stage_one": 1.25, "stage_two": 1.4,
             "encoder": 1.4, "autoencoder": 2.1, "clip": 0.46}
# A forward pass of one example costs about this share of one example's training step
# (forward, backward and the optimiser).
FORWARD_SHARE = 1 / 3


def format_seconds(seconds: float) -> str:
  seconds = max(int(round(seconds)), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclasses.dataclass
class _Link:
  name: str
  stage: str
  num_steps: int
  batch_size: int
  done: int = 0


class RunProgress:
  """Positions and ETAs for the links that this run trains, and for its eval stage.

  ``links``: ``(name, stage, num_train_steps, batch_size)`` of every link trained here, in
  order. ``eval_work``: the eval stage's network evaluations (samples × NFE, each over the eval
  batch), or 0 when it does not run.
  """

  def __init__(self, links, *, eval_work: int = 0):
    self.links = [_Link(*link) for link in links]
    self.eval_work = int(eval_work)
    self.started = time.time()
    self._sample_seconds = None  # one example's training-step time in teacher-step units

  def _index(self, name: str) -> int:
    return next(i for i, link in enumerate(self.links) if link.name == name)

  def begin(self, name: str, step: int) -> None:
    self.links[self._index(name)].done = int(step)

  def position(self, name: str) -> str:
    return f"link {self._index(name) + 1}/{len(self.links)}"

  def describe(self, name: str, done: int, steps_per_second: float) -> str:
    """`` | link i/n, run ETA ≈…`` for a log line of link ``name`` at step ``done``.

    ``steps_per_second`` <= 0 (an interval that held the link's compiles, say) keeps the rate
    measured before, if any."""
    i = self._index(name)
    current = self.links[i]
    current.done = done
    if steps_per_second > 0:
      self._sample_seconds = 1.0 / (steps_per_second * STEP_COST[current.stage] *
                                    current.batch_size)
    if self._sample_seconds is None:
      return f" | {self.position(name)}"
    per_unit = self._sample_seconds
    remaining = sum((link.num_steps - link.done) * STEP_COST[link.stage] * link.batch_size
                    for link in self.links[i:]) * per_unit
    remaining += self.eval_seconds_estimate()
    return f" | {self.position(name)}, run ETA ≈{format_seconds(remaining)}"

  def eval_seconds_estimate(self) -> float:
    if not self.eval_work or self._sample_seconds is None:
      return 0.0
    return self.eval_work * self._sample_seconds * FORWARD_SHARE


class EvalProgress:
  """``cell k/K`` and the ETA of the remaining cells, from the cells timed so far (by NFE)."""

  def __init__(self, cells, num_samples: int):
    self.work = {cell.key: cell.nfe * num_samples for cell in cells}
    self.total = len(self.work)
    self.spent_seconds = 0.0
    self.spent_work = 0
    self.left = dict(self.work)

  def skip(self, key: str) -> None:
    self.left.pop(key, None)

  def done(self, key: str, seconds: float) -> str:
    self.spent_seconds += seconds
    self.spent_work += self.left.pop(key, 0)
    k = self.total - len(self.left)
    if not self.spent_work:
      return f"cell {k}/{self.total}"
    eta = sum(self.left.values()) * self.spent_seconds / self.spent_work
    return f"cell {k}/{self.total}, eval ETA ≈{format_seconds(eta)}"
