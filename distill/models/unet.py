"""U-Net denoiser (NHWC) in the style of iDDPM / progressive distillation.

The network maps ``(z_t, λ_t, label[, w])`` to a v-prediction (docs/design.md §1.2, §1.10):

* time enters as the log-SNR, mapped to a bounded value ``arctan(exp(-λ/2)) / (π/2)`` in (0, 1),
  scaled by 1000, then sinusoidal features → 2-layer MLP (the *time embedding*);
* the class label enters through an embedding with ``num_classes + 1`` rows: the last row,
  index ``num_classes``, is the **null label** of the unconditional branch of classifier-free
  guidance;
* with ``use_w_embedding`` (the stage-one student, paper §3.1) the guidance weight ``w`` enters
  through sinusoidal features → MLP whose last layer is zero-initialised, added to the time
  embedding, so a fresh w-embedding leaves the network's output unchanged;
* residual blocks with GroupNorm and scale–shift conditioning, self-attention at the configured
  resolutions, zero-initialised output convolutions.

Conv, Dense and GroupNorm are ``distill.models.layers``': flax's layers, with the same parameters,
whose gradients sum over positions as matrix products on CPU.

Parameters are float32; ``dtype`` sets the activation dtype (bfloat16 on TPU). ``remat`` recomputes
each residual and attention block in the backward pass (gradient checkpointing): only block
inputs are kept, not the attention probabilities or GroupNorm intermediates.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill import attention as attention_ops
from distill import schedules
from distill.models import layers

W_EMBED_NAME = "w_embed"

_zeros = nn.initializers.zeros


def sinusoidal_embedding(x, dim: int, max_period: float = 10000.0):
  """Sinusoidal features ``[sin(x f_k), cos(x f_k)]`` of a ``[B]`` array, ``f_k`` geometric."""
  if dim % 2:
    raise ValueError(f"embedding dim must be even, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(x, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class WEmbedding(nn.Module):
  """Guidance-weight embedding of the stage-one student (paper §3.1).

  Sinusoidal features of ``w · fourier_scale`` → Dense → swish → Dense (zero-initialised).
  """
  features: int
  fourier_dim: int
  fourier_scale: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, w):
    h = sinusoidal_embedding(w * self.fourier_scale, self.fourier_dim)
    h = layers.Dense(self.features, dtype=self.dtype, name="dense_0")(h)
    h = nn.swish(h)
    return layers.Dense(self.features, dtype=self.dtype, kernel_init=_zeros, name="dense_1")(h)


class ResBlock(nn.Module):
  """GroupNorm → swish → conv, scale–shift by the embedding, → swish → dropout → zero conv."""
  out_ch: int
  num_groups: int
  dropout: float
  deterministic: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb):
    h = nn.swish(layers.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_0")(x))
    h = layers.Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv_0")(h)
    scale_shift = layers.Dense(2 * self.out_ch, dtype=self.dtype, name="emb_proj")(nn.swish(emb))
    scale, shift = jnp.split(scale_shift, 2, axis=-1)
    h = layers.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_1")(h)
    h = nn.swish(layers.scale_shift(h, scale, shift))
    h = nn.Dropout(self.dropout, deterministic=self.deterministic)(h)
    h = layers.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=_zeros, name="conv_1")(h)
    if x.shape[-1] != self.out_ch:
      x = layers.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="skip")(x)
    return x + h


class AttnBlock(nn.Module):
  """Multi-head self-attention over the spatial positions, zero-initialised output projection;
  ``attention`` is the implementation (distill/attention.py)."""
  head_dim: int
  num_groups: int
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    if c % self.head_dim:
      raise ValueError(f"model.head_dim={self.head_dim} must divide the channel count {c} of "
                       "every attention block; choose a head_dim that divides ch * ch_mult.")
    heads = c // self.head_dim
    h = layers.GroupNorm(self.num_groups, dtype=self.dtype, name="norm")(x)
    qkv = layers.Dense(3 * c, dtype=self.dtype, name="qkv")(h.reshape(b, hgt * wid, c))
    q, k, v = jnp.split(qkv.reshape(b, hgt * wid, 3 * heads, self.head_dim), 3, axis=2)
    h = attention_ops.dot_product_attention(q, k, v, implementation=self.attention)
    h = layers.Dense(c, dtype=self.dtype, kernel_init=_zeros, name="out")(
        h.reshape(b, hgt * wid, c))
    return x + h.reshape(b, hgt, wid, c)


class UNet(nn.Module):
  """v-prediction U-Net. See the module docstring; ``build_unet`` makes one from a config."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  num_classes: int
  out_ch: int
  head_dim: int = 64
  dropout: float = 0.0
  num_groups: int = 32
  use_w_embedding: bool = False
  w_fourier_scale: float = 250.0
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "auto"

  @property
  def null_label(self) -> int:
    """The label of the unconditional branch: one past the last class."""
    return self.num_classes

  def level_resolutions(self, image_size: int) -> list[int]:
    return [image_size // 2**i for i in range(len(self.ch_mult))]

  @nn.compact
  def __call__(self, z, logsnr, labels, w=None, *, train: bool = False):
    b = z.shape[0]
    resolutions = self.level_resolutions(z.shape[1])
    missing = sorted(set(self.attn_resolutions) - set(resolutions))
    if missing:
      raise ValueError(f"model.attn_resolutions {list(self.attn_resolutions)} contains {missing}, "
                       f"which does not occur; the U-Net's resolutions are {resolutions}.")
    if self.use_w_embedding and w is None:
      raise ValueError("this U-Net has a w-embedding (use_w_embedding=True): pass w.")
    if not self.use_w_embedding and w is not None:
      raise ValueError("w was given but this U-Net has no w-embedding: build it with "
                       "use_w_embedding=True (the stage-one student) or drop w.")
    emb_dim = 4 * self.ch
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), (b,))
    t_in = schedules.logsnr_to_time_input(logsnr) * 1000.0
    emb = sinusoidal_embedding(t_in, self.ch)
    emb = layers.Dense(emb_dim, dtype=self.dtype, name="time_dense_0")(emb)
    emb = layers.Dense(emb_dim, dtype=self.dtype, name="time_dense_1")(nn.swish(emb))
    emb = emb + nn.Embed(self.num_classes + 1, emb_dim, name="class_embed")(
        jnp.asarray(labels, jnp.int32)).astype(emb.dtype)
    if self.use_w_embedding:
      w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,))
      emb = emb + WEmbedding(emb_dim, self.ch, self.w_fourier_scale, dtype=self.dtype,
                             name=W_EMBED_NAME)(w)

    block = nn.remat(ResBlock) if self.remat else ResBlock
    attn_block = nn.remat(AttnBlock) if self.remat else AttnBlock

    def res(out_ch, name):
      return block(out_ch, self.num_groups, self.dropout, deterministic=not train,
                   dtype=self.dtype, name=name)

    def attn(name):
      return attn_block(self.head_dim, self.num_groups, dtype=self.dtype,
                        attention=self.attention, name=name)

    h = layers.Conv(self.ch, (3, 3), dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = res(self.ch * mult, f"down_{level}_res_{i}")(h, emb)
        if resolutions[level] in self.attn_resolutions:
          h = attn(f"down_{level}_attn_{i}")(h)
        skips.append(h)
      if level != len(self.ch_mult) - 1:
        h = layers.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype,
                        name=f"down_{level}_downsample")(h)
        skips.append(h)

    h = res(h.shape[-1], "mid_res_0")(h, emb)
    h = attn("mid_attn")(h)
    h = res(h.shape[-1], "mid_res_1")(h, emb)

    for level, mult in reversed(list(enumerate(self.ch_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(self.ch * mult, f"up_{level}_res_{i}")(h, emb)
        if resolutions[level] in self.attn_resolutions:
          h = attn(f"up_{level}_attn_{i}")(h)
      if level != 0:
        bh, hh, wh, ch = h.shape
        h = jax.image.resize(h, (bh, 2 * hh, 2 * wh, ch), method="nearest")
        h = layers.Conv(ch, (3, 3), dtype=self.dtype, name=f"up_{level}_upsample")(h)
    assert not skips

    h = nn.swish(layers.GroupNorm(self.num_groups, dtype=self.dtype, name="norm_out")(h))
    h = layers.Conv(self.out_ch, (3, 3), dtype=self.dtype, kernel_init=_zeros, name="conv_out")(h)
    return h.astype(jnp.float32)
