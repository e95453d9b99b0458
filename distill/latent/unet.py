"""diffusers' ``UNet2DConditionModel`` in Flax linen (NHWC), sized by its own ``config.json``.

The Stable Diffusion 1.x/2.x family: ``conv_in`` → down blocks (``DownBlock2D`` /
``CrossAttnDownBlock2D``) → ``UNetMidBlock2DCrossAttn`` → up blocks (``UpBlock2D`` /
``CrossAttnUpBlock2D``) with skip connections → GroupNorm, SiLU, ``conv_out``. Time enters as
sinusoidal features of the (fractional) timestep → ``time_embedding.linear_1``/``linear_2``;
with ``time_cond_proj_dim`` a condition (e.g. a guidance-weight embedding, LCM-style) passes
through ``time_embedding.cond_proj`` and is **added to the sinusoidal features** before
``linear_1``, as diffusers does. ``in_channels: 9`` is the inpainting U-Net. The output equals
diffusers' ``.sample`` transposed to NHWC (tests/test_latent_models.py, parity fixtures).

``attention_head_dim`` is, as in diffusers, the number of heads when ``num_attention_heads`` is
not set (diffusers issue #2011). Config fields this module does not implement are refused with
one error naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from distill.latent import layers

_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D")

# Fields whose only supported value is the SD one: field -> allowed values.
_FIXED = {
    "act_fn": ("silu",), "center_input_sample": (False,), "class_embed_type": (None,),
    "addition_embed_type": (None,), "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
    "resnet_time_scale_shift": ("default",), "time_embedding_type": ("positional",),
    "timestep_post_act": (None,), "time_embedding_act_fn": (None,), "dual_cross_attention": (False,),
    "only_cross_attention": (False,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "mid_block_scale_factor": (1, 1.0),
    "downsample_padding": (1,), "class_embeddings_concat": (False,), "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,), "mid_block_only_cross_attention": (None,),
    "cross_attention_norm": (None,), "addition_time_embed_dim": (None,),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_dim": (None,), "attention_type": ("default",), "reverse_transformer_layers_per_block": (None,),
    "dropout": (0, 0.0),
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """The fields of diffusers' ``UNet2DConditionModel`` config this implementation reads."""
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 768
  num_attention_heads: tuple = (8, 8, 8, 8)
  use_linear_projection: bool = False
  transformer_layers_per_block: int = 1
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  time_cond_proj_dim: int | None = None
  sample_size: int = 64

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
    """Reads a diffusers ``unet/config.json`` dict; unsupported fields give one clear error."""
    for field, allowed in _FIXED.items():
      if field in config and config[field] not in allowed:
        raise ValueError(f"unet config: {field}={config[field]!r} is not supported (supported: "
                         f"{allowed[0]!r}).")
    blocks = tuple(config.get("block_out_channels", cls.block_out_channels))
    down = tuple(config.get("down_block_types", cls.down_block_types))
    up = tuple(config.get("up_block_types", cls.up_block_types))
    for name, types, allowed in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
      bad = [t for t in types if t not in allowed]
      if bad or len(types) != len(blocks):
        raise ValueError(f"unet config: {name}={list(types)} must list {len(blocks)} blocks of "
                         f"{allowed}.")
    for name in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim",
                 "norm_num_groups"):
      if isinstance(config.get(name), (list, tuple)):
        raise ValueError(f"unet config: per-block {name} is not supported; give one integer.")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (int(heads),) * len(blocks)
    for c, h in zip(blocks, heads):
      if c % h:
        raise ValueError(f"unet config: {c} channels do not split into {h} attention heads.")
    return cls(
        in_channels=int(config.get("in_channels", 4)),
        out_channels=int(config.get("out_channels", 4)),
        down_block_types=down, up_block_types=up, block_out_channels=blocks,
        layers_per_block=int(config.get("layers_per_block", 2)),
        norm_num_groups=int(config.get("norm_num_groups", 32)),
        norm_eps=float(config.get("norm_eps", 1e-5)),
        cross_attention_dim=int(config.get("cross_attention_dim", 1280)),
        num_attention_heads=heads,
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        transformer_layers_per_block=int(config.get("transformer_layers_per_block", 1)),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
        freq_shift=float(config.get("freq_shift", 0)),
        time_cond_proj_dim=config.get("time_cond_proj_dim"),
        sample_size=int(config.get("sample_size") or 64))


