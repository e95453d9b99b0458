"""Models trained here, written as diffusers / transformers folders that ``load_pretrained``,
``clip_loader.load`` — and diffusers and transformers themselves — read.

* ``vae_config`` / ``unet_config`` / ``text_encoder_config`` / ``clip_config``: our config
  dataclasses as the ``config.json`` of diffusers' ``AutoencoderKL`` and
  ``UNet2DConditionModel`` and transformers' ``CLIPTextModel`` and ``CLIPModel``.
* ``write_model(folder, config, params)``: one model folder, ``config.json`` and its weights
  under PyTorch keys and layouts (``weights.torch_tensors``).
* ``write_atomically(out, fill)``: a folder is assembled beside ``out`` and renamed into place,
  so that a folder that exists is whole: a rerun never trusts a half-written one.
"""

from __future__ import annotations

import json
import shutil
from typing import Any, Callable

import jax
from etils import epath
from safetensors.numpy import save_file

from distill.latent import clip, unet, vae, weights

DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_FILE = "model.safetensors"


def vae_config(cfg: vae.VAEConfig) -> dict:
  """``AutoencoderKL``'s ``config.json`` (``VAEConfig.from_diffusers`` reads it back)."""
  n = len(cfg.block_out_channels)
  return {"_class_name": "AutoencoderKL", "act_fn": "silu",
          "block_out_channels": list(cfg.block_out_channels),
          "down_block_types": ["DownEncoderBlock2D"] * n,
          "up_block_types": ["UpDecoderBlock2D"] * n,
          "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
          "latent_channels": cfg.latent_channels, "layers_per_block": cfg.layers_per_block,
          "norm_num_groups": cfg.norm_num_groups, "sample_size": cfg.sample_size,
          "scaling_factor": cfg.scaling_factor, "use_quant_conv": cfg.use_quant_conv,
          "use_post_quant_conv": cfg.use_post_quant_conv, "mid_block_add_attention": True,
          "force_upcast": True}


def unet_config(cfg: unet.UNetConfig) -> dict:
  """``UNet2DConditionModel``'s ``config.json`` (``UNetConfig.from_diffusers`` reads it back)."""
  return {"_class_name": "UNet2DConditionModel", "act_fn": "silu",
          "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
          "down_block_types": list(cfg.down_block_types),
          "up_block_types": list(cfg.up_block_types),
          "mid_block_type": "UNetMidBlock2DCrossAttn",
          "block_out_channels": list(cfg.block_out_channels),
          "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_num_groups,
          "norm_eps": cfg.norm_eps, "cross_attention_dim": cfg.cross_attention_dim,
          # diffusers' attention_head_dim is, for this U-Net, the number of heads per block.
          "attention_head_dim": list(cfg.num_attention_heads),
          "use_linear_projection": cfg.use_linear_projection,
          "transformer_layers_per_block": cfg.transformer_layers_per_block,
          "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift,
          "time_cond_proj_dim": cfg.time_cond_proj_dim, "sample_size": cfg.sample_size}


def _text_fields(cfg: clip.CLIPTextConfig, *, bos: int, eos: int, pad: int) -> dict:
  return {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
          "num_attention_heads": cfg.num_attention_heads,
          "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": cfg.hidden_act,
          "layer_norm_eps": cfg.layer_norm_eps, "bos_token_id": bos, "eos_token_id": eos,
          "pad_token_id": pad, "model_type": "clip_text_model"}


def text_encoder_config(cfg: clip.CLIPTextConfig, *, bos: int, eos: int, pad: int) -> dict:
  """transformers' ``CLIPTextModel`` ``config.json``."""
  return {"architectures": ["CLIPTextModel"], **_text_fields(cfg, bos=bos, eos=eos, pad=pad)}


def clip_config(vision_cfg: clip.CLIPVisionConfig, text_cfg: clip.CLIPTextConfig, *,
                projection_dim: int, bos: int, eos: int, pad: int) -> dict:
  """transformers' ``CLIPModel`` ``config.json``: pooled at ``eos_token_id`` (not 2), as the
  tokenizer trained here ends every prompt with that token."""
  vision = {"image_size": vision_cfg.image_size, "patch_size": vision_cfg.patch_size,
            "hidden_size": vision_cfg.hidden_size,
            "intermediate_size": vision_cfg.intermediate_size,
            "num_hidden_layers": vision_cfg.num_hidden_layers,
            "num_attention_heads": vision_cfg.num_attention_heads,
            "hidden_act": vision_cfg.hidden_act, "layer_norm_eps": vision_cfg.layer_norm_eps,
            "num_channels": 3, "model_type": "clip_vision_model"}
  return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": projection_dim,
          "text_config": _text_fields(text_cfg, bos=bos, eos=eos, pad=pad),
          "vision_config": vision}


def write_model(folder, config: dict, params, *, filename: str = DIFFUSERS_FILE) -> None:
  """``folder/config.json`` and ``folder/filename``: ``params`` under PyTorch keys (float32)."""
  folder = epath.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  tensors = weights.torch_tensors(jax.device_get(params))
  save_file(tensors, str(folder / filename))


def write_atomically(out, fill: Callable[[epath.Path], Any]) -> epath.Path:
  """Calls ``fill(staging)`` on an empty folder beside ``out``, then renames it to ``out``
  (replacing an older ``out``)."""
  out = epath.Path(out)
  staging = out.parent / (out.name + ".tmp")
  if staging.exists():
    shutil.rmtree(str(staging))
  staging.mkdir(parents=True)
  fill(staging)
  if out.exists():
    shutil.rmtree(str(out))
  staging.rename(out)
  return out
