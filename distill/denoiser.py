"""x-prediction denoisers ``denoise_fn(z, t) -> x̂`` of a family's networks, and the
v-predictions ``v_fn(z, t) -> v̂`` the DDIM encoder takes.

The samplers and losses take any ``denoise_fn(z, t)``; these helpers close a family
(``distill/family.py``), a network, its parameters, the condition and ``w`` over.
``guided_denoise_fn`` evaluates the conditional and the null-condition branch of the teacher in
**one** batched forward pass (docs/design.md §1.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill import diffusion, guidance


def x_prediction(family, net, params, z, t, cond, w=None, *, train: bool = False, rngs=None):
  """``x̂ = α z − σ v̂`` with ``v̂ = family.v_hat(net, params, z, t, cond[, w])``."""
  logsnr = family.logsnr_fn(t)
  v = family.v_hat(net, params, z, t, cond, w, train=train, rngs=rngs)
  return diffusion.x_from_v(z, v, logsnr)


def denoise_fn(family, params, cond, w=None, *, net=None):
  """A sampler-ready ``denoise_fn(z, t)`` for a w-conditioned student (``net`` defaults to
  ``family.student``; pass ``family.teacher`` for the teacher's conditional model)."""
  net = family.student if net is None else net

  def fn(z, t):
    return x_prediction(family, net, params, z, t, cond, w)
  return fn


def _interleave(a, b):
  """``[a_0, b_0, a_1, b_1, …]`` along the batch: each example's two rows stay side by side, so
  a batch sharded over devices is interleaved without moving data between them."""
  return jax.tree.map(lambda u, v: jnp.stack([u, v], axis=1).reshape((-1,) + u.shape[1:]), a, b)


def _both_branches(predict, family, params, z, t, cond):
  """``predict`` of the teacher's conditional and null-condition branches, ``[B, 2, ...]``, from
  one forward pass of batch ``2B``: each example's two rows interleaved."""
  b = z.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
  cond = jax.tree.map(lambda c: jnp.broadcast_to(c, (b,) + jnp.shape(c)[1:]), cond)
  both = predict(family, family.teacher, params, _interleave(z, z), _interleave(t, t),
                 _interleave(cond, family.null_cond(cond)))
  return both.reshape((b, 2) + both.shape[1:])


def guided_x_prediction(family, params, z, t, cond, w):
  """Classifier-free guided ``(1+w) x̂_c − w x̂_u`` of the teacher, from one forward pass of
  batch ``2B``: each example's conditional and null-condition rows interleaved."""
  x_both = _both_branches(x_prediction, family, params, z, t, cond)
  return guidance.guided_x(x_both[:, 0], x_both[:, 1], w)


def v_prediction(family, net, params, z, t, cond, w=None, *, train: bool = False, rngs=None):
  """The network's ``v̂`` (what the DDIM encoder needs: ``ε̂`` at ``t = 0`` without ``1/σ``)."""
  return family.v_hat(net, params, z, t, cond, w, train=train, rngs=rngs)


def guided_v_prediction(family, params, z, t, cond, w):
  """Guided ``(1+w) v̂_c − w v̂_u`` of the teacher, batched as ``guided_x_prediction``. ``x̂`` and
  ``ε̂`` are linear in ``v̂`` at fixed ``z``, so this is the guided x- and ε-prediction too."""
  v_both = _both_branches(v_prediction, family, params, z, t, cond)
  return guidance.guided_x(v_both[:, 0], v_both[:, 1], w)


def v_fn(family, params, cond, w=None, *, net=None):
  """An encoder-ready ``v_fn(z, t)`` (``diffusion.encode_deterministic``) of a w-conditioned
  student, as ``denoise_fn``."""
  net = family.student if net is None else net

  def fn(z, t):
    return v_prediction(family, net, params, z, t, cond, w)
  return fn


def guided_v_fn(family, params, cond, w):
  """An encoder-ready guided teacher: two network evaluations per step, batched."""
  def fn(z, t):
    return guided_v_prediction(family, params, z, t, cond, w)
  return fn


def guided_denoise_fn(family, params, cond, w):
  """A sampler-ready guided teacher: two network evaluations per step, batched."""
  def fn(z, t):
    return guided_x_prediction(family, params, z, t, cond, w)
  return fn
