"""Log-SNR noise schedules in continuous time ``t in [0, 1]`` (data at 0, noise at 1).

docs/design.md §1.1: the cosine log-SNR schedule of progressive distillation,

    b = arctan(exp(-λ_max/2)),  a = arctan(exp(-λ_min/2)) - b,  λ(t) = -2 log tan(a t + b),

and the variance-preserving pair ``α² = sigmoid(λ)``, ``σ² = sigmoid(-λ)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0


def cosine_logsnr(t, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX):
  """Cosine schedule: λ(0) = ``logsnr_max``, λ(1) = ``logsnr_min``, strictly decreasing."""
  if not logsnr_min < logsnr_max:
    raise ValueError(
        f"logsnr_min ({logsnr_min}) must be smaller than logsnr_max ({logsnr_max})")
  t = jnp.asarray(t, dtype=jnp.float32)
  # Constants in float64 on the host. Near t = 1 the angle a·t + b approaches π/2, where float32
  # loses the small gap; there we use tan(θ) = 1/tan(π/2 − θ), with the gap
  # π/2 − (a·t + b) = arctan(exp(λ_min/2)) + a·(1 − t) computed without cancellation.
  b = math.atan(math.exp(-0.5 * logsnr_max))
  c = math.atan(math.exp(0.5 * logsnr_min))
  a = 0.5 * math.pi - c - b
  near_data = -2.0 * jnp.log(jnp.tan(a * t + b))
  near_noise = 2.0 * jnp.log(jnp.tan(a * (1.0 - t) + c))
  return jnp.where(a * t + b < 0.25 * math.pi, near_data, near_noise)


def alpha_sigma(logsnr):
  """Returns ``(α, σ)`` with ``α² = sigmoid(λ)`` and ``σ² = sigmoid(-λ)``, so ``α² + σ² = 1``."""
  logsnr = jnp.asarray(logsnr, dtype=jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def logsnr_to_time_input(logsnr):
  """Maps λ in (-inf, inf) to (0, 1) monotonically: ``arctan(exp(-λ/2)) / (π/2)``.

  For the cosine schedule with untruncated range this is exactly ``t``; the network sees this
  bounded value rather than λ itself.
  """
  logsnr = jnp.asarray(logsnr, dtype=jnp.float32)
  return jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * jnp.pi)
