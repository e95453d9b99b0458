"""Training objectives: weighting, the teacher's loss (and, later, stage one and stage two).

An *objective* is a pure function ``(params, frozen, batch, key) -> (loss, metrics)``; it is the
only thing a stage gives the shared training loop (``distill/train.py``). ``frozen`` holds the
parameters of a frozen teacher, or ``None``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill import diffusion, schedules


def _per_example_mean(x):
  return jnp.mean(jnp.square(x), axis=tuple(range(1, x.ndim)))


def snr_trunc_loss(x, x_pred, eps, eps_pred):
  """Per-example ``max(‖x̂ − x‖², ‖ε̂ − ε‖²)`` (pixel means).

  This is the x-space error weighted by ``ω(λ) = max(exp(λ), 1)`` ("SNR-truncated", DESIGN.md
  §1), since ``‖ε̂ − ε‖² = exp(λ) ‖x̂ − x‖²`` for predictions tied by ``z``.
  """
  return jnp.maximum(_per_example_mean(x_pred - x), _per_example_mean(eps_pred - eps))


def teacher_objective(model, *, p_uncond: float):
  """Classifier-free-guided teacher (v-prediction), ``t ~ U[0, 1]``, label dropout.

  With probability ``p_uncond`` an example's label is replaced by the null label, so one network
  learns both ``x̂_c`` and ``x̂_u``. Loss: SNR-truncated weighting.
  """
  def objective(params, frozen, batch, key):
    del frozen
    x, labels = batch["image"], batch["label"]
    b = x.shape[0]
    k_t, k_eps, k_drop, k_dropout = jax.random.split(key, 4)
    t = jax.random.uniform(k_t, (b,))
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    logsnr = schedules.cosine_logsnr(t)
    z = diffusion.diffuse(x, eps, logsnr)
    drop = jax.random.bernoulli(k_drop, p_uncond, (b,))
    labels = jnp.where(drop, model.null_label, labels)
    v = model.apply({"params": params}, z, logsnr, labels, train=True,
                    rngs={"dropout": k_dropout})
    x_pred = diffusion.x_from_v(z, v, logsnr)
    eps_pred = diffusion.eps_from_v(z, v, logsnr)
    loss = jnp.mean(snr_trunc_loss(x, x_pred, eps, eps_pred))
    return loss, {"loss": loss, "x_mse": jnp.mean(_per_example_mean(x_pred - x))}
  return objective
