"""Stage one and stage two: the target identity, the stochastic grid, the student at
initialisation, and the objectives' wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from distill import denoiser, diffusion, family, losses, models, schedules
from distill.config_utils import load_config


def _randomise(params, seed, scale=0.3):
  flat, unravel = ravel_pytree(params)
  return unravel(flat + scale * jax.random.normal(jax.random.key(seed), flat.shape))


@pytest.fixture(scope="module")
def nets():
  """A tiny teacher and student with randomised (non-trivial) parameters, and a batch."""
  config = load_config("digits:runlocal")
  teacher = models.build_unet(config)
  student = models.build_unet(config, use_w_embedding=True)
  shape = (6, 8, 8, 1)
  t_params = _randomise(models.init_params(teacher, jax.random.key(0), shape), seed=1)
  s_params = _randomise(models.init_params(student, jax.random.key(2), shape), seed=3)
  k1, k2 = jax.random.split(jax.random.key(4))
  batch = {"image": jax.random.uniform(k1, shape, minval=-1, maxval=1),
           "label": jnp.array([0, 1, 2, 3, 4, 5], jnp.int32)}
  return dict(config=config, family=family.of(config), teacher=teacher, student=student,
              t_params=t_params,
              s_params=s_params, batch=batch, z=jax.random.normal(k2, shape))


def _teacher_fn(nets, w):
  return denoiser.denoise_fn(nets["family"], nets["s_params"], nets["batch"]["label"], w,
                             net=nets["student"])


def _np_alpha_sigma(t):
  """(α_t, σ_t) in float64; t = 0 is the data (α = 1, σ = 0): a sampler's step to 0 ends on
  its x-prediction (``diffusion.sample_deterministic``), not on z at λ_max."""
  lam = np.asarray(schedules.cosine_logsnr(t), np.float64)[:, None, None, None]
  at_data = (np.asarray(t) == 0.0)[:, None, None, None]
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  return np.where(at_data, 1.0, alpha), np.where(at_data, 0.0, sigma)


def _np_ddim(z, x, t, s):
  """Eq. 2 in float64, written out: z_s = α_s x + σ_s (z_t − α_t x) / σ_t."""
  (a_t, s_t), (a_s, s_s) = _np_alpha_sigma(t), _np_alpha_sigma(s)
  return a_s * x + s_s * (z - a_t * x) / s_t


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_one_student_step_lands_on_two_teacher_steps(nets, n):
  """The defining identity of x̃ (docs/design.md §1.9), on every example: one student DDIM step
  t → t'' with x̃ lands on the teacher's two steps t → t' → t'', written out in float64.

  Examples with i = 1 end on the data (t'' = 0), where a step's endpoint is its x-prediction:
  there x̃ must be the teacher's x̂ at t'. At N = 1 that is every example (t = 1, t' = 1/2).
  """
  w = jnp.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
  fn = _teacher_fn(nets, w)
  i = np.array([1, n, max(n // 2, 1), 1, n, max(n - 1, 1)])
  t = i / n
  z = nets["z"]
  x_target = np.asarray(losses.stage_two_target(fn, z, jnp.asarray(t, jnp.float32), n),
                        np.float64)
  # The teacher's two steps, written independently.
  t_mid, t_end = np.maximum(t - 0.5 / n, 0.0), np.maximum(t - 1.0 / n, 0.0)
  np.testing.assert_array_equal(t_end == 0.0, i == 1)  # both kinds for N > 1, all data at N = 1
  assert np.all(t_mid > 0.0)
  z64 = np.asarray(z, np.float64)
  x_t = np.asarray(fn(z, jnp.asarray(t, jnp.float32)), np.float64)
  z_mid = _np_ddim(z64, x_t, t, t_mid)
  x_mid = np.asarray(fn(jnp.asarray(z_mid, jnp.float32), jnp.asarray(t_mid, jnp.float32)),
                     np.float64)
  z_end = _np_ddim(z_mid, x_mid, t_mid, t_end)
  student_end = _np_ddim(z64, x_target, t, t_end)
  np.testing.assert_allclose(student_end, z_end, atol=2e-5, rtol=1e-5)
  # Not a fixed point: the target differs from the teacher's one step (x̂ at t) everywhere.
  assert np.all(np.abs(x_target - x_t).reshape(len(t), -1).max(axis=1) > 1e-2)


def test_one_step_target_is_the_teachers_two_step_sample(nets):
  """N = 1: x̃ at t = 1 is what the teacher's own 2-step DDIM sampler returns from z_1."""
  w = jnp.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
  fn = _teacher_fn(nets, w)
  z = nets["z"]
  x_target = losses.stage_two_target(fn, z, jnp.ones((6,)), 1)
  two_steps = diffusion.sample_deterministic(fn, z, 2)
  np.testing.assert_allclose(x_target, two_steps, atol=1e-5)
  assert float(jnp.max(jnp.abs(two_steps - diffusion.sample_deterministic(fn, z, 1)))) > 0.1


def test_finer_grid_target_for_the_stochastic_sampler(nets):
  """t = i/(2N): two teacher steps of 1/(2N) from every point; at i = 1 the one step to 0."""
  n = 4
  w = jnp.full((6,), 1.5)
  fn = _teacher_fn(nets, w)
  t = jnp.array([1, 2, 3, 5, 7, 8]) / (2 * n)
  z = nets["z"]
  x_target = np.asarray(losses.stage_two_target(fn, z, t, n), np.float64)
  np.testing.assert_allclose(x_target[0], np.asarray(fn(z, t))[0], atol=1e-5)  # t' = 0
  t_mid, t_end = np.maximum(t - 0.5 / n, 0.0), np.maximum(t - 1.0 / n, 0.0)
  z_mid = _np_ddim(np.asarray(z, np.float64), np.asarray(fn(z, t), np.float64), t, t_mid)
  x_mid = np.asarray(fn(jnp.asarray(z_mid, jnp.float32), jnp.asarray(t_mid, jnp.float32)),
                     np.float64)
  with np.errstate(invalid="ignore"):  # example 0 has t' = 0: no second step
    z_end = _np_ddim(z_mid, x_mid, t_mid, t_end)
  np.testing.assert_allclose(x_target[1], x_mid[1], atol=1e-5)  # t = 1/N: t'' = 0
  student_end = _np_ddim(np.asarray(z, np.float64), x_target, t, t_end)
  np.testing.assert_allclose(student_end[2:], z_end[2:], atol=2e-4, rtol=1e-4)
  times = np.asarray(losses.stage_two_times(jax.random.key(0), 4000, n, for_stochastic=True))
  assert set(np.round(times * 2 * n).astype(int)) == set(range(1, 2 * n + 1))
  times = np.asarray(losses.stage_two_times(jax.random.key(0), 4000, n, for_stochastic=False))
  assert set(np.round(times * n).astype(int)) == set(range(1, n + 1))
