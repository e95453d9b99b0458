"""The whole pipeline on the tiny digits config: teacher → stage one → halvings 8 → 4 → 2 → 1.

One uninterrupted run (session fixture) is the reference. A second run, the CLI in subprocesses
started from another directory with a relative ``--workdir``, is killed with SIGKILL in stage one
(right after it starts an asynchronous checkpoint save), stopped by SIGTERM in a halving (which
saves the step it was at), then finished by the same run in the test's process: every link's
final parameters must be bit-identical to the reference. Also: a changed config and a mismatched
teacher are refused, a teacher read from ``teacher.checkpoint`` reproduces stage one exactly, and
the stage-one objective matches its closed form at initialisation.
"""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from distill import checkpoints, family, layout, losses, models, pipeline, sample, schedules
from distill.config_utils import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent

# Runs distill.main in a subprocess that stops itself at STOP_AT="<link>:<step>": STOP_HOW=kill
# sends SIGKILL right after asking Orbax to save that step (the save may or may not complete);
# STOP_HOW=term sends a real SIGTERM when the loop asks whether to stop after that step.
DRIVER = r"""
import os, signal, sys
from absl import app
from distill import checkpoints, main, preemption, train
link, step = os.environ["STOP_AT"].rsplit(":", 1)
current = [None]
original_train = train.train
def traced_train(**kwargs):
  current[0] = kwargs["name"]
  return original_train(**kwargs)
train.train = traced_train
if os.environ["STOP_HOW"] == "kill":
  original_save = checkpoints.Checkpoints.save
  def save(self, at, state, config):
    original_save(self, at, state, config)
    if current[0] == link and at == int(step):
      os.kill(os.getpid(), signal.SIGKILL)
  checkpoints.Checkpoints.save = save
else:
  original_reached = preemption.Watcher.reached
  def reached(self, at):
    if current[0] == link and at == int(step):
      os.kill(os.getpid(), signal.SIGTERM)
    return original_reached(self, at)
  preemption.Watcher.reached = reached
sys.argv = ["distill.main"] + sys.argv[1:]
app.run(main.main)
"""


def tiny_config():
  config = load_config("digits:runlocal")
  config.num_devices = -1  # the tiny pipeline's mesh: the 8 devices of this process and of the
  # subprocesses (which inherit XLA_FLAGS)
  return config


@pytest.fixture(scope="module")
def reference(tiny_pipeline):
  return tiny_pipeline


def final_params(workdir):
  config = tiny_config()
  mesh = pipeline.make_mesh(config)
  return {link.name: jax.device_get(layout.read_final_params(config, workdir, link, mesh))
          for link in layout.chain(config) if link.stage != "encoder"}  # not in the stages


def _equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_tiny_pipeline_runs_every_link(reference):
  config = tiny_config()
  names = [link.name for link in layout.chain(config) if link.stage != "encoder"]
  assert names == ["teacher", "stage_one", "stage_two/N=4", "stage_two/N=2", "stage_two/N=1"]
  manifest = json.loads((reference / "manifest.json").read_text())
  # The encoder's links are in the chain, but not in the default stages: never trained here.
  assert sorted(manifest["stages"]) == sorted(names + ["eval"])
  assert not (reference / "encoder").exists()
  assert all(manifest["stages"][name]["final_step"] == 6 for name in names)
  for name in names:  # a grid of the student's own step count after every link
    assert (reference / name / "samples" / "step_00000006.png").is_file()
  params = final_params(reference)
  assert "w_embed" in params["stage_one"] and "w_embed" not in params["teacher"]
  assert not _equal(params["stage_two/N=2"], params["stage_two/N=1"])  # each halving trained


def test_the_halvings_and_the_eval_cells_share_their_programs(tiny_pipeline_traces):
  # One train step traced for the teacher, one for stage one and one for the three halvings,
  # whose N is an array: a step built per halving would be traced (and compiled) five times.
  assert tiny_pipeline_traces.get("step") == 3, tiny_pipeline_traces
  # The eval stage's samplers: the teacher's DDIM (its 4-step reference and DDIM at 1 and 2
  # steps), DPM-Solver++ at 3, and the students' deterministic and stochastic samplers, each for
  # both students: 4 programs (a program per step count would be 8). The progress grids call the
  # same jitted DDIM functions, traced again for their own unsplit batch: once for the teacher's
  # grid and once for the grids of stage one (4 steps) and of the halvings (4, 2 and 1), 6 traces
  # in all (a program per link's grid would be 5, under its own name).
  assert tiny_pipeline_traces.get("run") == 6, tiny_pipeline_traces
  assert "sample" not in tiny_pipeline_traces, tiny_pipeline_traces


