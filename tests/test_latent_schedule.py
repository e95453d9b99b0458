"""The discrete teacher schedule in continuous time, the ε/v/x teacher wrappers, and the
teacher's objective on that schedule as the ε→v fine-tuning link (``teacher_v``) uses it."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill import diffusion, losses, sharding, train
from distill.latent import schedule as schedule_lib
from distill.latent import teacher as teacher_lib


def _sd_alphas_cumprod_reference():
  """SD 1.x: β_i = (√0.00085 + i/999·(√0.012 − √0.00085))², ᾱ_i = ∏(1 − β), by a plain loop."""
  a, b = 0.00085 ** 0.5, 0.012 ** 0.5
  out, prod = [], 1.0
  for i in range(1000):
    beta = (a + i / 999 * (b - a)) ** 2
    prod *= 1.0 - beta
    out.append(prod)
  return np.array(out)


SD = schedule_lib.DiscreteSchedule.from_betas()


def test_sd_table_matches_betas_and_published_range():
  np.testing.assert_allclose(SD.alphas_cumprod, _sd_alphas_cumprod_reference(), rtol=1e-12)
  assert SD.alphas_cumprod[0] == pytest.approx(0.99915, abs=1e-5)
  assert SD.alphas_cumprod[-1] == pytest.approx(0.00466, abs=1e-5)
  lam = SD.logsnr_table
  assert lam[0] == pytest.approx(7.069, abs=2e-3) and lam[-1] == pytest.approx(-5.364, abs=2e-3)
  cin = schedule_lib.DiscreteSchedule.from_betas(0.0015, 0.0195)
  assert cin.logsnr_table[0] == pytest.approx(6.501, abs=2e-3)
  assert cin.logsnr_table[-1] == pytest.approx(-8.857, abs=2e-3)


def test_from_diffusers_scheduler_config():
  config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": "epsilon"}
  np.testing.assert_array_equal(
      schedule_lib.DiscreteSchedule.from_config(config).alphas_cumprod, SD.alphas_cumprod)
  with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
    schedule_lib.DiscreteSchedule.from_config(dict(config, rescale_betas_zero_snr=True))
  with pytest.raises(ValueError, match="beta_schedule 'squaredcos_cap_v2'"):
    schedule_lib.DiscreteSchedule.from_config(dict(config, beta_schedule="squaredcos_cap_v2"))
  with pytest.raises(ValueError, match="logsnr_max"):
    schedule_lib.DiscreteSchedule.from_betas(logsnr_max=5.0)


def test_grid_points_reproduce_the_table():
  i = np.arange(1000)
  t = (i + 1) / 1000
  lam = np.asarray(SD.logsnr(t))
  np.testing.assert_allclose(lam, SD.logsnr_table, atol=2e-5)
  # α² = sigmoid(λ) is the teacher's ᾱ_i.
  alpha, _ = diffusion._alpha_sigma(jnp.asarray(lam), jnp.zeros((1000, 1)))
  np.testing.assert_allclose(np.asarray(alpha)[:, 0] ** 2, SD.alphas_cumprod, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(SD.timestep(t)), i, atol=1e-3)
  assert float(SD.logsnr(0.0)) == pytest.approx(SD.logsnr_max)


def test_time_round_trips():
  t = np.linspace(0.0, 1.0, 2049)
  lam = SD.logsnr(t)
  assert np.all(np.diff(np.asarray(lam)) < 0), "λ(t) must decrease strictly"
  np.testing.assert_allclose(np.asarray(SD.time_from_logsnr(lam)), t, atol=1e-5)
  steps = np.linspace(0.0, 999.0, 1777)
  np.testing.assert_allclose(np.asarray(SD.timestep(SD.time_from_timestep(steps))), steps,
                             atol=1e-3)
  # Between grid points λ is linear in t, and the timestep linear too.
  mid = (np.arange(999) + 1.5) / 1000
  np.testing.assert_allclose(np.asarray(SD.logsnr(mid)),
                             0.5 * (SD.logsnr_table[:-1] + SD.logsnr_table[1:]), atol=2e-5)


def test_ddim_step_between_grid_points_is_the_teachers_ddim():
  """Our Eq. 2 step with λ = schedule.logsnr equals diffusers' DDIM update on ᾱ (float64)."""
  rng = np.random.default_rng(0)
  z = rng.standard_normal((3, 4, 4, 2))
  eps_hat = rng.standard_normal(z.shape)
  for i, j in ((999, 749), (500, 250), (10, 0)):
    abar_t, abar_s = SD.alphas_cumprod[i], SD.alphas_cumprod[j]
    x0 = (z - np.sqrt(1 - abar_t) * eps_hat) / np.sqrt(abar_t)
    expected = np.sqrt(abar_s) * x0 + np.sqrt(1 - abar_s) * eps_hat
    lam_t, lam_s = SD.logsnr((i + 1) / 1000), SD.logsnr((j + 1) / 1000)
    x_pred = diffusion.x_from_eps(jnp.asarray(z, jnp.float32), jnp.asarray(eps_hat, jnp.float32),
                                  lam_t)
    got = diffusion.ddim_step(jnp.asarray(z, jnp.float32), x_pred, lam_t, lam_s)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-4, atol=2e-4)


