"""Builds U-Nets from ``config.model`` and ``config.data`` and checks the sizes first."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill import attention
from distill.models.unet import UNet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_model_config(config) -> None:
  """One-line ``ValueError`` naming the field and the fix for an impossible U-Net size."""
  m, d = config.model, config.data
  levels = len(m.ch_mult)
  if levels < 1:
    raise ValueError("model.ch_mult is empty: give one channel multiplier per level, e.g. (1, 2).")
  if m.ch < 1 or m.num_res_blocks < 1:
    raise ValueError(f"model.ch ({m.ch}) and model.num_res_blocks ({m.num_res_blocks}) must be >= 1.")
  factor = 2 ** (levels - 1)
  if d.image_size % factor:
    raise ValueError(f"data.image_size={d.image_size} is not divisible by 2^(levels-1)={factor} "
                     f"for model.ch_mult={tuple(m.ch_mult)}: use fewer levels or another size.")
  resolutions = [d.image_size // 2**i for i in range(levels)]
  missing = sorted(set(m.attn_resolutions) - set(resolutions))
  if missing:
    raise ValueError(f"model.attn_resolutions contains {missing}, which does not occur: the "
                     f"U-Net's resolutions are {resolutions}.")
  if m.get("attention", "auto") not in attention.IMPLEMENTATIONS:
    raise ValueError(f"model.attention={m.attention!r} is not one of "
                     f"{list(attention.IMPLEMENTATIONS)}.")
  if m.dtype not in _DTYPES:
    raise ValueError(f"model.dtype={m.dtype!r} is not one of {sorted(_DTYPES)}.")
  for level, mult in enumerate(m.ch_mult):
    width = m.ch * mult
    if width % m.num_groups:
      raise ValueError(f"model.num_groups={m.num_groups} does not divide the width {width} of "
                       f"level {level}: choose a divisor of every ch * ch_mult.")
    attends = resolutions[level] in m.attn_resolutions or level == levels - 1
    if attends and width % m.head_dim:
      raise ValueError(f"model.head_dim={m.head_dim} does not divide the width {width} of "
                       f"attention at level {level}: choose a divisor of ch * ch_mult.")
  if not 0.0 <= m.dropout < 1.0:
    raise ValueError(f"model.dropout={m.dropout} must be in [0, 1).")
  if d.num_classes < 1:
    raise ValueError(f"data.num_classes={d.num_classes} must be >= 1.")


def build_unet(config, *, use_w_embedding: bool = False, dropout: float | None = None) -> UNet:
  """The U-Net of ``config`` (teacher by default; ``use_w_embedding`` for a student).

  ``dropout`` overrides ``config.model.dropout`` (distillation trains without dropout).
  """
  check_model_config(config)
  m, d = config.model, config.data
  return UNet(
      ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
      attn_resolutions=tuple(m.attn_resolutions), num_classes=d.num_classes,
      out_ch=d.channels, head_dim=m.head_dim,
      dropout=m.dropout if dropout is None else dropout, num_groups=m.num_groups,
      use_w_embedding=use_w_embedding, w_fourier_scale=m.w_fourier_scale,
      dtype=_DTYPES[m.dtype], remat=m.remat, attention=m.get("attention", "auto"))


def model_input_shape(config, batch_size: int = 1) -> tuple[int, ...]:
  d = config.data
  return (batch_size, d.image_size, d.image_size, d.channels)


def init_params(model: UNet, rng, image_shape):
  """Initial parameters for inputs of ``image_shape`` (``[B, H, W, C]``), in one compiled call
  (compiled once per model and shape in a process: the module is part of the cache key)."""
  return _init(rng, model=model, image_shape=tuple(image_shape))


@functools.partial(jax.jit, static_argnames=("model", "image_shape"))
def _init(rng, *, model: UNet, image_shape: tuple[int, ...]):
  b = image_shape[0]
  z = jnp.zeros(image_shape, jnp.float32)
  w = jnp.zeros((b,), jnp.float32) if model.use_w_embedding else None
  return model.init(rng, z, jnp.zeros((b,)), jnp.zeros((b,), jnp.int32), w)["params"]


def param_count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