class UNet2DConditionModel(nn.Module):
  """``(sample [B,H,W,C], timesteps [B] or scalar, context [B,L,D]) -> [B,H,W,out]``.

  ``timestep_cond`` ([B, time_cond_proj_dim]) is required when the config has
  ``time_cond_proj_dim``. ``dtype`` is the activation dtype (parameters stay float32);
  ``remat`` recomputes each resnet and transformer in the backward pass; ``attention`` is the
  implementation of its attention (distill/attention.py).
  """
  config: UNetConfig
  dtype: Any = jnp.float32
  remat: bool = False
  attention: str = "auto"

  @nn.compact
  def __call__(self, sample, timesteps, context, timestep_cond=None):
    cfg = self.config
    dt = self.dtype
    resnet_cls = nn.remat(layers.ResnetBlock2D) if self.remat else layers.ResnetBlock2D
    attn_cls = nn.remat(layers.Transformer2DModel) if self.remat else layers.Transformer2DModel
    b = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
    ch0 = cfg.block_out_channels[0]
    temb = layers.timestep_embedding(timesteps, ch0, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                     freq_shift=cfg.freq_shift)
    if cfg.time_cond_proj_dim is not None:
      if timestep_cond is None:
        raise ValueError("this U-Net has time_cond_proj_dim: pass timestep_cond of shape "
                         f"[B, {cfg.time_cond_proj_dim}].")
      temb = temb + nn.Dense(ch0, use_bias=False, name="time_embedding_cond_proj")(
          jnp.asarray(timestep_cond, jnp.float32))
    temb = nn.Dense(4 * ch0, name="time_embedding_linear_1")(temb)
    temb = nn.Dense(4 * ch0, name="time_embedding_linear_2")(nn.silu(temb)).astype(dt)
    context = jnp.asarray(context).astype(dt)

    resnet = lambda c, name: resnet_cls(c, cfg.norm_num_groups, cfg.norm_eps, dtype=dt,
                                        name=name)
    transformer = lambda heads, name: attn_cls(
        heads, cfg.norm_num_groups, cfg.use_linear_projection,
        cfg.transformer_layers_per_block, dtype=dt, attention=self.attention, name=name)

    h = layers.conv(ch0, name="conv_in", dtype=dt)(sample.astype(dt))
    skips = [h]
    last = len(cfg.block_out_channels) - 1
    for i, (kind, ch) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
      prefix = f"down_blocks_{i}"
      for j in range(cfg.layers_per_block):
        h = resnet(ch, f"{prefix}_resnets_{j}")(h, temb)
        if kind == "CrossAttnDownBlock2D":
          h = transformer(cfg.num_attention_heads[i], f"{prefix}_attentions_{j}")(h, context)
        skips.append(h)
      if i < last:
        h = layers.conv(ch, stride=2, name=f"{prefix}_downsamplers_0_conv", dtype=dt)(h)
        skips.append(h)

    ch = cfg.block_out_channels[-1]
    h = resnet(ch, "mid_block_resnets_0")(h, temb)
    h = transformer(cfg.num_attention_heads[-1], "mid_block_attentions_0")(h, context)
    h = resnet(ch, "mid_block_resnets_1")(h, temb)

    heads_up = tuple(reversed(cfg.num_attention_heads))
    for i, (kind, ch) in enumerate(zip(cfg.up_block_types, reversed(cfg.block_out_channels))):
      prefix = f"up_blocks_{i}"
      for j in range(cfg.layers_per_block + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = resnet(ch, f"{prefix}_resnets_{j}")(h, temb)
        if kind == "CrossAttnUpBlock2D":
          h = transformer(heads_up[i], f"{prefix}_attentions_{j}")(h, context)
      if i < last:
        h = layers.conv(ch, name=f"{prefix}_upsamplers_0_conv", dtype=dt)(
            layers.upsample_nearest(h))

    h = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=dt, name="conv_norm_out")(h)
    h = layers.conv(cfg.out_channels, name="conv_out", dtype=dt)(nn.silu(h))
    return h.astype(jnp.float32)