def _cli(cwd, workdir, *, stop_at, stop_how="kill", extra=()):
  """``python -m distill.main`` started in ``cwd``, with paths relative to it, as a user types,
  stopped at ``stop_at`` (DRIVER)."""
  config = os.path.relpath(REPO / "configs" / "digits.py", cwd)
  args = [f"--config={config}:runlocal", f"--workdir={workdir}", "--config.num_devices=-1",
          "--config.stages=teacher,stage_one,stage_two", *extra]
  # No progress grids: they touch neither keys nor parameters, and the reference draws them.
  args += [f"--config.{name}.sample_every=0" for name in ("teacher", "stage_one", "stage_two")]
  env = dict(os.environ, STOP_AT=stop_at, STOP_HOW=stop_how)
  return subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=900)


def _steps(directory):
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


# Four random projections of every link's final EMA parameters in the tiny chain, computed by the
# code before the denoiser families (distill/family.py) on one device, with the suite's XLA
# options of then, on an Intel Xeon; the code after them gave bit-identical parameters on that
# machine. XLA:CPU's code differs between CPU models, device counts and compile options, and the
# tiny stage one learns from gradients near rounding size (its teacher's two branches barely
# differ), which Adam scales up: on 8 devices with the present options they moved by 2e-6
# (stage one) to 1.7e-5 (N = 1). The test holds them to 4e-5, a sixth of the smallest change a
# link makes (the first halving's, 2.4e-4).
PIXEL_CHAIN_DIGEST = {
    "teacher": (-0.057991269, 0.010080506, 0.032404638, 0.148554921),
    "stage_one": (-0.064969085, 0.046799724, -0.168073266, 0.090638271),
    "stage_two/N=4": (-0.064737886, 0.046865427, -0.168113170, 0.090637756),
    "stage_two/N=2": (-0.064221023, 0.047001783, -0.167533989, 0.090916460),
    "stage_two/N=1": (-0.063205310, 0.046953146, -0.167098219, 0.091336348),
}


def _digest(params):
  flat = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(params)])
  return np.random.default_rng(0).standard_normal((4, flat.size)) @ flat / np.sqrt(flat.size)


def test_pixel_chain_is_the_one_before_the_denoiser_families(reference):
  params = final_params(reference)
  assert list(params) == list(PIXEL_CHAIN_DIGEST)
  for name, stored in PIXEL_CHAIN_DIGEST.items():
    np.testing.assert_allclose(_digest(params[name]), stored, rtol=0, atol=4e-5, err_msg=name)


