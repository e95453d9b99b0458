"""The U-Net's Conv, Dense and GroupNorm, with their sums over positions as matrix products.

Drop-in replacements for ``flax.linen``'s ``Conv``, ``Dense`` and ``GroupNorm`` as the U-Net uses
them: the same parameters (names, shapes, initialisers, so the same initial values and the same
checkpoints) and the same maths. They differ in how the gradient is computed. Autodiff of a bias
``y + b``, of GroupNorm and of the scale–shift ``h·(1 + s) + t`` sums an ``[N, H, W, C]`` array over
its positions, keeping the channel (minor) axis; XLA:CPU compiles such sums, fused with the
element-wise work that feeds them, to strided loops that took more than a third of the CIFAR-10
U-Net's backward pass (BENCHMARKS.md, "Where the CIFAR-10 training step's time goes"). Here those
sums have hand-written gradients (``jax.custom_vjp``) in which every sum over positions is
``sum_positions``: on CPU a batched matrix product with a vector of ones, elsewhere (TPU, GPU) a
plain ``sum`` that XLA fuses as usual (``jax.lax.platform_dependent``).
"""

from __future__ import annotations

import functools
import types
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_F32 = jnp.float32


def _dot_sum(a):
  ones = jnp.ones((a.shape[0], 1, a.shape[1]), a.dtype)
  return jax.lax.dot_general(ones, a, (((2,), (1,)), ((0,), (0,))),
                             preferred_element_type=_F32)[:, 0, :]


def sum_positions(a):
  """``a.sum(axis=1)`` in float32 for ``a`` of shape ``[N, K, C]``; on CPU as a matrix product."""
  return jax.lax.platform_dependent(a, cpu=_dot_sum,
                                    default=lambda a: jnp.sum(a, axis=1, dtype=_F32))


def _sum_all_positions(a):
  """Sum of ``a`` over every axis but the last (the channels), float32."""
  return sum_positions(a.reshape(1, -1, a.shape[-1]))[0]


@jax.custom_vjp
def add_bias(y, bias):
  """``y + bias`` with ``bias`` over the last axis."""
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, bias


def _add_bias_bwd(bias, dy):
  return dy, _sum_all_positions(dy).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def scale_shift(h, scale, shift):
  """``h · (1 + scale) + shift`` for ``h`` ``[N, H, W, C]`` and ``scale``, ``shift`` ``[N, C]``.

  The embedding's conditioning of a residual block (scale–shift, as in iDDPM).
  """
  return h * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]


def _scale_shift_fwd(h, scale, shift):
  return scale_shift(h, scale, shift), (h, scale, shift)


def _scale_shift_bwd(res, dy):
  h, scale, shift = res
  n, c = scale.shape
  dh = dy * (1.0 + scale[:, None, None, :])
  dscale = sum_positions((dy * h).reshape(n, -1, c)).astype(scale.dtype)
  dshift = sum_positions(dy.reshape(n, -1, c)).astype(shift.dtype)
  return dh, dscale, dshift


scale_shift.defvjp(_scale_shift_fwd, _scale_shift_bwd)


def _per_channel(group_values, group_size: int):
  """``[N, G]`` → ``[N, 1, G·group_size]``: each group's value for each of its channels."""
  return jnp.repeat(group_values, group_size, axis=1)[:, None, :]


def _group_stats(x, num_groups: int, epsilon: float):
  """Mean and 1/std of each (sample, group) of ``x`` ``[N, K, C]``, per channel: ``[N, 1, C]``."""
  n, k, c = x.shape
  size = c // num_groups
  count = k * size
  mean = sum_positions(x).reshape(n, num_groups, size).sum(-1) / count
  mean_sq = sum_positions(x * x).reshape(n, num_groups, size).sum(-1) / count
  rstd = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0.0) + epsilon)
  return _per_channel(mean, size), _per_channel(rstd, size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, scale, bias, num_groups: int, epsilon: float):
  """GroupNorm of ``x`` ``[N, K, C]`` over (positions, channels of a group), in float32.

  Variance as ``E[x²] − E[x]²`` (flax's default), then ``(x − mean)/√(var + ε) · scale + bias``.
  """
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
  # Residuals keep x in its own dtype (bfloat16 on TPU), not a float32 copy.
  x32 = x.astype(_F32)
  mean, rstd = _group_stats(x32, num_groups, epsilon)
  return (x32 - mean) * rstd * scale + bias, (x, mean, rstd, scale)


