import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import diffusion, schedules


def test_cosine_logsnr_endpoints_and_monotone():
  np.testing.assert_allclose(schedules.cosine_logsnr(0.0), 20.0, atol=1e-3)
  np.testing.assert_allclose(schedules.cosine_logsnr(1.0), -20.0, atol=1e-3)
  t = jnp.linspace(0.0, 1.0, 1001)
  lam = schedules.cosine_logsnr(t)
  assert np.all(np.diff(np.asarray(lam)) < 0)


def test_cosine_logsnr_matches_closed_form_in_float64():
  t = np.linspace(0.0, 1.0, 17)
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  expected = -2.0 * np.log(np.tan(a * t + b))
  np.testing.assert_allclose(schedules.cosine_logsnr(t), expected, rtol=1e-5, atol=1e-4)


def test_cosine_logsnr_midpoint_is_zero_snr_one():
  # The schedule is symmetric: λ(1/2) = 0 for λ_min = −λ_max.
  np.testing.assert_allclose(schedules.cosine_logsnr(0.5), 0.0, atol=1e-5)


def test_alpha_sigma_variance_preserving():
  lam = jnp.linspace(-20.0, 20.0, 101)
  alpha, sigma = schedules.alpha_sigma(lam)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  np.testing.assert_allclose(np.log(alpha**2 / sigma**2), lam, rtol=1e-4, atol=1e-4)


def test_logsnr_to_time_input_inverts_unclipped_cosine():
  t = jnp.linspace(0.05, 0.95, 10)
  lam = schedules.cosine_logsnr(t, -40.0, 40.0)
  np.testing.assert_allclose(schedules.logsnr_to_time_input(lam), t, atol=1e-5)


def test_conversions_invert_each_other():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (6, 4, 4, 3))
  eps = jax.random.normal(k2, (6, 4, 4, 3))
  lam = jax.random.uniform(k3, (6,), minval=-8.0, maxval=8.0)
  z = diffusion.diffuse(x, eps, lam)
  v = diffusion.v_from_x_eps(x, eps, lam)
  np.testing.assert_allclose(diffusion.x_from_v(z, v, lam), x, atol=1e-5)
  np.testing.assert_allclose(diffusion.eps_from_v(z, v, lam), eps, atol=1e-5)
  np.testing.assert_allclose(diffusion.x_from_eps(z, eps, lam), x, atol=1e-4)
  np.testing.assert_allclose(diffusion.eps_from_x(z, x, lam), eps, atol=1e-4)
  # And by hand: z = αx + σε with α² = sigmoid(λ).
  alpha = np.sqrt(1 / (1 + np.exp(-np.asarray(lam))))[:, None, None, None]
  sigma = np.sqrt(1 / (1 + np.exp(np.asarray(lam))))[:, None, None, None]
  np.testing.assert_allclose(z, alpha * x + sigma * eps, atol=1e-5)


@pytest.mark.parametrize("fn", [diffusion.diffuse, diffusion.v_from_x_eps])
def test_logsnr_shape_that_does_not_broadcast_is_refused(fn):
  x = jnp.zeros((4, 2, 2, 1))
  with pytest.raises(ValueError, match="logsnr"):
    fn(x, x, jnp.zeros((3,)))
  with pytest.raises(ValueError, match="logsnr"):
    fn(x, x, jnp.zeros((4, 2)))
