"""Discrete-time latent teachers as ``denoise_fn(z, t) -> x̂``.

SD and LDM teachers predict ε (SD 2 "v" models predict v) at a discrete timestep. Wrapped here
with a ``DiscreteSchedule`` they become the same kind of ``denoise_fn(z, t)`` our samplers
(``distill.diffusion``) and objectives (``distill.losses``) take, with ``logsnr_fn =
schedule.logsnr``. Parameterisations (docs/design.md §1.2): ``z = α x + σ ε``, ``v = α ε − σ x``, so
``x̂ = (z − σ ε̂)/α = α z − σ v̂``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from distill import diffusion
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
