"""diffusers' ``AutoencoderKL`` in Flax linen (NHWC), sized by its ``vae/config.json``.

Encoder: ``conv_in`` → ``DownEncoderBlock2D``s (resnets without time embedding; downsampling by
an asymmetric (0, 1) pad and a stride-2 3×3 conv with no padding) → mid block (resnet,
single-head attention over all channels, resnet) → GroupNorm, SiLU, ``conv_out`` to
``2·latent_channels`` → ``quant_conv`` → (mean, logvar), logvar clipped to [−30, 20]. Decoder:
``post_quant_conv`` → ``conv_in`` → mid block → ``UpDecoderBlock2D``s (``layers_per_block + 1``
resnets, nearest ×2 + conv) → GroupNorm, SiLU, ``conv_out``. Every GroupNorm has eps 1e-6.
Diffusion runs on ``scaling_factor · z`` (SD: 0.18215).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill.latent import layers

_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  sample_size: int = 512

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
    blocks = tuple(config.get("block_out_channels", cls.block_out_channels))
    for name, want in (("down_block_types", "DownEncoderBlock2D"),
                       ("up_block_types", "UpDecoderBlock2D")):
      types = config.get(name, [want] * len(blocks))
      if any(t != want for t in types) or len(types) != len(blocks):
        raise ValueError(f"vae config: {name}={list(types)} must be {len(blocks)}× {want!r}.")
    if config.get("act_fn", "silu") != "silu":
      raise ValueError(f"vae config: act_fn={config['act_fn']!r} is not supported ('silu').")
    if config.get("mid_block_add_attention", True) is not True:
      raise ValueError("vae config: mid_block_add_attention=false is not supported.")
    if config.get("shift_factor") not in (None, 0, 0.0):
      raise ValueError(f"vae config: shift_factor={config['shift_factor']} is not supported.")
    return cls(in_channels=int(config.get("in_channels", 3)),
               out_channels=int(config.get("out_channels", 3)),
               latent_channels=int(config.get("latent_channels", 4)),
               block_out_channels=blocks,
               layers_per_block=int(config.get("layers_per_block", 1)),
               norm_num_groups=int(config.get("norm_num_groups", 32)),
               scaling_factor=float(config.get("scaling_factor", 0.18215)),
               use_quant_conv=bool(config.get("use_quant_conv", True)),
               use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
               sample_size=int(config.get("sample_size") or 512))


class SpatialSelfAttention(nn.Module):
  """The VAE mid-block attention: GroupNorm, one head over all channels, residual."""
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = nn.GroupNorm(self.groups, epsilon=_EPS, dtype=self.dtype, name="group_norm")(x)
    h = h.reshape(b, hgt * wid, c)
    dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)
    h = layers.attention(dense("to_q")(h), dense("to_k")(h), dense("to_v")(h), num_heads=1)
    return x + dense("to_out_0")(h).reshape(b, hgt, wid, c)


def _mid_block(x, ch, groups, dtype, prefix, parent_resnet):
  x = parent_resnet(ch, f"{prefix}_resnets_0")(x)
  x = SpatialSelfAttention(groups, dtype=dtype, name=f"{prefix}_attentions_0")(x)
  return parent_resnet(ch, f"{prefix}_resnets_1")(x)


class Encoder(nn.Module):
  """Ends in ``2·latent_channels`` (mean, logvar) with ``double_z``, else ``latent_channels``."""
  config: VAEConfig
  dtype: Any = jnp.float32
  double_z: bool = True

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.config, self.dtype
    resnet = lambda c, name: layers.ResnetBlock2D(c, cfg.norm_num_groups, _EPS, dtype=dt,
                                                  name=name)
    h = layers.conv(cfg.block_out_channels[0], name="conv_in", dtype=dt)(x.astype(dt))
    last = len(cfg.block_out_channels) - 1
    for i, ch in enumerate(cfg.block_out_channels):
      for j in range(cfg.layers_per_block):
        h = resnet(ch, f"down_blocks_{i}_resnets_{j}")(h)
      if i < last:
        h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
        h = layers.conv(ch, stride=2, padding=0, name=f"down_blocks_{i}_downsamplers_0_conv",
                        dtype=dt)(h)
    h = _mid_block(h, cfg.block_out_channels[-1], cfg.norm_num_groups, dt, "mid_block", resnet)
    h = nn.GroupNorm(cfg.norm_num_groups, epsilon=_EPS, dtype=dt, name="conv_norm_out")(h)
    out = (2 if self.double_z else 1) * cfg.latent_channels
    return layers.conv(out, name="conv_out", dtype=dt)(nn.silu(h))


class Decoder(nn.Module):
  config: VAEConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    cfg, dt = self.config, self.dtype
    resnet = lambda c, name: layers.ResnetBlock2D(c, cfg.norm_num_groups, _EPS, dtype=dt,
                                                  name=name)
    h = layers.conv(cfg.block_out_channels[-1], name="conv_in", dtype=dt)(z.astype(dt))
    h = _mid_block(h, cfg.block_out_channels[-1], cfg.norm_num_groups, dt, "mid_block", resnet)
    last = len(cfg.block_out_channels) - 1
    for i, ch in enumerate(reversed(cfg.block_out_channels)):
      for j in range(cfg.layers_per_block + 1):
        h = resnet(ch, f"up_blocks_{i}_resnets_{j}")(h)
      if i < last:
        h = layers.conv(ch, name=f"up_blocks_{i}_upsamplers_0_conv", dtype=dt)(
            layers.upsample_nearest(h))
    h = nn.GroupNorm(cfg.norm_num_groups, epsilon=_EPS, dtype=dt, name="conv_norm_out")(h)
    return layers.conv(cfg.out_channels, name="conv_out", dtype=dt)(nn.silu(h))


class AutoencoderKL(nn.Module):
  """``encode(images) -> (mean, logvar)``, ``decode(latents) -> images`` (unscaled latents);
  ``__call__`` runs both (for initialisation)."""
  config: VAEConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, dtype=self.dtype)
    self.decoder = Decoder(cfg, dtype=self.dtype)
    if cfg.use_quant_conv:
      self.quant_conv = layers.conv(2 * cfg.latent_channels, 1, name="quant_conv",
                                    dtype=self.dtype)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = layers.conv(cfg.latent_channels, 1, name="post_quant_conv",
                                         dtype=self.dtype)

  def encode(self, images):
    moments = self.encoder(images)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents):
    if self.config.use_post_quant_conv:
      latents = self.post_quant_conv(latents.astype(self.dtype))
    return self.decoder(latents).astype(jnp.float32)

  def __call__(self, images):
    mean, _ = self.encode(images)
    return self.decode(mean)


def sample_latents(mean, logvar, rng):
  """A draw from the encoder's diagonal Gaussian ``mean + exp(logvar/2)·ε``."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """diffusers ``VQModel`` fields (the LDM cin256-v2 first stage is VQ-f4: channels
  [128, 256, 512], 2 resnets, 3 latent channels, 8192 codes, scale 1.0)."""
  autoencoder: VAEConfig
  num_vq_embeddings: int
  vq_embed_dim: int

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VQConfig":
    if config.get("norm_type", "group") != "group":
      raise ValueError(f"vqvae config: norm_type={config['norm_type']!r} is not supported "
                       "('group').")
    if config.get("lookup_from_codebook", False):
      raise ValueError("vqvae config: lookup_from_codebook=true is not supported.")
    base = VAEConfig.from_diffusers(
        {k: v for k, v in config.items() if k not in ("norm_type", "lookup_from_codebook")})
    latent = base.latent_channels
    return cls(base, int(config.get("num_vq_embeddings", 256)),
               int(config.get("vq_embed_dim") or latent))


def quantize(latents, codebook):
  """Each latent vector (last axis) replaced by its nearest code (Euclidean), and the indices."""
  flat = latents.reshape(-1, latents.shape[-1])
  dist = (jnp.sum(flat ** 2, axis=1, keepdims=True) - 2.0 * flat @ codebook.T
          + jnp.sum(codebook ** 2, axis=1)[None, :])
  idx = jnp.argmin(dist, axis=1)
  return codebook[idx].reshape(latents.shape), idx.reshape(latents.shape[:-1])


class VQModel(nn.Module):
  """diffusers ``VQModel``: ``encode`` gives the **pre-quantisation** latents (encoder →
  ``quant_conv``), on which LDM's diffusion runs; ``decode`` quantises to the nearest code of
  ``quantize.embedding``, then ``post_quant_conv`` → decoder."""
  config: VQConfig
  dtype: Any = jnp.float32

  def setup(self):
    cfg, ae = self.config, self.config.autoencoder
    self.encoder = Encoder(ae, dtype=self.dtype, double_z=False)
    self.decoder = Decoder(ae, dtype=self.dtype)
    self.quant_conv = layers.conv(cfg.vq_embed_dim, 1, name="quant_conv", dtype=self.dtype)
    self.post_quant_conv = layers.conv(ae.latent_channels, 1, name="post_quant_conv",
                                       dtype=self.dtype)
    self.quantize_embedding = nn.Embed(cfg.num_vq_embeddings, cfg.vq_embed_dim,
                                       name="quantize_embedding")

  def encode(self, images):
    return self.quant_conv(self.encoder(images)).astype(jnp.float32)

  def decode(self, latents, force_not_quantize: bool = False):
    if not force_not_quantize:
      latents, _ = quantize(jnp.asarray(latents, jnp.float32), self.quantize_embedding.embedding)
    return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)

  def __call__(self, images):
    return self.decode(self.encode(images))


class ClassEmbedder(nn.Module):
  """LDM's ``ClassEmbedder``: label → ``embedding`` row as a one-token context ``[B, 1, D]``
  (cin256-v2: 1001 rows × 512, row 1000 the null class of classifier-free guidance)."""
  num_classes: int
  embed_dim: int

  @nn.compact
  def __call__(self, labels):
    return nn.Embed(self.num_classes, self.embed_dim, name="embedding")(
        jnp.asarray(labels, jnp.int32))[:, None, :]
