"""Discrete-time latent teachers as ``denoise_fn(z, t) -> x̂``, and the ε→v fine-tuning objective.

SD and LDM teachers predict ε (SD 2 "v" models predict v) at a discrete timestep. Wrapped here
with a ``DiscreteSchedule`` they become the same kind of ``denoise_fn(z, t)`` our samplers
(``distill.diffusion``) and objectives (``distill.losses``) take, with ``logsnr_fn =
schedule.logsnr``. Parameterisations (docs/design.md §1.2): ``z = α x + σ ε``, ``v = α ε − σ x``, so
``x̂ = (z − σ ε̂)/α = α z − σ v̂``.

Paper §4.2 fine-tunes the public ε-prediction teachers into v-prediction teachers before
distilling: ``v_finetune_objective`` is that stage's objective for the shared training loop.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from distill import diffusion, losses
from distill.latent import schedule as schedule_lib

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# Native output(z, fractional timesteps [B]) -> prediction of the kind ``prediction_type``.
NetFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_prediction_type(prediction_type: str) -> str:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of "
                     f"{PREDICTION_TYPES} (diffusers' scheduler_config.json names).")
  return prediction_type


def x_from_prediction(z, prediction, logsnr, prediction_type: str):
  """``x̂`` from an ε-, v- or x-prediction at log-SNR ``λ`` (scalar or per example)."""
  check_prediction_type(prediction_type)
  prediction = prediction.astype(z.dtype)
  if prediction_type == "epsilon":
    return diffusion.x_from_eps(z, prediction, logsnr)
  if prediction_type == "v_prediction":
    return diffusion.x_from_v(z, prediction, logsnr)
  return prediction


def teacher_denoise_fn(net_fn: NetFn, schedule: schedule_lib.DiscreteSchedule, *,
                       prediction_type: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """``denoise_fn(z, t)`` for a discrete-time network ``net_fn(z, timesteps)``.

  ``t`` is our continuous time (scalar or ``[B]``); the network is fed ``schedule.timestep(t)``
  and its output is turned into ``x̂`` at ``λ = schedule.logsnr(t)``.
  """
  check_prediction_type(prediction_type)

  def fn(z, t):
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (z.shape[0],))
    out = net_fn(z, schedule.timestep(t))
    return x_from_prediction(z, out, schedule.logsnr(t), prediction_type)
  return fn


V_WEIGHTINGS = ("snr_plus_one", "snr_trunc")


def v_finetune_objective(net_fn: Callable, schedule: schedule_lib.DiscreteSchedule, *,
                         weighting: str = "snr_plus_one"):
  """Objective fine-tuning an ε-prediction teacher into a v-prediction one (paper §4.2).

  ``net_fn(params, z, timesteps, batch) -> v̂`` is the network being fine-tuned (initialised
  from the ε teacher); ``batch["latents"]`` holds the (scaled) latents ``x``, and whatever else
  the network is conditioned on stays in ``batch`` for ``net_fn``. Per example,
  ``t ~ U[0, 1]``, ``ε ~ N(0, I)``, ``z = α x + σ ε``, target ``v = α ε − σ x``; the loss is

  * ``snr_plus_one``: ``‖v̂ − v‖²``, i.e. x-space error weighted by ``1 + exp(λ)`` (SD 2's
    v-objective);
  * ``snr_trunc``: x-space error weighted by ``max(exp(λ), 1)`` (our teacher's weighting).

  An objective for ``distill.train.train``: ``(params, frozen, batch, key) -> (loss, metrics)``.
  """
  if weighting not in V_WEIGHTINGS:
    raise ValueError(f"weighting {weighting!r} is not supported; use one of {V_WEIGHTINGS}.")

  def objective(params, frozen, batch, key):
    del frozen
    x = batch["latents"]
    b = x.shape[0]
    k_t, k_eps = jax.random.split(key)
    t = jax.random.uniform(k_t, (b,))
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    logsnr = schedule.logsnr(t)
    z = diffusion.diffuse(x, eps, logsnr)
    v = diffusion.v_from_x_eps(x, eps, logsnr)
    v_pred = net_fn(params, z, schedule.timestep(t), batch).astype(x.dtype)
    axes = tuple(range(1, x.ndim))
    v_mse = jnp.mean(jnp.square(v_pred - v), axis=axes)
    if weighting == "snr_plus_one":
      per_example = v_mse
    else:
      # x̂ − x = −σ (v̂ − v), so ‖x̂ − x‖² = σ² ‖v̂ − v‖².
      sigma2 = jax.nn.sigmoid(-logsnr)
      per_example = losses.snr_trunc_weight(logsnr) * sigma2 * v_mse
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "v_mse": jnp.mean(v_mse)}
  return objective