# An analytic model: data x ~ N(0, s² I), whose exact denoiser is x̂ = α s² z / (α² s² + σ²).
S2 = 0.25


def _exact_x(z, logsnr):
  alpha2, sigma2 = jax.nn.sigmoid(logsnr), jax.nn.sigmoid(-logsnr)
  alpha2, sigma2 = (diffusion.per_example(a, z, "logsnr") for a in (alpha2, sigma2))
  return jnp.sqrt(alpha2) * S2 * z / (alpha2 * S2 + sigma2)


def _native_net(kind):
  """A discrete-time network ``net(z, timesteps)`` with the exact ε/v/x prediction."""
  def net(z, timesteps):
    lam = SD.logsnr(SD.time_from_timestep(timesteps))
    alpha, sigma = diffusion._alpha_sigma(lam, z)
    x = _exact_x(z, lam)
    eps = (z - alpha * x) / sigma
    return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x, "sample": x}[kind]
  return net


def test_eps_v_x_teachers_agree_on_an_analytic_model():
  z = jax.random.normal(jax.random.key(0), (6, 4, 4, 3))
  t = jnp.array([0.001, 0.01, 0.25, 0.5, 0.9, 1.0])
  expected = _exact_x(z, SD.logsnr(t))
  fns = {kind: teacher_lib.teacher_denoise_fn(_native_net(kind), SD, prediction_type=kind)
         for kind in teacher_lib.PREDICTION_TYPES}
  for kind, fn in fns.items():
    np.testing.assert_allclose(np.asarray(fn(z, t)), np.asarray(expected), rtol=1e-4, atol=1e-5,
                               err_msg=kind)
  samples = {kind: diffusion.sample_deterministic(fn, z, 8, logsnr_fn=SD.logsnr)
             for kind, fn in fns.items()}
  for kind in ("v_prediction", "sample"):
    np.testing.assert_allclose(np.asarray(samples[kind]), np.asarray(samples["epsilon"]),
                               rtol=1e-4, atol=1e-5, err_msg=kind)
  with pytest.raises(ValueError, match="prediction_type 'eps'"):
    teacher_lib.teacher_denoise_fn(_native_net("epsilon"), SD, prediction_type="eps")


def _gaussian_batch(key, b=64):
  return {"latents": jnp.sqrt(S2) * jax.random.normal(key, (b, 4, 4, 2))}


def _family(v_fn):
  """A test double of a denoiser family on SD's schedule whose condition is the clean latents,
  so that ``v_fn(params, z, t, x)`` can be the exact v plus a known error."""
  return types.SimpleNamespace(
      teacher=None, logsnr_fn=SD.logsnr, null_cond=lambda cond: cond,
      loss_weights=lambda cond: None,
      x_and_cond=lambda batch: (batch["latents"], batch["latents"]),
      v_hat=lambda net, params, z, t, cond, w=None, *, train=False, rngs=None: v_fn(
          params, z, t, cond))