def test_killed_and_preempted_runs_resume_bit_identically(tmp_path, reference, caplog,
                                                         monkeypatch):
  """From another working directory with a relative --workdir, as README's command: SIGKILL in
  stage one right after a checkpoint save starts, SIGTERM in a halving at a step that is not a
  checkpoint step (it saves that step and exits 143), then the same run finishes the chain:
  every link's parameters equal the uninterrupted run's, bit for bit."""
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  workdir = cwd / "runs" / "digits"
  killed = _cli(cwd, "runs/digits", stop_at="stage_one:3")
  assert killed.returncode == -9, killed.stderr[-2000:]
  stages = json.loads((workdir / "manifest.json").read_text())["stages"]
  assert "teacher" in stages and "stage_one" not in stages
  assert _steps(workdir / "teacher" / "checkpoints") == [3, 6]  # saved under the relative path
  # The kill came while step 3 of stage one was being written: Orbax's atomic rename means it
  # is either complete (a numbered directory) or absent, never half-trusted.
  complete = _steps(workdir / "stage_one" / "checkpoints")
  assert complete in ([], [3]), complete

  # The suite's compilation cache, named relative to where the command runs (its programs are
  # there already: the run is not slowed by compiles that test nothing).
  relative = os.path.relpath(os.environ["JAX_COMPILATION_CACHE_DIR"], cwd)
  preempted = _cli(cwd, "runs/digits", stop_at="stage_two/N=2:4", stop_how="term",
                   extra=(f"--compilation_cache_dir={relative}",))
  assert preempted.returncode == 143, preempted.stderr[-2000:]
  resolved = os.path.normpath(os.path.join(os.path.realpath(cwd), relative))
  assert f"compilation cache: {resolved}\n" in preempted.stderr
  assert ("stage_one: resuming from checkpoint at step 3" in preempted.stderr) == bool(complete)
  assert "stage_two/N=2: preempted (SIGTERM) at step 4" in preempted.stderr
  assert _steps(workdir / "stage_two" / "N=2" / "checkpoints") == [3, 4]  # 3 by the interval

  # Finished by the same run in this process, from the same directory with the same relative
  # workdir (the command line's path to pipeline.run is the two runs above; a third interpreter
  # would only add its start-up).
  config = tiny_config()
  config.stages = "teacher,stage_one,stage_two"
  for name in ("teacher", "stage_one", "stage_two"):
    config[name].sample_every = 0
  monkeypatch.chdir(cwd)
  with caplog.at_level(logging.INFO):
    pipeline.run(config, "runs/digits")
  assert "stage_two/N=2: resuming from checkpoint at step 4" in caplog.text
  # The run's progress: which link of how many, steps/s and the whole run's ETA.
  assert re.search(r"stage_two/N=1 step 6/6: .* steps/s \| link 5/5, run ETA ≈\d+m\d\ds",
                   caplog.text), caplog.text[-3000:]
  resumed, straight = final_params(workdir), final_params(reference)
  for name in straight:
    assert _equal(resumed[name], straight[name]), name


def test_rerun_of_a_finished_chain_trains_nothing(reference, caplog, monkeypatch):
  """Nor reads a checkpoint: a finished link's parameters are read only for a link that trains
  from them (the resume test reads them for one)."""
  config = tiny_config()
  config.stages = "teacher,stage_one,stage_two"

  def refuse(*args, **kwargs):
    raise AssertionError("a finished chain's rerun read a checkpoint")

  monkeypatch.setattr(checkpoints.Checkpoints, "restore_latest", refuse)
  monkeypatch.setattr(checkpoints, "read_params", refuse)
  with caplog.at_level(logging.INFO):
    pipeline.run(config, reference)
  assert not re.search(r"\S+ step \d+/\d+: loss", caplog.text)
  assert "stage_one (link 2/5): complete" in caplog.text


def test_changed_config_is_refused(reference):
  config = tiny_config()
  original = config.stage_one.lr
  config.stage_one.lr = 5e-3
  with pytest.raises(ValueError, match=re.escape(f"stage_one.lr: {original} -> 0.005; rerun with "
                                                 "the original settings or use a new --workdir")
                     ) as info:
    pipeline.run(config, reference)
  assert "\n" not in str(info.value)
  config = tiny_config()  # stages, devices and logging intervals may change on resume
  config.stages = "stage_two"
  config.num_devices = 2
  config.stage_two.log_every = 3
  pipeline.run(config, reference)


def test_imported_teacher_reproduces_stage_one(tmp_path, reference):
  config = tiny_config()
  config.stages = "stage_one"
  config.teacher.checkpoint = str(reference / "teacher")
  pipeline.run(config, tmp_path)
  assert not (tmp_path / "teacher").exists()
  mesh = pipeline.make_mesh(config)
  link = layout.chain(config)[1]
  imported = layout.read_final_params(config, tmp_path, link, mesh)
  original = layout.read_final_params(config, reference, link, mesh)
  assert _equal(jax.device_get(imported), jax.device_get(original))
  # Sampling and evaluation of this workdir read the imported teacher.
  teacher = sample.load_model(tmp_path, "teacher", config=config)
  reference_config = tiny_config()
  reference_config.stages = "stage_one"
  trained = layout.read_final_params(reference_config, reference, layout.chain(config)[0],
                                       mesh)
  assert _equal(jax.device_get(teacher.params), jax.device_get(trained))


