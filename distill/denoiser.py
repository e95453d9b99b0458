"""x-prediction denoisers ``denoise_fn(z, t) -> x̂`` built from a v-prediction network.

The samplers and losses take any ``denoise_fn(z, t)``; these helpers close a model, its
parameters, the labels and ``w`` over. ``guided_denoise_fn`` evaluates the conditional and the
null-label branch in **one** batched forward pass (docs/design.md §1.5).
"""

from __future__ import annotations

import jax.numpy as jnp

from distill import diffusion, guidance, schedules


def x_prediction(model, params, z, t, labels, w=None, *, logsnr_fn=schedules.cosine_logsnr,
                 train: bool = False, rngs=None):
  """``x̂ = α z − σ v̂`` with ``v̂ = model(z, λ(t), labels[, w])``."""
  logsnr = logsnr_fn(t)
  v = model.apply({"params": params}, z, logsnr, labels, w, train=train, rngs=rngs)
  return diffusion.x_from_v(z, v, logsnr)


def denoise_fn(model, params, labels, w=None, *, logsnr_fn=schedules.cosine_logsnr):
  """A sampler-ready ``denoise_fn(z, t)`` for a (student or unguided) model."""
  def fn(z, t):
    return x_prediction(model, params, z, t, labels, w, logsnr_fn=logsnr_fn)
  return fn


def guided_x_prediction(model, params, z, t, labels, w, *, logsnr_fn=schedules.cosine_logsnr):
  """Classifier-free guided ``(1+w) x̂_c − w x̂_u`` from one forward pass of batch ``2B``."""
  b = z.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
  labels = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (b,))
  null = jnp.full((b,), model.null_label, jnp.int32)
  x_both = x_prediction(model, params, jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                        jnp.concatenate([labels, null]), logsnr_fn=logsnr_fn)
  return guidance.guided_x(x_both[:b], x_both[b:], w)


def guided_denoise_fn(model, params, labels, w, *, logsnr_fn=schedules.cosine_logsnr):
  """A sampler-ready guided teacher: two network evaluations per step, batched."""
  def fn(z, t):
    return guided_x_prediction(model, params, z, t, labels, w, logsnr_fn=logsnr_fn)
  return fn