def test_v_objective_is_zero_for_the_true_v_and_weights_a_constant_error():
  batch = _gaussian_batch(jax.random.key(1))
  delta = 0.3

  def true_v(params, z, t, x):
    alpha, sigma = diffusion._alpha_sigma(SD.logsnr(t), z)
    return (alpha * z - x) / sigma + params  # x = α z − σ v

  fam, key = _family(true_v), jax.random.key(2)
  objective = lambda weighting: losses.teacher_objective(fam, p_uncond=0.0, weighting=weighting)
  for weighting in losses.TEACHER_WEIGHTINGS:
    loss, _ = objective(weighting)(jnp.float32(0.0), None, batch, key)
    assert float(loss) < 1e-8
  loss, _ = objective("snr_plus_one")(jnp.float32(delta), None, batch, key)
  assert float(loss) == pytest.approx(delta ** 2, rel=1e-3)
  # snr_trunc: the t drawn inside the objective (the first of its four keys); an error δ in v is
  # σδ in x, so the loss is δ²·max(exp(λ), 1)/(1 + exp(λ)).
  t = jax.random.uniform(jax.random.split(key, 4)[0], (64,))
  lam = np.asarray(SD.logsnr(t), np.float64)
  weight = np.maximum(np.exp(lam), 1.0) / (1.0 + np.exp(lam))
  loss, _ = objective("snr_trunc")(jnp.float32(delta), None, batch, key)
  assert float(loss) == pytest.approx(delta ** 2 * weight.mean(), rel=1e-3)
  with pytest.raises(ValueError, match="weighting='mse'"):
    objective("mse")


def test_v_finetuning_through_the_training_step_reaches_the_linear_optimum():
  """A one-parameter v-model ``v̂ = a·z`` trained by the shared train step on ‖v̂ − v‖² converges
  to the least-squares optimum ``a* = E_t[ασ(1 − s²)] / E_t[α² s² + σ²]`` (t ~ U[0, 1])."""
  t = (np.arange(200000) + 0.5) / 200000
  lam = np.asarray(SD.logsnr(t), np.float64)
  a2, s2 = 1 / (1 + np.exp(-lam)), 1 / (1 + np.exp(lam))
  a_star = np.mean(np.sqrt(a2 * s2) * (1 - S2)) / np.mean(a2 * S2 + s2)

  fam = _family(lambda params, z, t, x: params["a"] * z)
  objective = losses.teacher_objective(fam, p_uncond=0.0, weighting="snr_plus_one")
  schedule = optax.constant_schedule(0.01)
  tx = optax.adam(schedule)
  mesh = sharding.make_mesh(1)
  step = train.make_train_step(objective, tx, schedule, ema_decay=0.0, mesh=mesh)
  state = train.init_state({"a": jnp.float32(1.0)}, tx)
  base = jax.random.key(3)
  for i in range(600):
    state, _ = step(state, None, _gaussian_batch(jax.random.fold_in(base, 10**6 + i), 256), base)
  assert float(state.params["a"]) == pytest.approx(a_star, abs=0.02)


@pytest.mark.parametrize("n", [1, 4, 10])
def test_stage_two_target_on_the_discrete_schedule(n):
  """Alg. 2's x̃ with ``logsnr_fn = schedule.logsnr``: one student DDIM step lands where the
  ε-teacher's two DDIM steps land, both written in float64 on the ᾱ table (grid-aligned t)."""
  from distill import losses  # pylint: disable=import-outside-toplevel
  fn = teacher_lib.teacher_denoise_fn(_native_net("epsilon"), SD, prediction_type="epsilon")
  z = jax.random.normal(jax.random.key(4), (n, 4, 4, 2))
  t = jnp.arange(1, n + 1) / n
  x_target = np.asarray(losses.stage_two_target(fn, z, t, n, logsnr_fn=SD.logsnr), np.float64)
  abar = lambda u: np.where(u > 0, SD.alphas_cumprod[np.clip(np.rint(u * 1000).astype(int) - 1,
                                                              0, 999)], 1.0)[:, None, None, None]

  def ddim(z, x, u, s):
    return np.sqrt(abar(s)) * x + np.sqrt(1 - abar(s)) * (z - np.sqrt(abar(u)) * x) / np.sqrt(
        1 - abar(u))

  t = np.arange(1, n + 1) / n
  t_mid, t_end = t - 0.5 / n, t - 1.0 / n
  z64 = np.asarray(z, np.float64)
  z_mid = ddim(z64, np.asarray(fn(z, t), np.float64), t, t_mid)
  x_mid = np.asarray(fn(jnp.asarray(z_mid, jnp.float32), jnp.asarray(t_mid, jnp.float32)),
                     np.float64)
  z_end = ddim(z_mid, x_mid, t_mid, t_end)
  last = np.isclose(t_end, 0.0)
  assert last.sum() == 1
  np.testing.assert_allclose(ddim(z64, x_target, t, t_end)[~last], z_end[~last], atol=2e-4,
                             rtol=1e-4)
  np.testing.assert_allclose(x_target[last], x_mid[last], atol=1e-5)
