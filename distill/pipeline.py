"""The pipeline: each stage of ``config.stages`` in order, each resuming from its checkpoints.

Stage directories under the workdir: ``teacher/`` (checkpoints, sample grids, TensorBoard).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
from etils import epath

from distill import (config_validation, denoiser, diffusion, input_pipeline, losses, models,
                     sharding, train)


def stage_key(config, name: str) -> jax.Array:
  """Base key of a stage: the run's seed folded with a fixed id of the stage's name."""
  return jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def make_mesh(config):
  return sharding.make_mesh(None if config.num_devices == -1 else config.num_devices)


def guided_sample_fn(model, config, *, w_values, num_steps: int, per_row: int | None = None):
  """``sample_fn(state)`` for progress grids: guided DDIM of the EMA params, a row per ``w``."""
  per_row = per_row or min(config.data.num_classes, 10)
  rows = len(w_values)
  labels = jnp.tile(jnp.arange(per_row) % config.data.num_classes, rows)
  w = jnp.repeat(jnp.asarray(w_values, jnp.float32), per_row)
  z1 = jax.random.normal(jax.random.key(1234), models.model_input_shape(config, rows * per_row))

  @jax.jit
  def sample(params):
    fn = denoiser.guided_denoise_fn(model, params, labels, w)
    return diffusion.sample_deterministic(fn, z1, num_steps)

  return lambda state: (sample(state.ema_params), rows)


def train_teacher(config, workdir, mesh) -> train.TrainState:
  """Trains the classifier-free-guided teacher (label dropout, v-prediction)."""
  cfg = config.teacher
  model = models.build_unet(config)
  key = stage_key(config, "teacher")
  batches = input_pipeline.train_batches(config.data, global_batch_size=cfg.batch_size,
                                         seed=config.seed)
  return train.train(
      name="teacher", stage_cfg=cfg,
      objective=losses.teacher_objective(model, p_uncond=cfg.p_uncond),
      init_params=lambda: models.init_params(model, jax.random.fold_in(key, 0),
                                             models.model_input_shape(config)),
      frozen=None, batches=batches, mesh=mesh, workdir=epath.Path(workdir) / "teacher",
      config=config, base_key=jax.random.fold_in(key, 1),
      sample_fn=guided_sample_fn(model, config, w_values=cfg.sample_w,
                                 num_steps=cfg.sample_steps) if cfg.sample_every else None)


def run(config, workdir) -> None:
  """Runs ``config.stages`` in order; a finished stage returns at once, so reruns resume."""
  config_validation.validate(config, workdir, num_devices=_mesh_size(config),
                             process_count=jax.process_count())
  mesh = make_mesh(config)
  for stage in config_validation.stages_of(config):
    if stage == "teacher":
      train_teacher(config, workdir, mesh)


def _mesh_size(config) -> int:
  return jax.device_count() if config.num_devices == -1 else config.num_devices
