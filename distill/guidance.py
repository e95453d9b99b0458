"""Classifier-free guidance (paper §2) and the guidance-weight distribution of stage one."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill.diffusion import per_example


def guided_x(x_cond, x_uncond, w):
  """Guided prediction ``x̂^w = (1 + w) x̂_c − w x̂_u``; ``w`` is a scalar or one value per example."""
  w = per_example(w, x_cond, "w")
  return (1.0 + w) * x_cond - w * x_uncond


def sample_w(rng, batch_size: int, w_min: float, w_max: float):
  """``w ~ U[w_min, w_max]`` per example (Eq. 3, Algorithm 1)."""
  if not w_min <= w_max:
    raise ValueError(f"w_min ({w_min}) must be <= w_max ({w_max}).")
  return jax.random.uniform(rng, (batch_size,), jnp.float32, minval=w_min, maxval=w_max)
