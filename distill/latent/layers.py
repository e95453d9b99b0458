"""Building blocks shared by the latent-space models, with diffusers' module names.

Every submodule is named after the diffusers parameter path with ``.N`` → ``_N``
(``down_blocks.0.resnets.1.norm1`` → ``down_blocks_0/resnets_1/norm1``), so the weight import
(``distill/latent/weights.py``) is a rename plus the PyTorch → Flax layout rules. The epsilons
are the originals' (docs/latent.md, "Numerics"): resnets ``norm_eps``, the transformer's
GroupNorm 1e-6, its LayerNorms 1e-5; GEGLU uses the **exact** GELU.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill import attention as attention_ops


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
  """diffusers' ``get_timestep_embedding``: ``[sin, cos]`` (``[cos, sin]`` when flipped) of
  ``t·exp(−log(max_period)·k/(dim/2 − freq_shift))``; timesteps may be fractional."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def conv(features: int, kernel: int = 3, *, name: str, dtype, stride: int = 1,
         padding=None) -> nn.Conv:
  pad = kernel // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                 name=name)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x):
  return jax.nn.gelu(x, approximate=False)


def attention(q, k, v, num_heads: int, *, causal: bool = False, implementation: str = "auto"):
  """Scaled dot-product attention of ``[B, L, H·d]`` tensors, ``scale = d^−½``; softmax in f32.
  ``causal`` masks keys after each query (the CLIP text encoder). The implementation is chosen
  per backend by default (``distill.attention``)."""
  b, lq, inner = q.shape
  d = inner // num_heads
  heads = lambda x: x.reshape(b, x.shape[1], num_heads, d)
  out = attention_ops.dot_product_attention(heads(q), heads(k), heads(v), causal=causal,
                                            implementation=implementation)
  return out.reshape(b, lq, inner)


class ResnetBlock2D(nn.Module):
  """diffusers ``ResnetBlock2D`` (``time_embedding_norm="default"``, output scale 1)."""
  out_channels: int
  groups: int
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x)
    h = conv(self.out_channels, name="conv1", dtype=self.dtype)(nn.silu(h))
    if temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
      h = h + t[:, None, None, :]
    h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h)
    h = conv(self.out_channels, name="conv2", dtype=self.dtype)(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="conv_shortcut", dtype=self.dtype)(x)
    return x + h


class Attention(nn.Module):
  """diffusers ``Attention`` on token sequences: ``to_q/k/v`` (bias as configured), ``to_out_0``."""
  num_heads: int
  inner_dim: int
  out_dim: int
  qkv_bias: bool = False
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    dense = lambda name, bias=self.qkv_bias, feats=self.inner_dim: nn.Dense(
        feats, use_bias=bias, dtype=self.dtype, name=name)
    h = attention(dense("to_q")(x), dense("to_k")(context), dense("to_v")(context),
                  self.num_heads, implementation=self.attention)
    return dense("to_out_0", True, self.out_dim)(h)


class GEGLU(nn.Module):
  """``proj`` to ``2·inner``, then ``hidden · GELU(gate)`` with the exact GELU."""
  inner_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden, gate = jnp.split(nn.Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x), 2,
                             axis=-1)
    return hidden * exact_gelu(gate)


class FeedForward(nn.Module):
  """diffusers ``FeedForward`` (GEGLU, ``mult=4``): ``net_0`` (GEGLU), ``net_2`` (Dense)."""
  dim: int
  mult: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
    return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention to ``context``, feed-forward; pre-LayerNorm (eps 1e-5)."""
  dim: int
  num_heads: int
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, context):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attend = lambda name: Attention(self.num_heads, self.dim, self.dim, dtype=self.dtype,
                                    attention=self.attention, name=name)
    x = x + attend("attn1")(ln("norm1")(x))
    x = x + attend("attn2")(ln("norm2")(x), context)
    return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x))


class Transformer2DModel(nn.Module):
  """diffusers ``Transformer2DModel`` on an NHWC map: GroupNorm (eps 1e-6), ``proj_in`` (1×1 conv
  or linear), ``transformer_blocks``, ``proj_out``, residual."""
  num_heads: int
  groups: int
  use_linear_projection: bool
  num_layers: int = 1
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, context):
    b, hgt, wid, c = x.shape
    h = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    if self.use_linear_projection:
      h = nn.Dense(c, dtype=self.dtype, name="proj_in")(h.reshape(b, hgt * wid, c))
    else:
      h = conv(c, 1, name="proj_in", dtype=self.dtype)(h).reshape(b, hgt * wid, c)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(c, self.num_heads, dtype=self.dtype, attention=self.attention,
                                name=f"transformer_blocks_{i}")(h, context)
    if self.use_linear_projection:
      h = nn.Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hgt, wid, c)
    else:
      h = conv(c, 1, name="proj_out", dtype=self.dtype)(h.reshape(b, hgt, wid, c))
    return x + h


def upsample_nearest(x):
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(
      b, 2 * h, 2 * w, c)
