"""The run's progress line: link i/n and the whole run's ETA, worked out by hand."""

import types

from distill import progress


def test_run_eta_adds_later_links_by_step_cost_and_the_eval_work():
  run = progress.RunProgress([("teacher", "teacher", 100, 10), ("stage_one", "stage_one", 50, 10)],
                             eval_work=600)
  # The first interval of the run held the compiles: no rate yet, only the position.
  assert run.describe("teacher", 20, 0.0) == " | link 1/2"
  # 2 teacher steps/s at batch 10: 1/20 s per example-step. Left: 60 teacher steps (30 s),
  # 50 stage-one steps at 1.25x (31.25 s) and 600 evaluations at a third of that (10 s).
  assert run.describe("teacher", 40, 2.0) == " | link 1/2, run ETA ≈1m11s"
  # Stage one's first interval held its compiles: the teacher's rate stands in.
  # 40 stage-one steps (25 s) and the eval (10 s).
  assert run.describe("stage_one", 10, 0.0) == " | link 2/2, run ETA ≈0m35s"
  # 1 stage-one step/s: 1/12.5 s per example-step in teacher units; 20 steps (20 s) and the
  # eval (600 / 12.5 / 3 = 16 s).
  assert run.describe("stage_one", 30, 1.0) == " | link 2/2, run ETA ≈0m36s"


def test_eval_eta_from_the_timed_cells_by_network_evaluations():
  cells = [types.SimpleNamespace(key=k, nfe=n) for k, n in (("a", 2), ("b", 4), ("c", 512))]
  tracker = progress.EvalProgress(cells, num_samples=10)
  tracker.skip("a")  # computed by an earlier run
  # 40 evaluations took 8 s: the 5120 left take 1024 s.
  assert tracker.done("b", 8.0) == "cell 2/3, eval ETA ≈17m04s"
  assert tracker.done("c", 1000.0) == "cell 3/3, eval ETA ≈0m00s"
  assert progress.format_seconds(3 * 3600 + 125) == "3h02m"
