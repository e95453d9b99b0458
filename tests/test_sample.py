"""The sampling CLI and its library functions on the tiny pipeline's workdir."""

import numpy as np
import pytest

from distill import sample


def test_cli_writes_grid_and_npz(tiny_pipeline, tmp_path):
  sample.main([f"--workdir={tiny_pipeline}", "--model=student", "--num_steps=2",
               "--sampler=stochastic", "--w=0,2", "--per_row=3", f"--out={tmp_path}"])
  data = np.load(tmp_path / "student2_stochastic_4steps_seed0.npz")
  assert data["images"].shape == (6, 8, 8, 1)
  np.testing.assert_array_equal(data["w"], [0, 0, 0, 2, 2, 2])
  np.testing.assert_array_equal(data["labels"], [0, 1, 2, 0, 1, 2])
  assert (tmp_path / "student2_stochastic_4steps_seed0.png").is_file()


def test_samples_do_not_depend_on_batching(tiny_pipeline):
  loaded = sample.load_model(tiny_pipeline, "teacher")
  labels, w = np.arange(7) % 10, np.linspace(0, 3, 7)
  a = sample.generate(loaded, sampler="deterministic", num_steps=3, labels=labels, w=w, seed=5,
                      batch_size=7)
  b = sample.generate(loaded, sampler="deterministic", num_steps=3, labels=labels, w=w, seed=5,
                      batch_size=3)
  np.testing.assert_allclose(a, b, atol=1e-5)
  c = sample.generate(loaded, sampler="deterministic", num_steps=3, labels=labels, w=w, seed=6,
                      batch_size=7)
  assert not np.allclose(a, c)


@pytest.mark.parametrize("args,message", [
    (["--model=student", "--num_steps=3"], "no stage-two student with num_steps=3 .* available "
                                           r"\[1, 2, 4\]"),
    (["--model=teacher"], "--num_steps is required for model=teacher"),
    (["--labels=12", "--num_steps=1"], r"--labels \[12\] are outside \[0, 10\)"),
])
def test_cli_errors_are_one_line(tiny_pipeline, args, message, capsys):
  with pytest.raises(SystemExit, match=message) as info:
    sample.main([f"--workdir={tiny_pipeline}", *args])
  assert "\n" not in str(info.value)


def test_empty_workdir_and_w_outside_range(tmp_path, tiny_pipeline, caplog):
  with pytest.raises(SystemExit, match="holds no trained stage"):
    sample.main([f"--workdir={tmp_path}"])
  sample.main([f"--workdir={tiny_pipeline}", "--num_steps=1", "--w=9", "--per_row=1",
               f"--out={tmp_path}"])
  assert "outside the trained range [0.0, 4.0]" in caplog.text