def test_mismatched_teacher_is_refused_before_training(tmp_path, reference):
  config = tiny_config()
  config.stages = "stage_one,stage_two"
  config.model.ch = 32
  config.model.num_groups = 8
  config.teacher.checkpoint = str(reference / "teacher" / "checkpoints")
  with pytest.raises(ValueError, match=r"teacher checkpoint .* does not match the model config "
                                       r"at parameter \S+: checkpoint shape \(\d+,.*\) vs config "
                                       r"shape") as info:
    pipeline.run(config, tmp_path)
  assert "\n" not in str(info.value)
  assert not (tmp_path / "stage_one").exists()


def test_missing_earlier_stage_is_a_clear_error(tmp_path):
  config = tiny_config()
  config.stages = "stage_two"
  with pytest.raises(ValueError, match="stage_one is not complete .* add stage_one to "
                                       "--config.stages"):
    pipeline.run(config, tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("start_num_steps", 12, "stage_two.start_num_steps=12 is not end_num_steps=1 times a power"),
    ("end_num_steps", 8, "must be integers with 1 <= end_num_steps < start_num_steps"),
    ("train_steps_per_halving", 0, "stage_two.train_steps_per_halving=0 must be > 0"),
])
def test_stage_two_validation(tmp_path, field, value, message):
  config = tiny_config()
  config.stage_two[field] = value
  with pytest.raises(ValueError, match=message):
    pipeline.run(config, tmp_path)


def test_stage_one_objective_at_initialisation_is_the_closed_form():
  """At initialisation the student is the teacher's conditional model, so for a fixed w the
  loss is ω(λ)·w²·‖x̂_c − x̂_u‖² (since (1+w)x̂_c − w x̂_u − x̂_c = w (x̂_c − x̂_u)), divided
  by (1+w)² with the inverse-square weighting. With a range of w, each example's w is
  ``w_min + (w_max − w_min)·u^power`` from the objective's own key."""
  config = tiny_config()
  teacher = models.build_unet(config)
  student = models.build_unet(config, use_w_embedding=True, dropout=0.0)  # as stage one trains
  shape = (4, 8, 8, 1)
  t_params = models.init_params(teacher, jax.random.key(0), shape)
  flat, unravel = ravel_pytree(t_params)
  t_params = unravel(0.2 * jax.random.normal(jax.random.key(1), flat.shape))
  s_params = models.student_params_from_teacher(
      t_params, models.init_params(student, jax.random.key(2), shape))
  batch = {"image": jax.random.uniform(jax.random.key(3), shape, minval=-1, maxval=1),
           "label": jnp.array([1, 3, 5, 7])}
  key = jax.random.key(4)
  for w_min, w_max, weighting, power in (
      (0.0, 0.0, "uniform", 1.0), (0.7, 0.7, "uniform", 1.0), (3.0, 3.0, "uniform", 1.0),
      (3.0, 3.0, "inverse_square", 1.0), (0.0, 4.0, "uniform", 1.0),
      (0.0, 4.0, "inverse_square", 2.0)):
    objective = losses.stage_one_objective(family.of(config), w_min=w_min, w_max=w_max,
                                           w_weighting=weighting, w_power=power)
    loss, _ = objective(s_params, t_params, batch, key)
    # The same draws of t, ε and w, then the closed form from two plain teacher evaluations.
    k_t, k_eps, k_w, _ = jax.random.split(key, 4)
    w = w_min + (w_max - w_min) * np.asarray(jax.random.uniform(k_w, (4,))) ** power
    t = jax.random.uniform(k_t, (4,))
    lam = np.asarray(schedules.cosine_logsnr(t))
    eps = jax.random.normal(k_eps, shape)
    alpha, sigma = (np.sqrt(1 / (1 + np.exp(s * lam)))[:, None, None, None] for s in (-1, 1))
    z = alpha * np.asarray(batch["image"]) + sigma * np.asarray(eps)
    def x_of(labels):
      v = teacher.apply({"params": t_params}, jnp.asarray(z, jnp.float32), lam, labels)
      return alpha * z - sigma * np.asarray(v)
    diff = x_of(batch["label"]) - x_of(jnp.full((4,), 10))
    per_example = np.maximum(np.exp(lam), 1.0) * w**2 * np.mean(diff**2, axis=(1, 2, 3))
    if weighting == "inverse_square":  # relative to the guided target's scale (1 + w)
      per_example /= (1 + w) ** 2
    expected = np.mean(per_example)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-3, atol=1e-6)
