"""Classifier-free guidance (paper §2) and the guidance-weight distribution of stage one."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill.diffusion import per_example


def guided_x(x_cond, x_uncond, w):
  """Guided prediction ``x̂^w = (1 + w) x̂_c − w x̂_u``; ``w`` is a scalar or one value per example."""
  w = per_example(w, x_cond, "w")
  return (1.0 + w) * x_cond - w * x_uncond


def sample_w(rng, batch_size: int, w_min: float, w_max: float, *, power: float = 1.0):
  """Guidance weights of stage one and two, one per example.

  ``power = 1``: ``w ~ U[w_min, w_max]`` (Eq. 3, Algorithm 1). Otherwise
  ``w = w_min + (w_max − w_min)·u^power`` with ``u ~ U[0, 1]``: ``power > 1`` draws small w more
  often (``P(w − w_min < f·(w_max − w_min)) = f^(1/power)``).
  """
  if not w_min <= w_max:
    raise ValueError(f"w_min ({w_min}) must be <= w_max ({w_max}).")
  if not power > 0:
    raise ValueError(f"w_sample_power ({power}) must be > 0 (1 = uniform, Eq. 3).")
  if power == 1.0:  # exactly the draws of runs made before the power existed
    return jax.random.uniform(rng, (batch_size,), jnp.float32, minval=w_min, maxval=w_max)
  u = jax.random.uniform(rng, (batch_size,), jnp.float32)
  return w_min + (w_max - w_min) * u ** power
