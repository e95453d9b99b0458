"""CLIP in Flax linen: the text transformer (transformers' ``CLIPTextModel``), and the text and
vision towers with their projections (``CLIPTextModelWithProjection``,
``CLIPVisionModelWithProjection``) that CLIP scores and features use.

Text: token + position embeddings → pre-LayerNorm transformer layers with a **causal** mask
(``self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2`` with quick-GELU ``x·σ(1.702x)`` or exact GELU)
→ ``final_layer_norm``. Stable Diffusion conditions on ``last_hidden_state`` of all 77 tokens
(no attention mask): that is what ``CLIPTextTransformer`` returns. The projected text embedding
is the final hidden state at the end token, through ``text_projection`` (no bias).

Vision: a ``patch × patch`` convolution with stride ``patch`` (no bias) → a learned class token in
front → position embeddings → ``pre_layrnorm`` (transformers' spelling) → the same layers without
a mask → ``post_layernorm`` of the class token → ``visual_projection`` (no bias). Images are NHWC,
normalised with the model's mean and std.

Parameter paths follow transformers' keys with ``.`` → ``_`` (``text_model_…``,
``vision_model_…``), so ``distill/latent/weights.py`` loads its safetensors files directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from distill.latent import layers

_ACTS = {"quick_gelu": layers.quick_gelu, "gelu": layers.exact_gelu}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
    act = config.get("hidden_act", "quick_gelu")
    if act not in _ACTS:
      raise ValueError(f"text_encoder config: hidden_act={act!r} is not supported "
                       f"({sorted(_ACTS)}).")
    hidden, heads = int(config.get("hidden_size", 512)), int(config.get("num_attention_heads", 8))
    if hidden % heads:
      raise ValueError(f"text_encoder config: hidden_size {hidden} does not split into {heads} "
                       "heads.")
    return cls(vocab_size=int(config.get("vocab_size", 49408)), hidden_size=hidden,
               intermediate_size=int(config.get("intermediate_size", 2048)),
               num_hidden_layers=int(config.get("num_hidden_layers", 12)),
               num_attention_heads=heads,
               max_position_embeddings=int(config.get("max_position_embeddings", 77)),
               hidden_act=act, layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)))


def _encoder(h, cfg, dt, prefix: str, *, causal: bool):
  """The pre-LayerNorm transformer layers ``{prefix}_encoder_layers_{i}``; called inside a
  module's ``nn.compact`` method, whose submodules they become."""
  act = _ACTS[cfg.hidden_act]
  ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name=name)
  dense = lambda feats, name: nn.Dense(feats, dtype=dt, name=name)
  for i in range(cfg.num_hidden_layers):
    p = f"{prefix}_encoder_layers_{i}"
    x = ln(f"{p}_layer_norm1")(h)
    a = layers.attention(dense(cfg.hidden_size, f"{p}_self_attn_q_proj")(x),
                         dense(cfg.hidden_size, f"{p}_self_attn_k_proj")(x),
                         dense(cfg.hidden_size, f"{p}_self_attn_v_proj")(x),
                         cfg.num_attention_heads, causal=causal)
    h = h + dense(cfg.hidden_size, f"{p}_self_attn_out_proj")(a)
    x = ln(f"{p}_layer_norm2")(h)
    x = act(dense(cfg.intermediate_size, f"{p}_mlp_fc1")(x))
    h = h + dense(cfg.hidden_size, f"{p}_mlp_fc2")(x)
  return h


def _text_hidden_states(cfg: CLIPTextConfig, dt, input_ids):
  length = input_ids.shape[1]
  if length > cfg.max_position_embeddings:
    raise ValueError(f"input_ids has {length} tokens; the text encoder takes at most "
                     f"{cfg.max_position_embeddings}.")
  tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="text_model_embeddings_token_embedding")
  pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                 name="text_model_embeddings_position_embedding")
  h = (tok(input_ids) + pos(jnp.arange(length)[None, :])).astype(dt)
  h = _encoder(h, cfg, dt, "text_model", causal=True)
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt,
                      name="text_model_final_layer_norm")(h).astype(jnp.float32)


