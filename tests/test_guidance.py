import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import guidance


def test_guided_x_is_extrapolation_from_uncond_through_cond():
  k1, k2 = jax.random.split(jax.random.key(0))
  xc = jax.random.normal(k1, (3, 2, 2, 1))
  xu = jax.random.normal(k2, (3, 2, 2, 1))
  w = jnp.array([0.0, 1.0, 4.0])
  got = guidance.guided_x(xc, xu, w)
  np.testing.assert_allclose(got[0], xc[0], atol=1e-6)  # w = 0: conditional alone
  np.testing.assert_allclose(got[1], 2 * xc[1] - xu[1], atol=1e-6)
  np.testing.assert_allclose(got[2], xu[2] + 5 * (xc[2] - xu[2]), atol=1e-5)
  np.testing.assert_allclose(guidance.guided_x(xc, xu, -1.0), xu, atol=1e-6)


def test_guided_x_refuses_w_of_wrong_shape():
  x = jnp.zeros((3, 2, 2, 1))
  with pytest.raises(ValueError, match="w has shape"):
    guidance.guided_x(x, x, jnp.zeros((4,)))


def test_sample_w_is_uniform_on_the_interval():
  w = np.asarray(guidance.sample_w(jax.random.key(0), 100000, 0.0, 4.0))
  assert w.min() >= 0.0 and w.max() <= 4.0
  np.testing.assert_allclose(w.mean(), 2.0, atol=0.03)
  np.testing.assert_allclose(w.var(), 16 / 12, atol=0.03)
  with pytest.raises(ValueError, match="w_min"):
    guidance.sample_w(jax.random.key(0), 4, 2.0, 1.0)


def test_sample_w_power_draws_small_w_more_often():
  # w = 4·u^2 with u ~ U[0, 1]: P(w < 4f) = P(u < sqrt(f)) = sqrt(f).
  w = np.asarray(guidance.sample_w(jax.random.key(1), 200000, 0.0, 4.0, power=2.0))
  assert w.min() >= 0.0 and w.max() <= 4.0
  for f in (0.01, 0.1, 0.25, 0.5, 0.9):
    np.testing.assert_allclose(np.mean(w < 4.0 * f), np.sqrt(f), atol=0.005)
  shifted = np.asarray(guidance.sample_w(jax.random.key(1), 200000, 1.0, 3.0, power=0.5))
  np.testing.assert_allclose(np.mean(shifted < 1.5), 0.25 ** 2, atol=0.005)
  with pytest.raises(ValueError, match="w_sample_power"):
    guidance.sample_w(jax.random.key(0), 4, 0.0, 4.0, power=0.0)
