"""The eval stage on the tiny pipeline: one cell per (method, steps, w, seed), the report files,
resumability; the digits classifier's determinism and accuracy."""

import csv
import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from distill import images, pipeline
from distill.config_utils import load_config
from distill.evaluation import digits_classifier, evaluate, metrics


def test_digits_classifier_is_deterministic_by_seed(tmp_path):
  a = digits_classifier.load_or_train(tmp_path / "a", seed=3, steps=150)
  b = digits_classifier.load_or_train(tmp_path / "b", seed=3, steps=150)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params),
                                                  jax.tree.leaves(b.params)))
  assert a.held_out_accuracy == b.held_out_accuracy > 0.8  # 150 steps; 2000 reach ≥ 0.99
  cached = digits_classifier.load_or_train(tmp_path / "a", seed=3, steps=150)  # from the cache
  assert cached.held_out_accuracy == a.held_out_accuracy
  c = digits_classifier.load_or_train(tmp_path / "c", seed=4, steps=150)
  assert not np.array_equal(jax.tree.leaves(a.params)[0], jax.tree.leaves(c.params)[0])


def test_report_has_one_cell_per_method_steps_w(tiny_pipeline):
  config = load_config("digits:runlocal")
  report = tiny_pipeline / "report"
  for name in ("table.md", "table.csv", "fid_vs_nfe.png", "fid_is_tradeoff.png", "report.json"):
    assert (report / name).is_file(), name
  with open(report / "table.csv") as f:
    rows = list(csv.DictReader(f))
  keys = {(r["method"], int(r["steps"]), float(r["w"])) for r in rows}
  e = config.eval
  expected_rows = ([("teacher", e.teacher_steps)] + [("ddim", s) for s in e.ddim_steps]
                   + [("dpm_solver", s) for s in e.dpm_solver_steps]
                   + [(m, n) for n in e.student_steps for m in ("student", "student_stochastic")])
  # teacher; DDIM at 1, 2; DPM-Solver++ at 3; students 1, 2 with both samplers
  assert len(expected_rows) == 8
  assert keys == {(m, s, w) for m, s in expected_rows for w in e.w_values}
  assert len(rows) == len(keys) and all(r["seeds"] == str(len(e.seeds)) for r in rows)
  nfe = {(r["method"], int(r["steps"])): int(r["nfe"]) for r in rows}
  assert nfe[("teacher", 4)] == 8 and nfe[("student_stochastic", 2)] == 4
  assert nfe[("student", 1)] == 1 and nfe[("dpm_solver", 3)] == 6
  table = (report / "table.md").read_text()
  assert "real-vs-real floor" in table and "git revision" in table
  assert table.count("| Distilled, stochastic |") == 2
  assert table.count("| DPM-Solver++ 2M (teacher) | 3 | 6 |") == 1
  cells = list((report / "cells").iterdir())
  assert len(cells) == len(keys) * 2
  fid = [float(r["fid_mean"]) for r in rows]
  assert all(np.isfinite(fid)) and min(fid) > 0
  assert (report / "grids" / "student_steps2_w1.png").is_file()
  # The side-by-side picture's heads are the first samples of the grid: its 4x-upscaled tiles.
  grid = np.asarray(Image.open(report / "grids" / "student_steps2_w1.png"))[::4, ::4]
  with np.load(report / "heads" / "student_steps2_w1.npz") as head:
    assert list(head["conditions"]) == [f"class {c}" for c in range(6)]
    tiles = images.to_uint8(head["images"])
  assert tiles.shape == (6, 8, 8, 1)
  for j, tile in enumerate(tiles):
    np.testing.assert_array_equal(grid[1:9, 1 + 9 * j:9 + 9 * j], tile[..., 0])
  for w in e.w_values:
    picture = Image.open(report / f"side_by_side_w{w:g}.png")
    assert picture.size[0] > 3 * 100 and picture.size[1] > 6 * 100  # 3 columns, 6 rows


