"""The training engine: teacher loop on every data set, exact resume, checkpoint fall-back,
sharding invariance, non-finite steps, and config validation."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from distill import (checkpoints, config_validation, family, input_pipeline, losses, models,
                     pipeline, sharding, train)
from distill.config_utils import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(steps=6, **overrides):
  config = load_config("digits:runlocal")
  config.teacher.num_train_steps = steps
  config.teacher.sample_every = 0
  config.num_devices = 1  # sharding itself is tested below, 1 vs 8 devices
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def _tree_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def _mean_objective(config, params, seeds=range(6)):
  objective = jax.jit(losses.teacher_objective(family.of(config),
                                               p_uncond=config.teacher.p_uncond))
  batches = input_pipeline.train_batches(config.data, global_batch_size=64, seed=99)
  return float(np.mean([objective(params, None, batches[s], jax.random.key(1000 + s))[0]
                        for s in seeds]))


def test_digits_teacher_loss_decreases(tmp_path):
  # The optimiser of tiny_config (the same compiled step as the runs below): only the length
  # and the logging differ.
  config = tiny_config(steps=80, **{"teacher.checkpoint_every": 80, "teacher.log_every": 40})
  mesh = pipeline.make_mesh(config)
  state = pipeline.train_teacher(config, tmp_path, mesh)
  model = models.build_unet(config)
  init = models.init_params(model, jax.random.fold_in(pipeline.stage_key(config, "teacher"), 0),
                            models.model_input_shape(config))
  before, after = _mean_objective(config, init), _mean_objective(config, state.params)
  print(f"teacher loss {before:.4f} -> {after:.4f}")
  assert after < 0.8 * before
  assert int(state.step) == 80


@pytest.mark.parametrize("name,num_devices", [("cifar10:runlocal", 1),
                                              ("imagenet64:runlocal", -1)])
def test_teacher_loop_runs_on_mock_tfds(tmp_path, name, num_devices):
  config = load_config(name)
  config.num_devices = num_devices  # -1: all 8 devices, the sharded path end to end
  config.teacher.num_train_steps = 4
  config.teacher.sample_every = 4
  with tfds.testing.mock_data(num_examples=64):
    state = pipeline.train_teacher(config, tmp_path, pipeline.make_mesh(config))
  assert int(state.step) == 4
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  assert (tmp_path / "teacher" / "checkpoints" / "4").is_dir()
  assert (tmp_path / "teacher" / "samples" / "step_00000004.png").is_file()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """6 steps in one go (checkpoints at 3 and 6)."""
  workdir = tmp_path_factory.mktemp("straight")
  config = tiny_config(steps=6)
  state = pipeline.train_teacher(config, workdir, pipeline.make_mesh(config))
  return jax.device_get(state)


def test_resume_is_bit_identical(tmp_path, straight_run):
  config = tiny_config(steps=3)
  pipeline.train_teacher(config, tmp_path, pipeline.make_mesh(config))
  config = tiny_config(steps=6)
  resumed = jax.device_get(pipeline.train_teacher(config, tmp_path, pipeline.make_mesh(config)))
  assert int(resumed.step) == 6
  assert _tree_equal(resumed.params, straight_run.params)
  assert _tree_equal(resumed.ema_params, straight_run.ema_params)
  assert _tree_equal(resumed.opt_state, straight_run.opt_state)


def test_truncated_newest_checkpoint_falls_back_to_previous(tmp_path, straight_run, caplog):
  config = tiny_config(steps=6)
  pipeline.train_teacher(config, tmp_path, pipeline.make_mesh(config))
  ckpt_dir = tmp_path / "teacher" / "checkpoints"
  damaged = 0
  for f in (ckpt_dir / "6" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:5])
      damaged += 1
  assert damaged
  # The rerun restores step 3 (warning), sets step 6 aside, and retrains 3 -> 6 exactly.
  state = jax.device_get(pipeline.train_teacher(config, tmp_path, pipeline.make_mesh(config)))
  assert "is unreadable" in caplog.text
  assert (tmp_path / "teacher" / "checkpoints_unreadable" / "6").is_dir()
  assert _tree_equal(state.params, straight_run.params)
  assert sorted(checkpoints.Checkpoints(ckpt_dir).all_steps()) == [3, 6]


def teacher_step_parts():
  """``(objective, tx, schedule, initial params, batches of 16)`` of the tiny teacher, for
  running its train step on several meshes."""
  config = tiny_config()
  model = models.build_unet(config)
  objective = losses.teacher_objective(family.of(config), p_uncond=0.1)
  tx, schedule = train.make_optimizer(config.teacher)
  params = jax.device_get(
      models.init_params(model, jax.random.key(0), models.model_input_shape(config)))
  return (objective, tx, schedule, params,
          input_pipeline.train_batches(config.data, global_batch_size=16, seed=0))


def test_eight_devices_give_the_same_loss_as_one():
  assert jax.device_count() >= 8
  objective, tx, schedule, params, batches = teacher_step_parts()
  batch = batches[0]
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    step = train.make_train_step(objective, tx, schedule, ema_decay=0.9, mesh=mesh)
    state = jax.device_put(train.init_state(params, tx), sharding.replicated(mesh))
    losses_n = []
    for _ in range(2):
      state, metrics = step(state, None, sharding.global_batch(mesh, batch), jax.random.key(3))
      losses_n.append(float(metrics["loss"]))
    results.append((losses_n, jax.device_get(state.params)))
  np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), results[0][1],
               results[1][1])


@jax.custom_vjp
def _scale_gradient(x, scale):
  """``x`` on the forward pass; its gradient times ``scale`` on the backward pass."""
  return x


def _scale_gradient_fwd(x, scale):
  return x, scale


def _scale_gradient_bwd(scale, g):
  return g * scale, jnp.zeros_like(scale)


_scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def _least_squares(params, frozen, batch, key):
  """A linear least-squares objective with real gradients. ``batch["loss_add"]`` (0, or
  NaN/inf) is added to the loss only, so the gradient stays finite; ``batch["grad_scale"]``
  (1, or inf) scales the gradient of ``w`` only, so the loss stays finite."""
  del frozen, key
  w = _scale_gradient(params["w"], jnp.mean(batch["grad_scale"]))
  residual = batch["x"] @ w + params["b"] - batch["y"]
  return jnp.mean(jnp.square(residual)) + jnp.mean(batch["loss_add"]), {}


_SPOIL = {"nan_loss": ("loss_add", np.nan), "inf_loss": ("loss_add", np.inf),
          "inf_gradient": ("grad_scale", np.inf)}


def _least_squares_batches(num, spoiled=None):
  """``num`` batches of 4 examples; ``spoiled`` maps a step to a ``_SPOIL`` kind."""
  rng = np.random.default_rng(0)
  batches = []
  for i in range(num):
    batch = {"x": rng.normal(size=(4, 3)).astype(np.float32),
             "y": rng.normal(size=(4,)).astype(np.float32),
             "loss_add": np.zeros((4,), np.float32), "grad_scale": np.ones((4,), np.float32)}
    if spoiled and i in spoiled:
      field, value = _SPOIL[spoiled[i]]
      batch[field] = np.full((4,), value, np.float32)
    batches.append(batch)
  return batches


def _nonfinite_config(**overrides):
  return tiny_config(steps=10, **{"teacher.lr": 0.05, "teacher.warmup_steps": 0,
                                  "teacher.lr_decay": "linear", **overrides})


def _host_copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)  # the step donates its input


def _leaves_equal(a, b):
  return [bool(np.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                     strict=True)]


_INIT = {"w": np.array([0.5, -1.0, 2.0], np.float32), "b": np.array(0.3, np.float32)}


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "inf_gradient"])
def test_non_finite_step_leaves_state_bitwise_unchanged(kind):
  """Step 2 of 5 has a non-finite loss (finite gradient) or a finite loss with a non-finite
  gradient, at a learning rate > 0, between steps with real gradients: params, EMA and
  optimiser state stay bitwise what they were, the step and the skip counts advance, and the run
  ends exactly where a run that never saw step 2 ends."""
  config = _nonfinite_config()
  mesh = sharding.make_mesh(1)
  tx, schedule = train.make_optimizer(config.teacher)
  step_fn = train.make_train_step(_least_squares, tx, schedule, ema_decay=0.5, mesh=mesh)

  def run(batches):
    state = jax.device_put(train.init_state(_INIT, tx), sharding.replicated(mesh),
                           may_alias=False)
    states, metrics = [_host_copy(state)], []
    for batch in batches:
      state, m = step_fn(state, None, sharding.global_batch(mesh, batch), jax.random.key(0))
      states.append(_host_copy(state))
      metrics.append(jax.device_get(m))
    return states, metrics

  clean = _least_squares_batches(5)
  states, metrics = run(_least_squares_batches(5, {2: kind}))
  bad = metrics[2]
  assert float(bad["learning_rate"]) > 0
  if kind.endswith("loss"):
    assert not np.isfinite(bad["loss"]) and np.isfinite(bad["grad_norm"]) and bad["grad_norm"] > 0
  else:
    assert np.isfinite(bad["loss"]) and not np.isfinite(bad["grad_norm"])
  for i, (before, after) in enumerate(zip(states[:-1], states[1:])):
    assert int(after.step) == i + 1
    for part in ("params", "ema_params", "opt_state"):
      same = _leaves_equal(getattr(before, part), getattr(after, part))
      if i == 2:
        assert all(same), (part, same)
      else:  # every leaf moves on a good step: Adam's moments and counts, params, EMA
        assert not any(same), (i, part, same)
  assert [int(m["skipped"]) for m in metrics] == [0, 0, 1, 0, 0]
  assert [int(s.skipped_total) for s in states[1:]] == [0, 0, 1, 1, 1]
  assert [int(s.skipped_in_row) for s in states[1:]] == [0, 0, 1, 0, 0]
  never_saw, _ = run(clean[:2] + clean[3:])
  for part in ("params", "ema_params", "opt_state"):
    assert all(_leaves_equal(getattr(states[-1], part), getattr(never_saw[-1], part))), part


def test_consecutive_non_finite_steps_stop_the_run(tmp_path):
  """Limit 3 in a row: one skipped step, a good one, then four skipped of both kinds. The run
  stops at the third in a row (step 7), not at the third in all (step 6); every checkpoint
  (2, 4, 6) is finite, and 6 holds the parameters of 4."""
  import grain  # pylint: disable=import-outside-toplevel
  config = _nonfinite_config(**{"teacher.max_consecutive_nonfinite": 3,
                                "teacher.checkpoint_every": 2, "teacher.log_every": 2})
  mesh = sharding.make_mesh(1)
  spoiled = {2: "nan_loss", 4: "inf_gradient", 5: "nan_loss", 6: "inf_gradient", 7: "nan_loss"}
  batches = grain.MapDataset.source(_least_squares_batches(10, spoiled))
  tx, _ = train.make_optimizer(config.teacher)
  make_state = lambda: train.init_state(_INIT, tx)
  with pytest.raises(train.NonFiniteError, match=r"3 consecutive steps \(up to step 7\)"):
    train.train(name="teacher", stage_cfg=config.teacher, objective=_least_squares,
                init_params=lambda: _INIT, frozen=None, batches=batches, mesh=mesh,
                workdir=tmp_path, config=config, base_key=jax.random.key(0))
  ckpts = checkpoints.Checkpoints(tmp_path / "checkpoints")
  assert sorted(ckpts.all_steps()) == [2, 4, 6]
  abstract = train.abstract_state(make_state, mesh)
  step, last = ckpts.restore_latest(abstract)
  ckpts.close()
  assert step == 6 and int(last.step) == 6
  assert int(last.skipped_total) == 3 and int(last.skipped_in_row) == 2
  saved = {s: {key: checkpoints.read_params(tmp_path / "checkpoints" / str(s),
                                            getattr(abstract, key), key=key)[1]
               for key in ("params", "ema_params")} for s in (2, 4)}
  for key in ("params", "ema_params"):
    assert all(_leaves_equal(getattr(last, key), saved[4][key])), key
    assert not any(_leaves_equal(saved[2][key], saved[4][key])), key
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(last))


def test_a_checkpoints_shapes_are_read_once_and_again_when_it_is_rewritten(tmp_path,
                                                                           monkeypatch):
  """``read_params`` reads a checkpoint's array metadata once per process; a checkpoint deleted
  and written again at the same step, with other shapes, is checked against its new shapes."""
  import shutil  # pylint: disable=import-outside-toplevel
  tx, _ = train.make_optimizer(tiny_config().teacher)
  mesh = sharding.make_mesh(1)
  reads = []
  real = checkpoints._read_stored_shapes  # pylint: disable=protected-access
  monkeypatch.setattr(checkpoints, "_read_stored_shapes", lambda d: reads.append(d) or real(d))

  def save(params):
    ckpts = checkpoints.Checkpoints(tmp_path / "checkpoints")
    ckpts.save(1, train.init_state(params, tx), tiny_config())
    ckpts.wait()
    ckpts.close()
    return train.abstract_state(lambda: train.init_state(params, tx), mesh).ema_params

  small = save({"w": jnp.arange(3.0)})
  for _ in range(2):
    _, got = checkpoints.read_params(tmp_path / "checkpoints", small)
    np.testing.assert_array_equal(got["w"], np.arange(3.0))
  assert len(reads) == 1
  shutil.rmtree(tmp_path / "checkpoints" / "1")
  large = save({"w": jnp.arange(4.0)})
  with pytest.raises(ValueError, match=r"does not match the model config at parameter w: "
                                       r"checkpoint shape \(4,\) vs config shape \(3,\)"):
    checkpoints.read_params(tmp_path / "checkpoints", small)
  np.testing.assert_array_equal(checkpoints.read_params(tmp_path / "checkpoints", large)[1]["w"],
                                np.arange(4.0))
  assert len(reads) == 2


def test_checkpoint_refuses_a_non_finite_state(tmp_path):
  """No checkpoint ever holds NaN or inf: ``save`` raises and leaves no step directory."""
  tx, _ = train.make_optimizer(tiny_config().teacher)
  state = train.init_state({"w": jnp.ones((3,)), "b": jnp.zeros(())}, tx)
  spoil = lambda tree, value: jax.tree.map(
      lambda x: x * value if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
  ckpts = checkpoints.Checkpoints(tmp_path / "checkpoints")
  ckpts.save(1, state, tiny_config())  # a finite state saves
  ckpts.wait()
  bad_states = {2: state.replace(params={"w": jnp.array([1.0, jnp.nan, 1.0]),
                                         "b": jnp.zeros(())}),
                3: state.replace(ema_params=spoil(state.ema_params, jnp.inf)),
                4: state.replace(opt_state=spoil(state.opt_state, jnp.nan))}
  for step, bad in bad_states.items():
    with pytest.raises(FloatingPointError, match=f"refusing to checkpoint step {step}"):
      ckpts.save(step, bad, tiny_config())
  ckpts.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
  reopened = checkpoints.Checkpoints(tmp_path / "checkpoints")
  assert reopened.all_steps() == [1]
  reopened.close()


@pytest.mark.parametrize("change,message", [
    ({"teacher.batch_size": 12}, "teacher.batch_size=12 is not divisible by the 8 devices"),
    ({"data.image_size": 6}, "data.image_size=6 is not divisible by 2\\^\\(levels-1\\)=4"),
    ({"data.name": "mnist"}, "data.name='mnist' is unknown"),
    ({"teacher.p_uncond": 1.5}, "teacher.p_uncond=1.5 must be in \\[0, 1\\]"),
    ({"teacher.num_train_steps": 0}, "teacher.num_train_steps=0 must be > 0"),
    ({"teacher.lr": -1e-3}, "teacher.lr=-0.001 must be > 0"),
    ({"model.attn_resolutions": (16,)}, "model.attn_resolutions contains \\[16\\]"),
    ({"workdir": ""}, "--workdir is missing"),
    ({"stages": "teacher,stage_nine"}, "stages='teacher,stage_nine' names unknown"),
    ({"stage_one.w_loss_weight": "cubic"}, "stage_one.w_loss_weight='cubic' is not one of"),
    ({"stage_two.w_sample_power": 0.0}, "stage_two.w_sample_power=0.0 must be > 0"),
])
def test_config_validation_messages(change, message):
  config = load_config("digits:runlocal")
  config.model.ch_mult = (1, 2, 2)
  workdir = "/tmp/unused"
  for key, value in change.items():
    if key == "workdir":
      workdir = value
    elif "." in key:
      section, field = key.split(".")
      config[section][field] = value
    else:
      config[key] = value
  with pytest.raises(ValueError, match=message) as info:
    config_validation.validate(config, workdir, num_devices=8)
  assert "\n" not in str(info.value)


def test_unprepared_tfds_data_set_says_how_to_prepare(tmp_path):
  config = load_config("imagenet64:runlocal")
  config.data.data_dir = str(tmp_path / "no_tfds_here")
  with pytest.raises(ValueError, match="tfds build imagenet_resized/64x64"):
    input_pipeline.train_batches(config.data, global_batch_size=8, seed=0)


def test_data_is_a_pure_function_of_step_and_process():
  config = load_config("digits")
  a = input_pipeline.train_batches(config.data, global_batch_size=8, seed=0)
  b = input_pipeline.train_batches(config.data, global_batch_size=8, seed=0)
  np.testing.assert_array_equal(a[17]["image"], b[17]["image"])
  it = input_pipeline.iterate(a, 17)
  np.testing.assert_array_equal(next(it)["label"], a[17]["label"])
  shards = [input_pipeline.train_batches(config.data, global_batch_size=8, seed=0,
                                         process_index=i, process_count=2) for i in (0, 1)]
  assert shards[0][0]["image"].shape == (4, 8, 8, 1)
  for step in (0, 250):  # 250: past the first epoch of 1500 images
    np.testing.assert_array_equal(
        np.concatenate([shard[step]["image"] for shard in shards]), a[step]["image"])
  train_x, _ = input_pipeline.digits_arrays("train")
  held_x, _ = input_pipeline.digits_arrays("held_out")
  assert len(train_x) == 1500 and len(held_x) == 297
  assert train_x.min() == -1.0 and train_x.max() == 1.0


def test_cli_refuses_a_missing_workdir(tmp_path):
  """One line, before anything is built. (The CLI with flag overrides, from another directory
  and through a resume, is tests/test_pipeline.py's kill-and-resume scenario.)"""
  base = [sys.executable, "-m", "distill.main", f"--config={REPO}/configs/digits.py:runlocal"]
  bad = subprocess.run(base, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--workdir is missing" in bad.stderr
  assert not list(tmp_path.iterdir())
