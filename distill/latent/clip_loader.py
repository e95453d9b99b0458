"""Whole CLIP models (both towers and their projections) from transformers or OpenCLIP files.

A CLIP folder is one of:

* **transformers** (``CLIPModel.save_pretrained``, OpenAI's ``openai/clip-vit-*`` repositories):
  ``config.json`` with ``text_config``, ``vision_config`` and ``projection_dim``, the weights in
  ``model.safetensors``, the tokenizer files beside them (``tokenizer.json``, or ``vocab.json`` and
  ``merges.txt``), and optionally ``preprocessor_config.json`` (``image_mean``, ``image_std``);
* **OpenCLIP** (``laion/CLIP-ViT-*`` repositories, e.g. the paper's ViT-g/14):
  ``open_clip_config.json`` (``model_cfg`` with ``embed_dim``, ``vision_cfg``, ``text_cfg``,
  ``quick_gelu``; ``preprocess_cfg`` with ``mean`` and ``std``), the weights in
  ``open_clip_model.safetensors``, and the same tokenizer files.

Safetensors only: a pickled ``.bin``/``.pt`` is refused. OpenCLIP's keys are renamed to
transformers' (``openclip_to_transformers``): ``attn.in_proj_weight`` splits into the q, k and v
projections; ``visual.proj`` and ``text_projection`` (used as ``x @ P``) become the projections'
Linear weights ``Pᵀ``. OpenCLIP and OpenAI's CLIP pool the text at the largest token id (the end
token); transformers configs with ``eos_token_id = 2`` do the same, later ones at the first
``eos_token_id``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from distill.latent import clip, weights
from distill.latent import tokenizer as tokenizer_lib

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
OPENCLIP_FILE = "open_clip_model.safetensors"


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: the key of its jitted fns
class CLIPModel:
  """A loaded CLIP: ``vision(pixels) -> image_embeds`` and ``text(ids) -> text_embeds``."""
  name: str
  vision: clip.CLIPVisionModelWithProjection
  vision_params: Any
  text: clip.CLIPTextModelWithProjection
  text_params: Any
  tokenizer: tokenizer_lib.CLIPTokenizer
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  @property
  def image_size(self) -> int:
    return self.vision.config.image_size


_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OTHERS = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}


def openclip_to_transformers(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """OpenCLIP (and OpenAI ``clip``) state-dict keys → transformers' ``CLIPModel`` keys."""
  out = {}
  for key, value in tensors.items():
    if key in ("visual.proj", "text_projection"):
      out["visual_projection.weight" if key == "visual.proj" else "text_projection.weight"] = \
          np.ascontiguousarray(value.T)
      continue
    if key in _OTHERS:
      out[_OTHERS[key]] = value
      continue
    m = _BLOCK.match(key)
    if not m:
      raise weights.WeightsError(f"OpenCLIP weights: unexpected tensor {key} "
                                 f"{tuple(value.shape)} (a transformer-tower CLIP is expected).")
    tower = "vision_model" if m.group(1) else "text_model"
    prefix, rest = f"{tower}.encoder.layers.{m.group(2)}", m.group(3)
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
      kind = rest.rsplit("_", 1)[1]
      for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
        out[f"{prefix}.self_attn.{name}.{kind}"] = np.ascontiguousarray(part)
      continue
    module, _, leaf = rest.rpartition(".")
    if module not in _BLOCK_PARTS:
      raise weights.WeightsError(f"OpenCLIP weights: unexpected tensor {key}.")
    out[f"{prefix}.{_BLOCK_PARTS[module]}.{leaf}"] = value
  return out


def _configs_from_openclip(model_cfg: dict):
  vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
  act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
  width = int(vision["width"])
  vision_config = clip.CLIPVisionConfig(
      image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]),
      hidden_size=width, intermediate_size=int(width * float(vision.get("mlp_ratio", 4.0))),
      num_hidden_layers=int(vision["layers"]),
      num_attention_heads=width // int(vision.get("head_width", 64)), hidden_act=act)
  text_width = int(text.get("width", 512))
  text_config = clip.CLIPTextConfig(
      vocab_size=int(text.get("vocab_size", 49408)), hidden_size=text_width,
      intermediate_size=int(text_width * float(text.get("mlp_ratio", 4.0))),
      num_hidden_layers=int(text.get("layers", 12)), num_attention_heads=int(text.get("heads", 8)),
      max_position_embeddings=int(text.get("context_length", 77)), hidden_act=act)
  return vision_config, text_config, int(model_cfg["embed_dim"]), None


