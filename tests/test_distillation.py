"""Stage one and stage two: the target identity, the stochastic grid, the student at
initialisation, and the objectives' wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from distill import denoiser, losses, models, schedules
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
  return dict(config=config, teacher=teacher, student=student, t_params=t_params,
              s_params=s_params, batch=batch, z=jax.random.normal(k2, shape))


def _teacher_fn(nets, w):
  return denoiser.denoise_fn(nets["student"], nets["s_params"], nets["batch"]["label"], w)


def _np_ddim(z, x, t, s):
  """Eq. 2 in float64, written out: z_s = α_s x + σ_s (z_t − α_t x) / σ_t."""
  lt, ls = (np.asarray(schedules.cosine_logsnr(u), np.float64)[:, None, None, None]
            for u in (t, s))
  a_t, s_t = np.sqrt(1 / (1 + np.exp(-lt))), np.sqrt(1 / (1 + np.exp(lt)))
  a_s, s_s = np.sqrt(1 / (1 + np.exp(-ls))), np.sqrt(1 / (1 + np.exp(ls)))
  return a_s * x + s_s * (z - a_t * x) / s_t


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_one_student_step_lands_on_two_teacher_steps(nets, n):
  """The defining identity of x̃ (DESIGN.md §1), checked against a float64 two-step DDIM."""
  w = jnp.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
  fn = _teacher_fn(nets, w)
  i = jnp.array([1, n, max(n // 2, 1), 1, n, max(n - 1, 1)])
  t = i / n
  z = nets["z"]
  x_target = losses.stage_two_target(fn, z, t, n)
  # The teacher's two steps, written independently.
  t_mid, t_end = np.maximum(t - 0.5 / n, 0.0), np.maximum(t - 1.0 / n, 0.0)
  x_t = np.asarray(fn(z, t), np.float64)
  z_mid = _np_ddim(np.asarray(z, np.float64), x_t, t, t_mid)
  x_mid = np.asarray(fn(jnp.asarray(z_mid, jnp.float32), jnp.asarray(t_mid, jnp.float32)),
                     np.float64)
  z_end = _np_ddim(z_mid, x_mid, t_mid, t_end)
  last = np.asarray(t_end) == 0.0
  # Student's single DDIM step from t to t'' with x̃ lands on the teacher's z_t'' ...
  student_end = _np_ddim(np.asarray(z, np.float64), np.asarray(x_target, np.float64), t, t_end)
  np.testing.assert_allclose(student_end[~last], z_end[~last], atol=2e-4, rtol=1e-4)
  # ... and at t'' = 0 the target is the teacher's last x-prediction.
  np.testing.assert_allclose(np.asarray(x_target)[last], x_mid[last], atol=1e-5)
  assert last.any() and (~last).any() or n == 1


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
  z_end = _np_ddim(z_mid, x_mid, t_mid, t_end)
  np.testing.assert_allclose(x_target[1], x_mid[1], atol=1e-5)  # t = 1/N: t'' = 0
  student_end = _np_ddim(np.asarray(z, np.float64), x_target, t, t_end)
  np.testing.assert_allclose(student_end[2:], z_end[2:], atol=2e-4, rtol=1e-4)
  times = np.asarray(losses.stage_two_times(jax.random.key(0), 4000, n, for_stochastic=True))
  assert set(np.round(times * 2 * n).astype(int)) == set(range(1, 2 * n + 1))
  times = np.asarray(losses.stage_two_times(jax.random.key(0), 4000, n, for_stochastic=False))
  assert set(np.round(times * n).astype(int)) == set(range(1, n + 1))