class CLIPTextTransformer(nn.Module):
  """``input_ids [B, L] -> last_hidden_state [B, L, hidden]`` (after ``final_layer_norm``)."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    return _text_hidden_states(self.config, self.dtype, input_ids)


def end_positions(input_ids, eos_token_id: int | None):
  """Where each prompt's end token is: the first ``eos_token_id``, or, with ``None`` (OpenAI's
  and OpenCLIP's convention, and transformers' for configs with ``eos_token_id = 2``), the largest
  id, which is the end token in CLIP's vocabulary."""
  if eos_token_id is None:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextModelWithProjection(nn.Module):
  """``input_ids [B, L] -> text_embeds [B, projection_dim]`` (not normalised)."""
  config: CLIPTextConfig
  projection_dim: int
  eos_token_id: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    h = _text_hidden_states(self.config, self.dtype, input_ids)
    pooled = h[jnp.arange(h.shape[0]), end_positions(input_ids, self.eos_token_id)]
    return nn.Dense(self.projection_dim, use_bias=False, name="text_projection")(pooled)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  image_size: int = 224
  patch_size: int = 32
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
    act = config.get("hidden_act", "quick_gelu")
    if act not in _ACTS:
      raise ValueError(f"vision_config: hidden_act={act!r} is not supported ({sorted(_ACTS)}).")
    hidden, heads = int(config.get("hidden_size", 768)), int(config.get("num_attention_heads", 12))
    if hidden % heads:
      raise ValueError(f"vision_config: hidden_size {hidden} does not split into {heads} heads.")
    size, patch = int(config.get("image_size", 224)), int(config.get("patch_size", 32))
    if size % patch:
      raise ValueError(f"vision_config: image_size {size} is not a multiple of patch_size "
                       f"{patch}.")
    return cls(image_size=size, patch_size=patch, hidden_size=hidden,
               intermediate_size=int(config.get("intermediate_size", 3072)),
               num_hidden_layers=int(config.get("num_hidden_layers", 12)),
               num_attention_heads=heads, hidden_act=act,
               layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)))


class _ClassEmbedding(nn.Module):
  """The vision tower's learned class token (transformers' ``embeddings.class_embedding``)."""
  features: int

  @nn.compact
  def __call__(self):
    return self.param("class_embedding", nn.initializers.normal(0.02), (self.features,))


class CLIPVisionModelWithProjection(nn.Module):
  """``pixel_values [B, S, S, 3]`` (normalised) ``-> image_embeds [B, projection_dim]``."""
  config: CLIPVisionConfig
  projection_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values):
    cfg, dt = self.config, self.dtype
    if pixel_values.shape[1:3] != (cfg.image_size, cfg.image_size):
      raise ValueError(f"pixel_values have shape {pixel_values.shape}; the vision tower takes "
                       f"[B, {cfg.image_size}, {cfg.image_size}, 3].")
    patches = nn.Conv(cfg.hidden_size, (cfg.patch_size, cfg.patch_size),
                      strides=(cfg.patch_size, cfg.patch_size), padding="VALID", use_bias=False,
                      dtype=dt, name="vision_model_embeddings_patch_embedding")(pixel_values)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, cfg.hidden_size)
    cls = _ClassEmbedding(cfg.hidden_size, name="vision_model_embeddings")()
    h = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, cfg.hidden_size)), patches], 1)
    pos = nn.Embed(h.shape[1], cfg.hidden_size, name="vision_model_embeddings_position_embedding")
    h = h + pos(jnp.arange(h.shape[1])[None, :]).astype(dt)
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name=name)
    h = _encoder(ln("vision_model_pre_layrnorm")(h), cfg, dt, "vision_model", causal=False)
    pooled = ln("vision_model_post_layernorm")(h[:, 0]).astype(jnp.float32)
    return nn.Dense(self.projection_dim, use_bias=False, name="visual_projection")(pooled)
