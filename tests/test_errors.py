"""Bad input ends in one line naming the field or file and the fix, before anything trains; paths
are taken as users type them (relative to the working directory).

Every case goes through ``cli.run_cli``, the wrapper of every command-line entry, so what is
checked is what a user sees: ``error: <one line>`` and exit status 1.
"""

import json
import os
import pickle

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import save_file

from distill import checkpoints, cli, layout, paths, pipeline, sample
from distill.config_utils import load_config
from distill.evaluation import inception
from distill.latent import weights


def tiny_config():
  config = load_config("digits:runlocal")
  config.num_devices = 1
  return config


def one_line_error(fn, *args, **kwargs) -> str:
  with pytest.raises(SystemExit) as info:
    cli.run_cli(fn, *args, **kwargs)
  message = str(info.value)
  assert message.startswith("error: ") and "\n" not in message, message
  return message


@pytest.mark.parametrize("field,value,message", [
    ("teacher.ema_decay", 1.5, "teacher.ema_decay=1.5 must be in [0, 1)"),
    ("stage_one.warmup_steps", -1, "stage_one.warmup_steps=-1 must be >= 0"),
    ("teacher.lr_decay", "exp", "teacher.lr_decay='exp' is not one of 'constant', 'cosine'"),
    ("stage_two.grad_clip", -0.5, "stage_two.grad_clip=-0.5 must be >= 0 (0 disables)"),
    ("num_devices", 0, "num_devices=0 must be >= 1, or -1 for all devices"),
    ("stage_one.w_min", 5.0, "stage_one.w_min=5.0 must be <= stage_one.w_max=4.0"),
    ("stage_one.w_min", -1.5, "stage_one.w_min=-1.5 must be >= -1"),
    ("eval.ddim_steps", (1, 0), "eval.teacher_steps/ddim_steps/dpm_solver_steps [0] must be "),
    ("eval.dpm_solver_steps", (4, 2.5), "ddim_steps/dpm_solver_steps [2.5] must be integers"),
    ("eval.teacher_steps", -4, "eval.teacher_steps/ddim_steps/dpm_solver_steps [-4] must be "),
    ("eval.samplers", ("ancestral",), "a subset of (deterministic, stochastic)"),
    ("teacher.checkpoint", "no/such/teacher", "teacher.checkpoint='{cwd}/no/such/teacher' does "
                                              "not exist"),
])
def test_config_errors_are_one_line(tmp_path, monkeypatch, field, value, message):
  monkeypatch.chdir(tmp_path)
  config = tiny_config()
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  got = one_line_error(pipeline.run, config, "runs/x")
  assert message.format(cwd=tmp_path) in got
  assert not (tmp_path / "runs" / "x" / "teacher").exists()  # refused before anything trained


def test_w_min_of_minus_one_is_accepted():
  """w = −1 (the unconditional model) is the lowest w a student may be trained for."""
  from distill import config_validation  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  config.stage_one.w_min = -1.0
  config_validation.validate(config, "/tmp/unused", num_devices=1)


def test_teacher_checkpoint_without_a_checkpoint(tmp_path):
  (tmp_path / "empty").mkdir()
  config = tiny_config()
  config.teacher.checkpoint = str(tmp_path / "empty")
  got = one_line_error(pipeline.run, config, tmp_path / "run")
  assert f"teacher.checkpoint: no checkpoint found at '{tmp_path / 'empty'}'" in got


def test_damaged_manifest_names_the_file(tmp_path):
  (tmp_path / "manifest.json").write_text('{"config_hash": "ab", "stages": {')
  got = one_line_error(pipeline.run, tiny_config(), tmp_path)
  assert f"{tmp_path / 'manifest.json'} is damaged (JSONDecodeError" in got


def test_unwritable_workdir_is_refused_before_training(tmp_path):
  """A workdir that cannot be created (here under a regular file, which even root cannot
  write into) is refused at once."""
  (tmp_path / "a_file").write_text("")
  got = one_line_error(pipeline.run, tiny_config(), tmp_path / "a_file" / "run")
  assert f"--workdir='{tmp_path / 'a_file' / 'run'}' is not a writable directory" in got


def test_checkpoint_directory_that_cannot_be_written(tmp_path):
  """The workdir is writable but the teacher's checkpoint directory cannot be made: the run
  stops with one line naming that directory, before the first step."""
  (tmp_path / "teacher").mkdir()
  (tmp_path / "teacher" / "checkpoints").write_text("not a directory")
  got = one_line_error(pipeline.run, tiny_config(), tmp_path)
  assert (f"checkpoint directory='{tmp_path / 'teacher' / 'checkpoints'}' is not a writable "
          "directory") in got
  assert not (tmp_path / "teacher" / "samples").exists()


def test_a_save_that_fails_stops_at_once(tmp_path):
  """The checkpoint directory becomes unwritable after step 1 was saved: saving step 2 raises
  one line naming the directory and the cause, at once, and step 1 stays intact."""
  ckpts = checkpoints.Checkpoints(tmp_path / "ck")
  state = {"a": jax.numpy.ones(3)}
  ckpts.save(1, state, {"x": 1})
  ckpts.wait()
  os.rename(tmp_path / "ck", tmp_path / "ck_moved")
  (tmp_path / "ck").write_text("")  # a file where the directory was
  with pytest.raises(checkpoints.CheckpointError) as info:
    ckpts.save(2, state, {"x": 1})
  message = str(info.value)
  assert message.startswith(f"saving checkpoint 2 in '{tmp_path / 'ck'}' failed "
                            "(NotADirectoryError") and "\n" not in message, message
  assert checkpoints.state_dir(tmp_path / "ck_moved")[1] == 1  # step 1 is intact