def _group_norm_bwd(num_groups, epsilon, res, dy):
  del epsilon
  x, mean, rstd, scale = res
  n, k, c = x.shape
  size = c // num_groups
  xhat = (x.astype(_F32) - mean) * rstd
  dy_xhat = sum_positions(dy * xhat)  # [N, C]
  dy_sum = sum_positions(dy)
  # With g = dy·scale: dx = rstd · (g − mean_group(g) − x̂ · mean_group(g · x̂)).
  g_mean = (dy_sum * scale).reshape(n, num_groups, size).sum(-1) / (k * size)
  gx_mean = (dy_xhat * scale).reshape(n, num_groups, size).sum(-1) / (k * size)
  dx = rstd * (dy * scale - _per_channel(g_mean, size) - xhat * _per_channel(gx_mean, size))
  return dx.astype(x.dtype), dy_xhat.sum(0).astype(scale.dtype), dy_sum.sum(0).astype(scale.dtype)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def param(module: nn.Module, name: str, init, shape: Sequence[int]):
  """``module.param(name, init, shape, float32)``. A parameter that exists (in every ``apply``) is
  read and its shape compared with ``shape``; flax's ``param`` makes the same check by tracing
  ``init`` again, for every parameter of every traced call."""
  if not module.has_variable("params", name):
    return module.param(name, init, tuple(shape), _F32)
  value = module.get_variable("params", name)
  if tuple(value.shape) != tuple(shape):
    raise ValueError(f"parameter {'/'.join((*module.scope.path, name))} has shape "
                     f"{tuple(value.shape)}, this model's has {tuple(shape)}: parameters of "
                     "another model (another config?).")
  return value


class GroupNorm(nn.Module):
  """``flax.linen.GroupNorm(num_groups)`` over ``[N, ..., C]``: parameters ``scale``, ``bias``."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: num_groups={self.num_groups} must divide the channel count "
                       f"{c}; choose model.num_groups dividing every width ch * ch_mult.")
    scale = param(self, "scale", nn.initializers.ones, (c,))
    bias = param(self, "bias", nn.initializers.zeros, (c,))
    y = group_norm(x.reshape(x.shape[0], -1, c), scale, bias, self.num_groups, self.epsilon)
    return y.reshape(x.shape).astype(self.dtype or jnp.result_type(x, _F32))


class Dense(nn.Module):
  """``flax.linen.Dense``: parameters ``kernel`` ``[in, out]`` and ``bias`` ``[out]``."""
  features: int
  dtype: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    kernel = param(self, "kernel", self.kernel_init, (x.shape[-1], self.features))
    bias = param(self, "bias", nn.initializers.zeros, (self.features,))
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
    return add_bias(y, bias.astype(dtype))


class Conv(nn.Module):
  """``flax.linen.Conv`` (NHWC, ``SAME`` padding): ``kernel`` ``[kh, kw, in, out]``, ``bias``."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  dtype: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x):
    shape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = param(self, "kernel", self.kernel_init, shape)
    bias = param(self, "bias", nn.initializers.zeros, (self.features,))
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), tuple(self.strides),
                                     "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return add_bias(y, bias.astype(dtype))


# flax.linen's layers under this module's names: what these layers are checked against
# (tests/test_layers.py) and profiled against (bench/step_profile.py), by swapping them into
# ``distill.models.unet.layers``.
FLAX_LAYERS = types.SimpleNamespace(
    Conv=nn.Conv, Dense=nn.Dense, GroupNorm=nn.GroupNorm,
    scale_shift=lambda h, s, t: h * (1.0 + s[:, None, None, :]) + t[:, None, None, :])
