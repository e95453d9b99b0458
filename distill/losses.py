"""Training objectives: weighting, the teacher's loss, stage one (Eq. 3) and stage two.

An *objective* is a pure function ``(params, frozen, batch, key) -> (loss, metrics)``; it is the
only thing a stage gives the shared training loop (``distill/train.py``). Each sees its teacher
and student through a denoiser family (``distill/family.py``): the family's networks, schedule,
null condition, ``batch -> (x, cond)`` and per-element loss weights (``family.loss_weights``,
None for the plain means). ``frozen`` holds what the stage does not train:
``None`` for the teacher, the teacher's parameters for stage one, and ``{"params":
teacher_params, "num_student_steps": N}`` for stage two (``N`` as an array, so every halving
runs the same compiled step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill import denoiser, diffusion, guidance, schedules


def _per_example_mean(x, weights=None):
  """Per-example mean of ``x²``; with ``weights`` (broadcast to ``x``; the family's
  ``loss_weights``) the mean of ``weights·x²``."""
  sq = jnp.square(x) if weights is None else weights * jnp.square(x)
  return jnp.mean(sq, axis=tuple(range(1, x.ndim)))


def snr_trunc_loss(x, x_pred, eps, eps_pred, weights=None):
  """Per-example ``max(‖x̂ − x‖², ‖ε̂ − ε‖²)`` (pixel means, weighted by ``weights``).

  This is the x-space error weighted by ``ω(λ) = max(exp(λ), 1)`` ("SNR-truncated", docs/design.md
  §1.6), since ``‖ε̂ − ε‖² = exp(λ) ‖x̂ − x‖²`` for predictions tied by ``z``.
  """
  return jnp.maximum(_per_example_mean(x_pred - x, weights),
                     _per_example_mean(eps_pred - eps, weights))


def snr_trunc_weight(logsnr):
  """``ω(λ) = max(exp(λ), 1)``: the SNR-truncated weight of an x-space squared error."""
  return jnp.maximum(jnp.exp(jnp.asarray(logsnr, jnp.float32)), 1.0)


def weighted_x_loss(x_pred, x_target, logsnr, weights=None):
  """Per-example ``ω(λ)·‖x̂ − x̃‖²`` (pixel means, weighted by ``weights``), the distillation
  loss of Eq. 3 / Alg. 2."""
  return snr_trunc_weight(logsnr) * _per_example_mean(x_pred - x_target, weights)


def _noisy_batch(family, x, key, t):
  """``(z_t, λ_t)`` for data ``x`` at per-example times ``t``: ``z_t = α_t x + σ_t ε``."""
  logsnr = family.logsnr_fn(t)
  eps = jax.random.normal(key, x.shape, x.dtype)
  return diffusion.diffuse(x, eps, logsnr), logsnr


TEACHER_WEIGHTINGS = ("snr_trunc", "snr_plus_one", "eps")


def teacher_objective(family, *, p_uncond: float, weighting: str = "snr_trunc"):
  """Classifier-free-guided teacher (v-prediction), ``t ~ U[0, 1]``, condition dropout.

  With probability ``p_uncond`` an example's condition is replaced by the null condition, so one
  network learns both ``x̂_c`` and ``x̂_u``. Loss per example (docs/design.md §1.6):

  * ``snr_trunc``: ``max(‖x̂ − x‖², ‖ε̂ − ε‖²)``, the x-space error weighted by
    ``max(exp(λ), 1)`` (the paper's teachers);
  * ``snr_plus_one``: ``‖v̂ − v‖²``, the x-space error weighted by ``1 + exp(λ)`` (Stable
    Diffusion 2's v-objective), an option of the ε→v fine-tuning link ``teacher_v``;
  * ``eps``: ``‖ε̂ − ε‖²``, the x-space error weighted by ``exp(λ)`` (Stable Diffusion's
    ε-objective), for a latent teacher trained here (``configs/emoji.py``).
  """
  if weighting not in TEACHER_WEIGHTINGS:
    raise ValueError(f"weighting={weighting!r} is not one of {list(TEACHER_WEIGHTINGS)}.")

  def objective(params, frozen, batch, key):
    del frozen
    x, cond = family.x_and_cond(batch)
    b = x.shape[0]
    k_t, k_eps, k_drop, k_dropout = jax.random.split(key, 4)
    t = jax.random.uniform(k_t, (b,))
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    logsnr = family.logsnr_fn(t)
    z = diffusion.diffuse(x, eps, logsnr)
    drop = jax.random.bernoulli(k_drop, p_uncond, (b,))
    cond = jax.tree.map(lambda c, n: jnp.where(diffusion.per_example(drop, c, "cond"), n, c),
                        cond, family.null_cond(cond))
    v = family.v_hat(family.teacher, params, z, t, cond, train=True,
                     rngs={"dropout": k_dropout})
    x_pred = diffusion.x_from_v(z, v, logsnr)
    weights = family.loss_weights(cond)
    if weighting == "snr_trunc":
      per_example = snr_trunc_loss(x, x_pred, eps, diffusion.eps_from_v(z, v, logsnr), weights)
    elif weighting == "eps":
      per_example = _per_example_mean(diffusion.eps_from_v(z, v, logsnr) - eps, weights)
    else:
      per_example = _per_example_mean(v - diffusion.v_from_x_eps(x, eps, logsnr), weights)
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "x_mse": jnp.mean(_per_example_mean(x_pred - x))}
  return objective


W_WEIGHTINGS = ("uniform", "inverse_square")


def w_loss_weight(w, kind: str):
  """Per-example loss weight by guidance weight: ``uniform`` (Eq. 3 as written: 1) or
  ``inverse_square``, ``1/(1+w)²``, which measures each error relative to the scale of the
  guided target ``x_c + w·(x_c − x_u)`` so that large w no longer dominates the loss."""
  if kind == "uniform":
    return jnp.ones_like(w)
  if kind == "inverse_square":
    return 1.0 / jnp.square(1.0 + w)
  raise ValueError(f"w_loss_weight={kind!r} is not one of {list(W_WEIGHTINGS)}.")


def stage_one_objective(family, *, w_min: float, w_max: float, dropout: float = 0.0,
                        w_weighting: str = "uniform", w_power: float = 1.0):
  """Stage one (paper §3.1, Eq. 3, Algorithm 1): learn the guided teacher with one network.

  Per example ``w ~ U[w_min, w_max]``, ``t ~ U[0, 1]``, ``z_t = α_t x + σ_t ε``; the target is
  the frozen teacher's ``(1+w)·x̂_c − w·x̂_u`` from one batched forward pass (conditional and
  null-label halves concatenated); the loss ``ω(λ_t)·‖x̂_η(z_t, w) − x̂^w_θ(z_t)‖²``.
  ``frozen`` is the teacher's parameters. ``w_weighting`` multiplies each example's loss by
  ``w_loss_weight(w, w_weighting)``; ``w_power`` shapes the draw of w (``guidance.sample_w``);
  ``dropout`` is the student's while it trains.
  """
  w_loss_weight(jnp.zeros(()), w_weighting)  # a bad name fails here, before tracing
  student = family.student_net(dropout)

  def objective(params, frozen, batch, key):
    x, cond = family.x_and_cond(batch)
    b = x.shape[0]
    k_t, k_eps, k_w, k_dropout = jax.random.split(key, 4)
    t = jax.random.uniform(k_t, (b,))
    w = guidance.sample_w(k_w, b, w_min, w_max, power=w_power)
    z, logsnr = _noisy_batch(family, x, k_eps, t)
    target = jax.lax.stop_gradient(
        denoiser.guided_x_prediction(family, frozen, z, t, cond, w))
    x_pred = denoiser.x_prediction(family, student, params, z, t, cond, w, train=True,
                                   rngs={"dropout": k_dropout})
    loss = jnp.mean(w_loss_weight(w, w_weighting)
                    * weighted_x_loss(x_pred, target, logsnr, family.loss_weights(cond)))
    return loss, {"x_mse": jnp.mean(_per_example_mean(x_pred - target))}
  return objective


def stage_two_target(teacher_denoise_fn, z_t, t, num_student_steps, *,
                     logsnr_fn=schedules.cosine_logsnr):
  """Target ``x̃`` of progressive distillation (Algorithm 2, as in PD; docs/design.md §1.9).

  The teacher takes two DDIM steps of ``1/(2N)`` each, ``t → t' = t − 0.5/N → t'' = t − 1/N``
  (``N = num_student_steps``); ``x̃`` is the x-prediction with which **one** DDIM step from ``t``
  lands on the teacher's ``z_t''``:

      x̃ = (z_t'' − (σ_t''/σ_t)·z_t) / (α_t'' − (σ_t''/σ_t)·α_t).

  Edge cases (times are clipped at 0): when ``t'' = 0`` the teacher's last step ends on the data
  and ``x̃ = x̂'``, its x-prediction at ``t'``; when ``t' = 0`` (a start time ``1/(2N)`` of the
  finer grid used for the stochastic sampler) ``x̃ = x̂``, the teacher's one step to 0.
  ``t`` has one value per example; ``num_student_steps`` may be a traced scalar. ``logsnr_fn``
  is the teacher's schedule (a latent teacher's ``DiscreteSchedule.logsnr``).
  """
  t = jnp.asarray(t, jnp.float32)
  n = jnp.asarray(num_student_steps, jnp.float32)
  t_mid = jnp.maximum(t - 0.5 / n, 0.0)
  t_end = jnp.maximum(t - 1.0 / n, 0.0)
  lam_t, lam_mid, lam_end = (logsnr_fn(u) for u in (t, t_mid, t_end))
  x_t = teacher_denoise_fn(z_t, t)
  z_mid = diffusion.ddim_step(z_t, x_t, lam_t, lam_mid)
  x_mid = teacher_denoise_fn(z_mid, t_mid)
  z_end = diffusion.ddim_step(z_mid, x_mid, lam_mid, lam_end)
  alpha_t, sigma_t = schedules.alpha_sigma(diffusion.per_example(lam_t, z_t, "t"))
  alpha_e, sigma_e = schedules.alpha_sigma(diffusion.per_example(lam_end, z_t, "t"))
  ratio = sigma_e / sigma_t
  x_two_steps = (z_end - ratio * z_t) / (alpha_e - ratio * alpha_t)
  at = lambda cond: diffusion.per_example(cond, z_t, "t")
  return jnp.where(at(t_mid <= 0.0), x_t, jnp.where(at(t_end <= 0.0), x_mid, x_two_steps))


def stage_two_times(key, batch_size: int, num_student_steps, *, for_stochastic: bool):
  """Start times of stage two: ``t = i/N``, ``i ~ U{1..N}`` (Algorithm 2).

  With ``for_stochastic`` the start times come from the teacher's finer grid ``t = i/(2N)``,
  ``i ~ U{1..2N}``, so the student also jumps ``1/N`` from every point of the ``1/(2N)`` grid:
  what the stochastic sampler (Eq. 4–7) with ``2N`` evaluations asks of it.
  """
  grid = jnp.asarray(num_student_steps, jnp.int32) * (2 if for_stochastic else 1)
  i = jax.random.randint(key, (batch_size,), 1, grid + 1)
  return i.astype(jnp.float32) / grid.astype(jnp.float32)


def stage_two_objective(family, *, w_min: float, w_max: float, for_stochastic: bool = False,
                        w_weighting: str = "uniform", w_power: float = 1.0,
                        dropout: float = 0.0):
  """Stage two (Algorithm 2): one student step does what two teacher steps do.

  The teacher is the previous student (same network, frozen parameters); ``w`` is shared by
  teacher and student. Loss ``ω(λ_t)·‖x̂_η(z_t, w) − x̃‖²`` with ``x̃ = stage_two_target``.
  ``frozen = {"params": teacher_params, "num_student_steps": N}``; ``w_weighting`` and
  ``w_power`` and ``dropout`` as in ``stage_one_objective``. The target's DDIM steps are on the
  family's schedule.
  """
  w_loss_weight(jnp.zeros(()), w_weighting)
  student = family.student_net(dropout)

  def objective(params, frozen, batch, key):
    x, cond = family.x_and_cond(batch)
    b = x.shape[0]
    n = frozen["num_student_steps"]
    k_t, k_eps, k_w, k_dropout = jax.random.split(key, 4)
    t = stage_two_times(k_t, b, n, for_stochastic=for_stochastic)
    w = guidance.sample_w(k_w, b, w_min, w_max, power=w_power)
    z, logsnr = _noisy_batch(family, x, k_eps, t)
    teacher_fn = denoiser.denoise_fn(family, frozen["params"], cond, w)
    target = jax.lax.stop_gradient(stage_two_target(teacher_fn, z, t, n,
                                                    logsnr_fn=family.logsnr_fn))
    x_pred = denoiser.x_prediction(family, student, params, z, t, cond, w, train=True,
                                   rngs={"dropout": k_dropout})
    loss = jnp.mean(w_loss_weight(w, w_weighting)
                    * weighted_x_loss(x_pred, target, logsnr, family.loss_weights(cond)))
    return loss, {"x_mse": jnp.mean(_per_example_mean(x_pred - target))}
  return objective


def weighted_v_loss(v_pred, v_target, logsnr, weights=None):
  """Per-example ``max(α², σ²)·‖v̂ − ṽ‖²``: ``weighted_x_loss`` of the x-predictions both make at
  the same ``z`` (``x̂ − x̃ = −σ(v̂ − ṽ)`` and ``max(exp(λ), 1)·σ² = max(α², σ²)``), computed
  without forming ``x``, whose difference vanishes with ``σ`` at ``t = 0``."""
  alpha, sigma = schedules.alpha_sigma(jnp.asarray(logsnr, jnp.float32))
  return (jnp.maximum(jnp.square(alpha), jnp.square(sigma))
          * _per_example_mean(v_pred - v_target, weights))


def encoder_target(teacher_v_fn, z_s, s, num_student_steps, *,
                   logsnr_fn=schedules.cosine_logsnr):
  """Target ``ṽ`` of the distilled encoder (paper §4.3; docs/design.md §1.15): stage two's
  target read upwards.

  The teacher takes two DDIM encoding steps of ``1/(2N)`` each, ``s → s' = s + 0.5/N →
  e = s + 1/N`` (``diffusion.ddim_encode_step``; ``N = num_student_steps``). ``ṽ`` is the
  v-prediction with which **one** encoding step from ``s`` lands on the teacher's ``z_e``. One
  step gives ``z_e = (α_e/α_s) z_s + (σ_e − α_e σ_s/α_s) ε̂``, so

      ε̃ = (α_s z_e − α_e z_s) / (α_s σ_e − α_e σ_s),    ṽ = (ε̃ − σ_s z_s) / α_s.

  Neither divides by ``σ_s``, which vanishes at ``s = 0``; ``α_s > 0`` for every start time
  ``s ≤ 1 − 1/N`` of the grid. This is ``stage_two_target``'s identity with the start and end
  times exchanged, solved for ``ε̂`` instead of ``x̂``. ``s`` has one value per example;
  ``num_student_steps`` may be a traced scalar.
  """
  s = jnp.asarray(s, jnp.float32)
  n = jnp.asarray(num_student_steps, jnp.float32)
  s_mid = jnp.minimum(s + 0.5 / n, 1.0)
  s_end = jnp.minimum(s + 1.0 / n, 1.0)
  lam_s, lam_mid, lam_end = (logsnr_fn(u) for u in (s, s_mid, s_end))
  z_mid = diffusion.ddim_encode_step(z_s, teacher_v_fn(z_s, s), lam_s, lam_mid)
  z_end = diffusion.ddim_encode_step(z_mid, teacher_v_fn(z_mid, s_mid), lam_mid, lam_end)
  alpha_s, sigma_s = schedules.alpha_sigma(diffusion.per_example(lam_s, z_s, "s"))
  alpha_e, sigma_e = schedules.alpha_sigma(diffusion.per_example(lam_end, z_s, "s"))
  eps = (alpha_s * z_end - alpha_e * z_s) / (alpha_s * sigma_e - alpha_e * sigma_s)
  return (eps - sigma_s * z_s) / alpha_s


def encoder_times(key, batch_size: int, num_student_steps):
  """Start times of an encoder step: ``s = i/N``, ``i ~ U{0..N−1}`` (the data is ``i = 0``)."""
  n = jnp.asarray(num_student_steps, jnp.int32)
  i = jax.random.randint(key, (batch_size,), 0, n)
  return i.astype(jnp.float32) / n.astype(jnp.float32)


def encoder_objective(family, *, w_min: float, w_max: float, w_weighting: str = "uniform",
                      w_power: float = 1.0, dropout: float = 0.0):
  """The distilled encoder (paper §4.3): one student encoding step does two teacher steps.

  Progressive as stage two: the first teacher is the stage-one student, each later one the
  previous encoder; the student starts as its teacher. Loss ``weighted_v_loss(v̂_η(z_s, w), ṽ)``
  with ``ṽ = encoder_target`` and ``z_s = α_s x + σ_s ε`` (at ``s = 0`` the data itself, up to
  ``σ(0)``). ``frozen`` as in stage two; ``w``, ``w_weighting``, ``w_power`` and ``dropout`` as
  in ``stage_one_objective``.
  """
  w_loss_weight(jnp.zeros(()), w_weighting)
  student = family.student_net(dropout)

  def objective(params, frozen, batch, key):
    x, cond = family.x_and_cond(batch)
    n = frozen["num_student_steps"]
    k_s, k_eps, k_w, k_dropout = jax.random.split(key, 4)
    s = encoder_times(k_s, x.shape[0], n)
    w = guidance.sample_w(k_w, x.shape[0], w_min, w_max, power=w_power)
    z, logsnr = _noisy_batch(family, x, k_eps, s)
    teacher_fn = denoiser.v_fn(family, frozen["params"], cond, w)
    target = jax.lax.stop_gradient(encoder_target(teacher_fn, z, s, n,
                                                  logsnr_fn=family.logsnr_fn))
    v_pred = denoiser.v_prediction(family, student, params, z, s, cond, w, train=True,
                                   rngs={"dropout": k_dropout})
    loss = jnp.mean(w_loss_weight(w, w_weighting)
                    * weighted_v_loss(v_pred, target, logsnr, family.loss_weights(cond)))
    return loss, {"v_mse": jnp.mean(_per_example_mean(v_pred - target))}
  return objective
