"""Forward process, parameterisation conversions, DDIM steps and the N-step samplers.

Samplers: DDIM (Eq. 2), the stochastic sampler (Eq. 4–7) and, as the baseline for the teacher,
DPM-Solver++ (2M) (docs/design.md §1.13); the DDIM encoder (Eq. 2 read from the data up to the
noise, paper §4.3). Each sampler starts at ``t_start`` (1 for generation; an intermediate time for
image-to-image editing, SDEdit) and takes a ``known_fn`` that puts a known region back after
every step (inpainting by replacement; ``distill/editing.py``).

Notation as in docs/design.md §1 and the paper: ``z_t = α_t x + σ_t ε``; the network predicts
``v = α ε − σ x``; ``λ`` is the log-SNR. Every function is pure and jit-able. ``logsnr``
arguments are a scalar or one value per example (shape ``[B]``); they are broadcast against the
trailing image axes here, so callers never reshape them.
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp

from distill import schedules

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def per_example(value, like, name: str):
  """Reshapes a scalar or ``[B]`` array so it broadcasts against ``like`` (``[B, ...]``)."""
  value = jnp.asarray(value)
  like_shape = jnp.shape(like)
  if value.ndim == 0:
    return value
  if value.ndim == 1 and len(like_shape) >= 1 and value.shape[0] == like_shape[0]:
    return value.reshape(value.shape + (1,) * (len(like_shape) - 1))
  if value.ndim == len(like_shape) and all(
      v in (1, l) for v, l in zip(value.shape, like_shape)) and value.shape[0] == like_shape[0]:
    return value
  raise ValueError(
      f"{name} has shape {value.shape}, which does not broadcast against the batch of shape "
      f"{tuple(like_shape)}: pass a scalar or one value per example (shape "
      f"[{like_shape[0] if like_shape else '?'}]).")


def _alpha_sigma(logsnr, like, name: str = "logsnr"):
  return schedules.alpha_sigma(per_example(logsnr, like, name))


def check_num_steps(num_steps, name: str = "num_steps") -> int:
  """Validates a step count: a Python/NumPy integer >= 1 (bools and floats are refused)."""
  if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
    raise ValueError(f"{name} must be an integer >= 1, got {num_steps!r} "
                     f"({type(num_steps).__name__}); pass e.g. {name}=4.")
  if num_steps < 1:
    raise ValueError(f"{name} must be >= 1, got {num_steps}.")
  return int(num_steps)


def _num_steps(num_steps):
  """A sampler's step count: a checked Python integer, or an int32 array as given (traced: one
  compiled sampler for every step count; its caller checks the value)."""
  return num_steps if isinstance(num_steps, jax.Array) else check_num_steps(num_steps)


def diffuse(x, eps, logsnr):
  """Forward process ``z = α x + σ ε``."""
  alpha, sigma = _alpha_sigma(logsnr, x)
  return alpha * x + sigma * eps


def x_from_v(z, v, logsnr):
  """``x = α z − σ v``."""
  alpha, sigma = _alpha_sigma(logsnr, z)
  return alpha * z - sigma * v


def eps_from_v(z, v, logsnr):
  """``ε = σ z + α v``."""
  alpha, sigma = _alpha_sigma(logsnr, z)
  return sigma * z + alpha * v


def v_from_x_eps(x, eps, logsnr):
  """``v = α ε − σ x``."""
  alpha, sigma = _alpha_sigma(logsnr, x)
  return alpha * eps - sigma * x


def x_from_eps(z, eps, logsnr):
  """``x = (z − σ ε) / α``."""
  alpha, sigma = _alpha_sigma(logsnr, z)
  return (z - sigma * eps) / alpha


def eps_from_x(z, x, logsnr):
  """``ε = (z − α x) / σ``."""
  alpha, sigma = _alpha_sigma(logsnr, z)
  return (z - alpha * x) / sigma


def ddim_step(z_t, x_pred, logsnr_t, logsnr_s):
  """Deterministic DDIM update from ``t`` to ``s < t`` (paper Eq. 2).

  ``z_s = α_s x̂ + σ_s (z_t − α_t x̂) / σ_t``.
  """
  alpha_t, sigma_t = _alpha_sigma(logsnr_t, z_t, "logsnr_t")
  alpha_s, sigma_s = _alpha_sigma(logsnr_s, z_t, "logsnr_s")
  return alpha_s * x_pred + sigma_s * (z_t - alpha_t * x_pred) / sigma_t


def ddim_encode_step(z_s, v_pred, logsnr_s, logsnr_t):
  """DDIM encoding, Eq. 2 read upwards from ``s`` to a noisier ``t > s`` (paper §4.3).

  ``z_t = α_t x̂ + σ_t ε̂`` with the predictions at ``(z_s, s)`` formed from the network's ``v̂``:
  ``x̂ = α_s z_s − σ_s v̂`` and ``ε̂ = σ_s z_s + α_s v̂``. Algebraically this is
  ``ddim_step(z_s, x̂, λ_s, λ_t)``; written with ``v̂`` it never divides by ``σ_s``, which
  vanishes at the data (``s = 0``), where encoding starts.
  """
  alpha_s, sigma_s = _alpha_sigma(logsnr_s, z_s, "logsnr_s")
  alpha_t, sigma_t = _alpha_sigma(logsnr_t, z_s, "logsnr_t")
  x_pred = alpha_s * z_s - sigma_s * v_pred
  eps_pred = sigma_s * z_s + alpha_s * v_pred
  return alpha_t * x_pred + sigma_t * eps_pred


def renoise(z_k, logsnr_k, logsnr_s, eps):
  """Forward transition from ``k`` back up to the noisier ``s`` (paper Eq. 5 and 7).

  ``z_s = (α_s/α_k) z_k + σ_{s|k} ε`` with ``σ²_{s|k} = (1 − exp(λ_s − λ_k)) σ_s²``.
  """
  alpha_k, _ = _alpha_sigma(logsnr_k, z_k, "logsnr_k")
  logsnr_s_b = per_example(logsnr_s, z_k, "logsnr_s")
  alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s_b)
  logsnr_k_b = per_example(logsnr_k, z_k, "logsnr_k")
  var = -jnp.expm1(logsnr_s_b - logsnr_k_b) * jnp.square(sigma_s)
  return (alpha_s / alpha_k) * z_k + jnp.sqrt(jnp.maximum(var, 0.0)) * eps


def _batch_time(t, z):
  return jnp.full((z.shape[0],), t, dtype=jnp.float32)


KnownFn = Callable[[jax.Array, "jax.Array | None"], jax.Array]


def _start(t_start, known_fn):
  t_start = jnp.asarray(t_start, jnp.float32)
  if known_fn is None:
    known_fn = lambda z, logsnr=None: z
  return t_start, known_fn


def sample_deterministic(denoise_fn: DenoiseFn, z1, num_steps: int, *,
                         logsnr_fn=schedules.cosine_logsnr, t_start=1.0,
                         known_fn: KnownFn | None = None):
  """Deterministic N-step DDIM sampler (Eq. 2 applied at ``t = t_start·i/N``, ``i = N … 1``).

  ``denoise_fn(z, t) -> x̂`` takes a batch-shaped ``t``. ``z1`` is the state at ``t_start``
  (default 1: pure noise; image-to-image editing starts lower, see ``distill/editing.py``).
  ``known_fn(z, λ)``, if given, is applied to every step's result at its log-SNR ``λ``, and
  ``known_fn(x, None)`` to the returned sample (inpainting by replacement). Returns the
  x-prediction of the last step (the step to ``t = 0``). The loop is a ``lax.fori_loop``: the
  denoiser is traced once and the whole sampler is one XLA program when jitted; ``t_start`` may
  be a traced scalar, and so may ``num_steps`` (an int32 scalar, ≥ 1: one compiled sampler for
  every step count; the caller checks it).
  """
  n = _num_steps(num_steps)
  z1 = jnp.asarray(z1)
  t_start, known_fn = _start(t_start, known_fn)

  def body(j, carry):
    z, _ = carry
    i = n - j
    t = t_start * i / n
    s = t_start * (i - 1) / n
    x_pred = denoise_fn(z, _batch_time(t, z))
    z_s = ddim_step(z, x_pred, logsnr_fn(t), logsnr_fn(s))
    return known_fn(z_s, logsnr_fn(s)).astype(z.dtype), x_pred.astype(z.dtype)

  _, x = jax.lax.fori_loop(0, n, body, (z1, jnp.zeros_like(z1)))
  return known_fn(x, None)


def encode_deterministic(v_fn, x, num_steps: int, *, logsnr_fn=schedules.cosine_logsnr,
                         t_end=1.0):
  """N-step DDIM encoder (paper §4.3): ``ddim_encode_step`` at ``t = t_end·i/N``, ``i = 0 … N−1``.

  ``v_fn(z, t) -> v̂`` takes a batch-shaped ``t`` (``distill/denoiser.py``: ``v_fn``,
  ``guided_v_fn``). ``x`` is the data (``z_0``); returns ``z_{t_end}``, which
  ``sample_deterministic`` with the same model and ``t_start = t_end`` decodes back to ``x`` as
  the steps become fine (the probability-flow ODE run both ways). One ``lax.fori_loop``.
  """
  n = check_num_steps(num_steps)
  x = jnp.asarray(x)
  t_end = jnp.asarray(t_end, jnp.float32)

  def body(i, z):
    s, t = t_end * i / n, t_end * (i + 1) / n
    v_pred = v_fn(z, _batch_time(s, z))
    return ddim_encode_step(z, v_pred, logsnr_fn(s), logsnr_fn(t)).astype(z.dtype)

  return jax.lax.fori_loop(0, n, body, x)


def sample_stochastic(denoise_fn: DenoiseFn, z1, num_steps: int, rng, *,
                      logsnr_fn=schedules.cosine_logsnr, t_start=1.0,
                      known_fn: KnownFn | None = None):
  """N-step stochastic sampler (paper §3.3, Eq. 4–7).

  With ``Δ = t_start/N``: from the current time ``c`` (starting at ``t_start``, default 1) take
  one deterministic DDIM step of length ``2Δ`` to ``k = c − 2Δ`` (Eq. 4/6), then re-noise
  forward to ``s = c − Δ`` (Eq. 5/7); repeat from ``s``. At ``c = Δ`` one deterministic step to
  0 (Eq. 2), whose x-prediction is returned. N network evaluations in all; ``num_steps = 1`` is
  the deterministic 1-step sampler. The model is evaluated on the grid ``i/N`` (for
  ``t_start = 1``) and must jump ``2/N`` from each point of it (see ``stage_two``
  ``train_for_stochastic``). ``known_fn`` as in ``sample_deterministic``, applied after each
  re-noising; ``num_steps`` may be traced, as there.
  """
  n = _num_steps(num_steps)
  z1 = jnp.asarray(z1)
  t_start, known_fn = _start(t_start, known_fn)
  delta = t_start / n

  def body(j, carry):
    z, _ = carry
    c = t_start * (n - j) / n
    # On the last iteration (c = Δ) only the x-prediction is used: Eq. 2 to t = 0. The
    # clipped times keep the unused update finite.
    k = jnp.maximum(c - 2.0 * delta, 0.0)
    s = jnp.maximum(c - delta, 0.0)
    x_pred = denoise_fn(z, _batch_time(c, z)).astype(z.dtype)
    lam_k, lam_s = logsnr_fn(k), logsnr_fn(s)
    z_k = ddim_step(z, x_pred, logsnr_fn(c), lam_k)
    eps = jax.random.normal(jax.random.fold_in(rng, j), z.shape, z.dtype)
    z_s = known_fn(renoise(z_k, lam_k, lam_s, eps), lam_s)
    return z_s.astype(z.dtype), x_pred

  _, x = jax.lax.fori_loop(0, n, body, (z1, jnp.zeros_like(z1)))
  return known_fn(x, None)


def dpm_solver_step(z_t, x_pred, logsnr_t, logsnr_s, *, x_prev=None, logsnr_prev=None):
  """One DPM-Solver++ step from ``t`` to ``s < t`` in data prediction (docs/design.md §1.13).

  With ``h = (λ_s − λ_t)/2`` (half-log-SNR), ``z_s = (σ_s/σ_t) z_t − α_s·expm1(−h)·D``. First
  order (``x_prev`` None): ``D = x̂_t``, which is exactly the DDIM step (Eq. 2). Second order
  (2M): ``D = (1 + 1/(2r)) x̂_t − x̂_prev/(2r)`` with ``r = h_prev/h``, where ``x̂_prev`` is the
  prediction at the previous time, ``logsnr_prev``, and ``h_prev = (λ_t − λ_prev)/2``.
  """
  _, sigma_t = _alpha_sigma(logsnr_t, z_t, "logsnr_t")
  alpha_s, sigma_s = _alpha_sigma(logsnr_s, z_t, "logsnr_s")
  lam_t = per_example(logsnr_t, z_t, "logsnr_t")
  h = 0.5 * (per_example(logsnr_s, z_t, "logsnr_s") - lam_t)
  d = x_pred
  if x_prev is not None:
    r = 0.5 * (lam_t - per_example(logsnr_prev, z_t, "logsnr_prev")) / h
    d = x_pred + (x_pred - x_prev) / (2.0 * r)
  return (sigma_s / sigma_t) * z_t - alpha_s * jnp.expm1(-h) * d


def sample_dpm_solver(denoise_fn: DenoiseFn, z1, num_steps: int, *,
                      logsnr_fn=schedules.cosine_logsnr, t_start=1.0,
                      known_fn: KnownFn | None = None):
  """N-step DPM-Solver++ (2M), the multistep second-order solver of the probability-flow ODE in
  data prediction (docs/design.md §1.13), on the grid ``t = t_start·i/N``, ``i = N … 0``
  (``t_start`` and ``known_fn`` as in ``sample_deterministic``).

  The first step is first order (no previous prediction yet), and so is the last, to ``t = 0``,
  where ``σ`` is (nearly) zero and ``h`` jumps: the second-order extrapolation there multiplies
  the difference of the last two predictions by ``1/(2r)``, ``r = h_prev/h → 0``. Diffusers' solver
  does the same (``lower_order_final``; always for a final σ of zero). With 1 or 2 steps this is
  DDIM. Returns the last step's ``D`` (the sample at ``t = 0``), the DDIM sampler's convention.
  ``denoise_fn(z, t) -> x̂`` takes a batch-shaped ``t``; one ``lax.fori_loop``.
  """
  n = check_num_steps(num_steps)
  z1 = jnp.asarray(z1)
  t_start, known_fn = _start(t_start, known_fn)

  def body(j, carry):
    z, x_prev, _ = carry
    i = n - j
    t, s = t_start * i / n, t_start * (i - 1) / n
    p = jnp.minimum(t_start * (i + 1) / n, 1.0)
    x_pred = denoise_fn(z, _batch_time(t, z)).astype(z.dtype)
    lam_t, lam_s = logsnr_fn(t), logsnr_fn(s)
    first = dpm_solver_step(z, x_pred, lam_t, lam_s)
    second = dpm_solver_step(z, x_pred, lam_t, lam_s, x_prev=x_prev, logsnr_prev=logsnr_fn(p))
    multistep = jnp.logical_and(j > 0, i > 1)
    z_s = known_fn(jnp.where(multistep, second, first), lam_s).astype(z.dtype)
    return z_s, x_pred, x_pred

  _, _, x = jax.lax.fori_loop(0, n, body, (z1, jnp.zeros_like(z1), jnp.zeros_like(z1)))
  return known_fn(x, None)