def test_a_background_write_that_fails_is_reported_by_the_next_poll(tmp_path):
  """The arrays of step 4 fail to write after save() returned (a full disk, say): poll() does
  not block while the save runs, and raises the one-line error once it has failed, naming the
  newest complete step as the resume point."""
  ckpts = checkpoints.Checkpoints(tmp_path / "ck")
  ckpts.save(3, {"a": jax.numpy.ones(3)}, {"x": 1})
  ckpts.wait()

  class FailingWrite:  # stands in for Orbax's manager while its background write runs
    running = 2

    def is_saving_in_progress(self):
      self.running -= 1
      return self.running > 0

    def wait_until_finished(self):
      raise OSError(28, "No space left on device")

  real, ckpts._manager, ckpts._pending = ckpts._manager, FailingWrite(), 4
  ckpts.poll()  # still running: returns without waiting
  with pytest.raises(checkpoints.CheckpointError) as info:
    ckpts.poll()
  ckpts._manager = real
  assert str(info.value) == (
      f"saving checkpoint 4 in '{tmp_path / 'ck'}' failed (OSError: [Errno 28] No space left "
      "on device); a rerun resumes from step 3, the newest complete checkpoint there.")


def test_nan_in_an_imported_teacher_is_refused(tmp_path, tiny_pipeline):
  config = tiny_config()
  mesh = pipeline.make_mesh(config)
  params = jax.device_get(layout.read_final_params(config, tiny_pipeline,
                                                     layout.chain(config)[0], mesh))
  leaves, tree = jax.tree.flatten(params)
  leaves[3] = np.full_like(leaves[3], np.nan)
  with ocp.StandardCheckpointer() as writer:  # the layout of a training-loop checkpoint
    writer.save(tmp_path / "bad_teacher" / "6" / "state",
                {"ema_params": jax.tree.unflatten(tree, leaves)})
  config.stages = "stage_one"
  config.teacher.checkpoint = str(tmp_path / "bad_teacher")
  got = one_line_error(pipeline.run, config, tmp_path / "run")
  assert (f"teacher.checkpoint='{tmp_path / 'bad_teacher'}': the teacher's EMA parameters "
          "(step 6) hold NaN") in got
  assert not (tmp_path / "run" / "stage_one").exists()


@pytest.fixture()
def damaged_files(tmp_path):
  good = tmp_path / "good.safetensors"
  save_file({"w": np.ones((4, 4), np.float32)}, str(good))
  data = good.read_bytes()
  (tmp_path / "truncated.safetensors").write_bytes(data[:len(data) - 9])
  (tmp_path / "corrupted.safetensors").write_bytes(b"\xff" * 8 + data[8:])
  with open(tmp_path / "pickle.safetensors", "wb") as f:
    pickle.dump({"w": [1.0, 2.0]}, f)
  save_file({"w": np.array([1.0, np.nan], np.float32)}, str(tmp_path / "nan.safetensors"))
  return tmp_path


@pytest.mark.parametrize("name", ["truncated", "corrupted", "pickle"])
def test_damaged_safetensors_name_the_file(damaged_files, name):
  path = damaged_files / f"{name}.safetensors"
  for read in (lambda: weights.read_safetensors([path]),
               lambda: inception.load_variables(path)):
    got = one_line_error(read)
    assert f"{path}: not a readable safetensors file" in got


def test_nan_in_imported_weights_names_the_tensor(damaged_files):
  path = damaged_files / "nan.safetensors"
  got = one_line_error(weights.read_safetensors, [path])
  assert f"{path}: w holds NaN or infinite values" in got


def test_resolve_leaves_urls_alone(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("runs/d") == str(tmp_path / "runs" / "d")
  assert paths.resolve("gs://bucket/runs/d") == "gs://bucket/runs/d"
  assert paths.resolve("") == ""
  config = tiny_config()
  config.teacher.checkpoint = "t"
  config.data.data_dir = "gs://b/tfds"
  resolved = paths.resolve_config(config)
  assert resolved.teacher.checkpoint == str(tmp_path / "t")
  assert resolved.data.data_dir == "gs://b/tfds" and config.teacher.checkpoint == "t"


def test_sample_cli_with_relative_paths(tiny_pipeline, tmp_path, monkeypatch):
  monkeypatch.chdir(tiny_pipeline.parent)
  sample.main([f"--workdir={tiny_pipeline.name}", "--num_steps=1", "--per_row=2",
               f"--out={os.path.relpath(tmp_path / 'out', tiny_pipeline.parent)}"])
  written = json.dumps(sorted(p.name for p in (tmp_path / "out").iterdir()))
  assert "student1_deterministic_1steps_seed0.png" in written


def test_inception_convert_cli_with_relative_paths(tmp_path, monkeypatch, random_inception_weights):
  torch = pytest.importorskip("torch")
  _, arrays = random_inception_weights
  torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, tmp_path / "fid.pth")
  monkeypatch.chdir(tmp_path)
  inception.main(["--convert=fid.pth", "--out=converted.safetensors"])
  inception.load_variables(tmp_path / "converted.safetensors")
  # A pickle that is not a plain state dict of tensors is refused by weights_only.
  with open(tmp_path / "evil.pth", "wb") as f:
    pickle.dump(object(), f)
  with pytest.raises(SystemExit, match=r"--convert=\S+evil.pth: torch.load\(weights_only=True\) "
                                       "failed"):
    inception.main(["--convert=evil.pth", "--out=x.safetensors"])
  assert not (tmp_path / "x.safetensors").exists()