def test_closing_summary_is_the_students_row_against_the_teachers(tiny_pipeline):
  """The run's last lines, worked out from the cell files: the 2-step student's FID over the
  teacher's at every w, each the mean over the seeds."""
  config = load_config("digits:runlocal")
  out = tiny_pipeline / "report"
  lines = evaluate.summary(out, config, student_steps=2)
  assert lines[0] == f"report: {out / 'table.md'} (figures and grids beside it)"

  def mean_fid(method, steps, w):
    return np.mean([json.loads((out / "cells" / f"{method}_steps{steps}_w{w:g}_seed{seed}.json")
                               .read_text())["fid"] for seed in config.eval.seeds])

  pairs = []
  for w in config.eval.w_values:
    s, t = mean_fid("student", 2, w), mean_fid("teacher", config.eval.teacher_steps, w)
    pairs.append(f"w={w:g}: {s:.2f} vs {t:.2f} ({s / t:.2f}x)")
  assert lines[1] == ("FID, 2-step student vs teacher (guided DDIM at 4 steps, 2 evaluations "
                      "each), 2 seed(s): " + "; ".join(pairs))


def test_eval_is_resumable(tiny_pipeline):
  """A finished cell is not recomputed: an edited cell file survives a rerun of the stage."""
  config = load_config("digits:runlocal")
  config.num_devices = 1
  cell = tiny_pipeline / "report" / "cells" / "ddim_steps1_w0_seed0.json"
  data = json.loads(cell.read_text())
  data["fid"] = 12345.0
  cell.write_text(json.dumps(data))
  evaluate.run(config, tiny_pipeline)
  assert json.loads(cell.read_text())["fid"] == 12345.0
  with open(tiny_pipeline / "report" / "table.csv") as f:
    row = [r for r in csv.DictReader(f) if r["method"] == "ddim" and r["steps"] == "1"
           and r["w"] == "0.0"][0]
  assert float(row["fid_mean"]) > 1000  # the table is rebuilt from the cells
  cell.unlink()  # recomputed: the shared workdir's table is consistent again
  evaluate.run(config, tiny_pipeline)
  assert json.loads(cell.read_text())["fid"] < 1000


@pytest.mark.parametrize("field,value,message", [
    ("features", "inception", "eval.inception_weights='' is not a file"),
    ("features", "fid", "eval.features='fid' is not one of"),
    ("num_samples", 5, "eval.num_samples=5 must be >= 10"),
])
def test_eval_validation(tmp_path, field, value, message):
  from distill import config_validation  # pylint: disable=import-outside-toplevel
  config = load_config("digits:runlocal")
  config.eval[field] = value
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config, tmp_path, num_devices=1)


def test_eval_with_inception_on_mock_cifar10(tmp_path, random_inception_weights, monkeypatch):
  """The eval stage on a tfds data set with the FID Inception (random weights, same layout):
  teacher-only rows when no students were trained. The real features' k-NN radii are computed
  once for every cell (``metrics.Reference``); each cell computes its own samples'."""
  config = load_config("cifar10:runlocal")
  config.num_devices = 1
  config.stages = "teacher,eval"
  config.teacher.sample_every = 0  # no progress grid: a sampler compile this test does not read
  config.eval.inception_weights = str(random_inception_weights[0])
  config.eval.update(dict(w_values=(0.0,), seeds=(0,), num_samples=10, teacher_steps=2,
                          ddim_steps=(1,), dpm_solver_steps=(), batch_size=10,
                          reference_samples=10, pr_samples=10))
  radii = []
  knn_radii = metrics.knn_radii
  monkeypatch.setattr(metrics, "knn_radii", lambda f, k: radii.append(len(f)) or knn_radii(f, k))
  with tfds.testing.mock_data(num_examples=40):
    pipeline.run(config, tmp_path)
  with open(tmp_path / "report" / "table.csv") as f:
    rows = list(csv.DictReader(f))
  assert {(r["method"], r["steps"]) for r in rows} == {("teacher", "2"), ("ddim", "1")}
  assert len(radii) == 1 + len(rows)
  # Random weights, but features that tell images apart: samples of a 6-step teacher are far
  # from the data.
  assert all(np.isfinite(float(r["fid_mean"])) and float(r["fid_mean"]) > 0 for r in rows), rows
  assert "n/a" in (tmp_path / "report" / "table.md").read_text()  # no class accuracy
