"""DDIM steps and samplers against independent oracles.

The oracle is Gaussian data ``x ~ N(μ, s²)`` per pixel, whose exact denoiser ``E[x | z_t]`` and
exact probability-flow path are closed-form, plus a float64 NumPy re-implementation of the
paper's update rules written out literally (Eq. 2, Eq. 4–7).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import diffusion, schedules

MU = np.array([0.3, -0.5, 1.0, 0.0], np.float32).reshape(1, 2, 2, 1)
STD = np.array([0.5, 0.2, 1.0, 0.05], np.float32).reshape(1, 2, 2, 1)


def _np_alpha_sigma(t):
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  lam = -2.0 * np.log(np.tan(a * np.asarray(t, np.float64) + b))
  return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam))), lam


def gaussian_denoiser(z, t):
  """Exact E[x | z_t] for x ~ N(MU, STD²): μ + α s² / (α² s² + σ²) · (z − α μ)."""
  alpha, sigma = schedules.alpha_sigma(schedules.cosine_logsnr(t))
  alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
  return MU + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (z - alpha * MU)


def np_gaussian_denoiser(z, t):
  alpha, sigma, _ = _np_alpha_sigma(t)
  mu, s = MU.astype(np.float64), STD.astype(np.float64)
  return mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (z - alpha * mu)


@pytest.fixture(scope="module")
def z1():
  return jax.random.normal(jax.random.key(42), (20000, 2, 2, 1))


def _sampler(kind, n, *, key_impl=None):
  if kind == "deterministic":
    return jax.jit(lambda z: diffusion.sample_deterministic(gaussian_denoiser, z, n))
  return jax.jit(lambda z: diffusion.sample_stochastic(gaussian_denoiser, z, n,
                                                       jax.random.key(7, impl=key_impl)))


def test_ddim_step_with_true_x_lands_on_forward_process():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (5, 3, 3, 2))
  eps = jax.random.normal(k2, (5, 3, 3, 2))
  t = jax.random.uniform(k3, (5,), minval=0.2, maxval=1.0)
  s = t - 0.15
  lt, ls = schedules.cosine_logsnr(t), schedules.cosine_logsnr(s)
  z_t = diffusion.diffuse(x, eps, lt)
  np.testing.assert_allclose(diffusion.ddim_step(z_t, x, lt, ls),
                             diffusion.diffuse(x, eps, ls), atol=1e-5)


def test_two_half_ddim_steps_equal_one_full_step():
  k1, k2 = jax.random.split(jax.random.key(1))
  z_t = jax.random.normal(k1, (4, 2, 2, 3))
  x_hat = jax.random.normal(k2, (4, 2, 2, 3))  # any fixed prediction
  lt, lm, ls = (schedules.cosine_logsnr(v) for v in (0.9, 0.7, 0.5))
  half = diffusion.ddim_step(diffusion.ddim_step(z_t, x_hat, lt, lm), x_hat, lm, ls)
  np.testing.assert_allclose(half, diffusion.ddim_step(z_t, x_hat, lt, ls), atol=1e-5)


@pytest.mark.parametrize("t0", [1.0, 0.6])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_deterministic_sampler_matches_literal_eq2_loop(z1, n, t0):
  """From t0 = 1 (generation) or an intermediate t0 (image-to-image): the grid t0·i/N."""
  z = np.asarray(z1[:64], np.float64)
  for i in range(n, 0, -1):
    t, s = t0 * i / n, t0 * (i - 1) / n
    at, st, _ = _np_alpha_sigma(t)
    as_, ss, _ = _np_alpha_sigma(s)
    x = np_gaussian_denoiser(z, t)
    z = as_ * x + ss * (z - at * x) / st  # Eq. 2
  got = jax.jit(lambda z: diffusion.sample_deterministic(gaussian_denoiser, z, n,
                                                        t_start=t0))(z1[:64])
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
  # The step count as a traced argument (one program for every N): the same grid.
  traced = jax.jit(lambda z, n: diffusion.sample_deterministic(gaussian_denoiser, z, n,
                                                              t_start=t0))
  np.testing.assert_allclose(traced(z1[:64], jnp.int32(n)), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["deterministic", "stochastic"])
def test_one_compiled_sampler_serves_every_step_count(z1, kind):
  traces = []

  def run(z, n):
    traces.append(n)
    if kind == "deterministic":
      return diffusion.sample_deterministic(gaussian_denoiser, z, n)
    return diffusion.sample_stochastic(gaussian_denoiser, z, n, jax.random.key(7))

  run = jax.jit(run)
  for n in (1, 3, 8):  # against the sampler compiled for that N, to float32 rounding
    np.testing.assert_allclose(run(z1[:64], jnp.int32(n)), _sampler(kind, n)(z1[:64]),
                               rtol=1e-5, atol=1e-6)
  assert len(traces) == 1


@pytest.mark.parametrize("t0", [1.0, 0.6])
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_stochastic_sampler_matches_literal_eq4_to_7_loop(z1, n, t0):
  rng = jax.random.key(7)
  z = np.asarray(z1[:64], np.float64)
  t = t0
  j = 0
  while t > t0 / n + 1e-9:  # Eq. 4–7 while t > t0/N
    k, s = t - 2.0 * t0 / n, t - t0 / n
    at, st, _ = _np_alpha_sigma(t)
    ak, sk, lk = _np_alpha_sigma(k)
    as_, ss, ls = _np_alpha_sigma(s)
    x = np_gaussian_denoiser(z, t)
    z_k = ak * x + sk * (z - at * x) / st
    sigma_s_given_k = np.sqrt((1 - np.exp(ls - lk)) * ss**2)
    eps = np.asarray(jax.random.normal(jax.random.fold_in(rng, j), z.shape), np.float64)
    z = (as_ / ak) * z_k + sigma_s_given_k * eps
    t, j = s, j + 1
  x = np_gaussian_denoiser(z, t0 / n)  # t = t0/N: deterministic Eq. 2 step to 0
  assert j == n - 1
  got = jax.jit(lambda z: diffusion.sample_stochastic(gaussian_denoiser, z, n, rng,
                                                      t_start=t0))(z1[:64])
  np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-4)
  traced = jax.jit(lambda z, n: diffusion.sample_stochastic(gaussian_denoiser, z, n, rng,
                                                            t_start=t0))
  np.testing.assert_allclose(traced(z1[:64], jnp.int32(n)), x, rtol=1e-4, atol=1e-4)


def _exact_flow_endpoint(z1):
  a1, s1, _ = _np_alpha_sigma(1.0)
  return MU + STD * (np.asarray(z1, np.float64) - a1 * MU) / np.sqrt(a1**2 * STD**2 + s1**2)


def test_deterministic_sampler_follows_exact_probability_flow(z1):
  # For Gaussian data the probability-flow ODE is linear: z_t = α_t μ + r_t u with
  # r_t² = α_t² s² + σ_t², so the exact sample from z_1 is x = μ + s (z_1 − α_1 μ) / r_1.
  exact = _exact_flow_endpoint(z1)
  errors = {}
  for n in (256, 1024):
    x = np.asarray(_sampler("deterministic", n)(z1))
    errors[n] = np.abs(x - exact).max()
  # DDIM is a first-order solver: ~4/N absolute error here, for every pixel's s.
  assert errors[1024] < 0.01, errors
  assert errors[1024] < errors[256] / 3, errors
  x2 = np.asarray(_sampler("deterministic", 2)(z1))
  assert np.abs(x2 - exact).max() > 0.2


@pytest.mark.parametrize("kind,n", [("deterministic", 4096), ("stochastic", 4096)])
def test_many_step_samplers_reproduce_gaussian_data(z1, kind, n):
  # The statistics do not depend on which generator draws the noise: the "rbg" one draws the
  # stochastic sampler's 4096 × 80 000 normals in 9 s here, threefry (the default) in 21 s.
  # 4096 steps over 80 000 values: run time, not compile time. XLA's default optimisation level
  # (the suite compiles at level 0, tests/conftest.py) runs the stochastic sampler 1.6x faster.
  sampler = _sampler(kind, n, key_impl="rbg").lower(z1).compile(
      compiler_options={"xla_backend_optimization_level": 2})
  x = np.asarray(sampler(z1), np.float64)
  b = x.shape[0]
  mean, std = x.mean(axis=0), x.std(axis=0)
  # 5 standard errors of the estimates, plus 0.002 for the O(1/N) discretisation.
  np.testing.assert_array_less(np.abs(mean - MU[0]), 5 * STD[0] / np.sqrt(b) + 0.002)
  np.testing.assert_array_less(np.abs(std - STD[0]), 5 * STD[0] / np.sqrt(2 * b) + 0.002)


@pytest.mark.parametrize("kind", ["deterministic", "stochastic"])
@pytest.mark.parametrize("n", [1, 2])
def test_few_step_samplers_are_visibly_biased(z1, kind, n):
  std = np.asarray(_sampler(kind, n)(z1)).std(axis=0)
  assert np.all(std < 0.7 * STD[0]), std  # shrunk towards the mean: too few steps


def test_dpm_solver_first_order_step_is_the_ddim_step():
  z, x = jax.random.normal(jax.random.key(1), (2, 4, 2, 2, 1))
  lam_t, lam_s = jnp.array([-3.0, 0.5, 2.0, -8.0]), jnp.array([-1.0, 1.5, 9.0, 0.0])
  np.testing.assert_allclose(diffusion.dpm_solver_step(z, x, lam_t, lam_s),
                             diffusion.ddim_step(z, x, lam_t, lam_s), rtol=1e-5, atol=1e-6)


def _np_dpm_solver(z1, n, t0=1.0):
  """DPM-Solver++ (2M) written out in float64: ``h = (λ_s − λ_t)/2``,
  ``z_s = (σ_s/σ_t) z_t − α_s (e^{−h} − 1) D``, ``D = x̂`` at the first and the last step, else
  ``D = (1 + 1/(2r)) x̂ − x̂_prev/(2r)`` with ``r = h_prev/h``."""
  z, x_prev, h_prev = np.asarray(z1, np.float64), None, None
  for i in range(n, 0, -1):
    _, sigma_t, lam_t = _np_alpha_sigma(t0 * i / n)
    alpha_s, sigma_s, lam_s = _np_alpha_sigma(t0 * (i - 1) / n)
    x = np_gaussian_denoiser(z, t0 * i / n)
    h = (lam_s - lam_t) / 2
    d = x if x_prev is None or i == 1 else (1 + h / (2 * h_prev)) * x - h / (2 * h_prev) * x_prev
    z = sigma_s / sigma_t * z - alpha_s * (np.exp(-h) - 1) * d
    x_prev, h_prev = x, h
  return d


@pytest.mark.parametrize("n,t0", [(1, 1.0), (2, 1.0), (3, 1.0), (8, 1.0), (32, 1.0), (8, 0.6)])
def test_dpm_solver_matches_literal_float64_loop(z1, n, t0):
  got = jax.jit(lambda z: diffusion.sample_dpm_solver(gaussian_denoiser, z, n,
                                                      t_start=t0))(z1[:256])
  np.testing.assert_allclose(got, _np_dpm_solver(z1[:256], n, t0), rtol=1e-4, atol=2e-4)


def test_dpm_solver_lands_closer_to_the_flow_endpoint_than_ddim(z1):
  # Time-uniform DPM-Solver++ (2M) with a first-order last step: here it errs by at most 0.27
  # at 8 steps and 0.12 at 16, DDIM by 0.64 and 0.33 (per pixel of s = 0.5: 0.15 and 0.005
  # against 0.34 and 0.18). A second-order last step errs by 1.7 at 8 steps, worse than DDIM.
  exact = _exact_flow_endpoint(z1)
  for n in (8, 16):
    dpm = np.abs(np.asarray(jax.jit(lambda z: diffusion.sample_dpm_solver(
        gaussian_denoiser, z, n))(z1)) - exact).max()
    ddim = np.abs(np.asarray(_sampler("deterministic", n)(z1)) - exact).max()
    assert dpm < 0.5 * ddim, (n, dpm, ddim)
  two = jax.jit(lambda z: diffusion.sample_dpm_solver(gaussian_denoiser, z, 2))(z1[:64])
  np.testing.assert_allclose(two, _sampler("deterministic", 2)(z1[:64]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["deterministic", "stochastic", "dpm_solver"])
def test_sampler_traces_denoiser_once_into_one_loop(sampler):
  calls = []

  def counting_denoiser(z, t):
    calls.append(1)
    return gaussian_denoiser(z, t)

  z = jnp.zeros((2, 2, 2, 1))
  if sampler == "deterministic":
    fn = lambda z: diffusion.sample_deterministic(counting_denoiser, z, 64)
  elif sampler == "dpm_solver":
    fn = lambda z: diffusion.sample_dpm_solver(counting_denoiser, z, 64)
  else:
    fn = lambda z: diffusion.sample_stochastic(counting_denoiser, z, 64, jax.random.key(0))
  jaxpr = jax.make_jaxpr(fn)(z)
  assert len(calls) == 1
  loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("while", "scan")]
  assert len(loops) == 1


@pytest.mark.parametrize("bad", [0, -3, 2.5, 4.0, True, "4", None])
def test_bad_num_steps_is_refused(bad):
  z = jnp.zeros((2, 2, 2, 1))
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.sample_deterministic(gaussian_denoiser, z, bad)
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.sample_stochastic(gaussian_denoiser, z, bad, jax.random.key(0))
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.sample_dpm_solver(gaussian_denoiser, z, bad)


def test_numpy_integer_steps_are_accepted():
  z = jnp.zeros((2, 2, 2, 1))
  out = diffusion.sample_deterministic(gaussian_denoiser, z, np.int64(2))
  assert out.shape == z.shape


def test_ddim_step_refuses_logsnr_that_does_not_broadcast():
  z = jnp.zeros((4, 2, 2, 1))
  with pytest.raises(ValueError, match="logsnr_s"):
    diffusion.ddim_step(z, z, 0.0, jnp.zeros((5,)))
  with pytest.raises(ValueError, match="logsnr_t"):
    diffusion.ddim_step(z, z, jnp.zeros((2, 2)), 0.0)
