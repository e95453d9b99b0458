"""The CLIP text transformer (transformers' ``CLIPTextModel``) in Flax linen.

Token + position embeddings → pre-LayerNorm transformer layers with a **causal** mask
(``self_attn.{q,k,v,out}_proj``, ``mlp.fc1/fc2`` with quick-GELU ``x·σ(1.702x)``) →
``final_layer_norm``. Stable Diffusion conditions on ``last_hidden_state`` of all 77 tokens
(no attention mask): that is what ``__call__`` returns. Parameter paths follow transformers'
keys with ``.N`` → ``_N`` under ``text_model``.
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


class CLIPTextTransformer(nn.Module):
  """``input_ids [B, L] -> last_hidden_state [B, L, hidden]`` (after ``final_layer_norm``)."""
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    cfg, dt = self.config, self.dtype
    length = input_ids.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"input_ids has {length} tokens; the text encoder takes at most "
                       f"{cfg.max_position_embeddings}.")
    tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="text_model_embeddings_token_embedding")
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                   name="text_model_embeddings_position_embedding")
    h = (tok(input_ids) + pos(jnp.arange(length)[None, :])).astype(dt)
    act = _ACTS[cfg.hidden_act]
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name=name)
    dense = lambda feats, name: nn.Dense(feats, dtype=dt, name=name)
    for i in range(cfg.num_hidden_layers):
      p = f"text_model_encoder_layers_{i}"
      x = ln(f"{p}_layer_norm1")(h)
      a = layers.attention(dense(cfg.hidden_size, f"{p}_self_attn_q_proj")(x),
                           dense(cfg.hidden_size, f"{p}_self_attn_k_proj")(x),
                           dense(cfg.hidden_size, f"{p}_self_attn_v_proj")(x),
                           cfg.num_attention_heads, causal=True)
      h = h + dense(cfg.hidden_size, f"{p}_self_attn_out_proj")(a)
      x = ln(f"{p}_layer_norm2")(h)
      x = act(dense(cfg.intermediate_size, f"{p}_mlp_fc1")(x))
      h = h + dense(cfg.hidden_size, f"{p}_mlp_fc2")(x)
    return ln("text_model_final_layer_norm")(h).astype(jnp.float32)