def _configs_from_transformers(config: dict):
  if "vision_config" not in config or "text_config" not in config:
    raise ValueError("config.json: a CLIP model config needs text_config and vision_config.")
  vision_config = clip.CLIPVisionConfig.from_transformers(config["vision_config"])
  text_config = clip.CLIPTextConfig.from_transformers(config["text_config"])
  eos = config["text_config"].get("eos_token_id", 2)
  return vision_config, text_config, int(config.get("projection_dim", 512)), \
      (None if eos == 2 else int(eos))


def towers(vision_config, text_config, projection_dim: int, eos_token_id, *, dtype=jnp.float32):
  """The two towers and their parameters' shapes (nothing allocated)."""
  vision = clip.CLIPVisionModelWithProjection(vision_config, projection_dim, dtype=dtype)
  text = clip.CLIPTextModelWithProjection(text_config, projection_dim, eos_token_id, dtype=dtype)
  size = vision_config.image_size
  v_abstract = jax.eval_shape(lambda: vision.init(jax.random.key(0),
                                                  jnp.zeros((1, size, size, 3))))["params"]
  t_abstract = jax.eval_shape(lambda: text.init(
      jax.random.key(0), jnp.zeros((1, text_config.max_position_embeddings), jnp.int32)))["params"]
  return vision, v_abstract, text, t_abstract


def openclip_towers(model_cfg: dict):
  """``towers`` of an OpenCLIP ``model_cfg`` (its ``open_clip_config.json``)."""
  return towers(*_configs_from_openclip(model_cfg))


def _split(tensors: dict, prefixes) -> dict:
  return {k: v for k, v in tensors.items() if k.startswith(prefixes)}


def load(path, *, dtype=jnp.float32) -> CLIPModel:
  """A CLIP folder (module docstring) → ``CLIPModel``; one-line errors for what is missing."""
  folder = epath.Path(path)
  if not folder.is_dir():
    raise ValueError(f"CLIP model {path}: not a folder (a transformers CLIPModel folder or an "
                     "OpenCLIP one with open_clip_config.json).")
  mean, std = OPENAI_MEAN, OPENAI_STD
  if (folder / "open_clip_config.json").exists():
    meta = json.loads((folder / "open_clip_config.json").read_text())
    vision_config, text_config, dim, eos = _configs_from_openclip(meta["model_cfg"])
    pre = meta.get("preprocess_cfg", {})
    mean, std = tuple(pre.get("mean", mean)), tuple(pre.get("std", std))
    if not (folder / OPENCLIP_FILE).exists():
      raise ValueError(f"CLIP model {path}: no {OPENCLIP_FILE} (only safetensors are read; "
                       "convert a .bin with safetensors' save_file).")
    tensors = openclip_to_transformers(weights.read_safetensors([folder / OPENCLIP_FILE]))
  elif (folder / "config.json").exists():
    vision_config, text_config, dim, eos = _configs_from_transformers(
        json.loads((folder / "config.json").read_text()))
    if (folder / "preprocessor_config.json").exists():
      pre = json.loads((folder / "preprocessor_config.json").read_text())
      mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
    tensors = weights.read_safetensors(weights.safetensors_files(folder))
  else:
    raise ValueError(f"CLIP model {path}: no config.json or open_clip_config.json.")
  vision, v_abstract, text, t_abstract = towers(vision_config, text_config, dim, eos,
                                                dtype=dtype)
  used = ("vision_model.", "visual_projection.", "text_model.", "text_projection.", "logit_scale")
  unused = [k for k in tensors if not k.startswith(used) and k not in weights.IGNORED]
  if unused:
    raise weights.WeightsError(f"CLIP model {path}: unexpected tensor {unused[0]}.")
  return CLIPModel(
      name=folder.name, vision=vision, text=text,
      vision_params=weights.load_into(
          v_abstract, _split(tensors, ("vision_model.", "visual_projection.")),
          what=f"{folder.name} (vision)"),
      text_params=weights.load_into(
          t_abstract, _split(tensors, ("text_model.", "text_projection.")),
          what=f"{folder.name} (text)"),
      tokenizer=tokenizer_lib.CLIPTokenizer(folder, text_config.max_position_embeddings),
      mean=mean, std=std)
