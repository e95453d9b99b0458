"""PyTorch-layout safetensors → Flax parameter trees, with full key coverage.

Safetensors only: a pickled checkpoint (``.bin``, ``.ckpt``, ``.pt``) is never unpickled here.
A file key ``a.b.0.c.weight`` names the Flax leaf whose module path, joined with ``_``, is
``a_b_0_c`` (our modules are named after diffusers'/transformers' paths) and whose parameter is
``kernel``, ``scale`` or ``embedding`` (``bias`` for ``bias``); a bare tensor ``a.b.name`` (CLIP's
``class_embedding``, ``logit_scale``) the Flax leaf ``name`` of module ``a_b``. Layout rules (PyTorch → Flax):
Conv2d ``(O, I, kH, kW)`` → ``(kH, kW, I, O)``; Linear ``(out, in)`` → ``(in, out)``; a 1×1 conv
weight loads into a Linear (old VAE attention); norms and embeddings as they are. Every Flax leaf
must be filled and every file tensor used (``IGNORED`` lists the deliberate exceptions); any
mismatch is one error naming the key and both shapes. bf16/fp16 files load as float32.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from safetensors import safe_open

from distill import files as distill_files

# Buffers some files carry that are not parameters.
IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# Pre-0.14 diffusers attention names (SD 1.x VAE files) → current names.
_OLD_ATTENTION = re.compile(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_OLD_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_PICKLES = (".bin", ".ckpt", ".pt", ".pth")
_PREFERRED = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class WeightsError(ValueError):
  """A weight file that does not fit the model built from its config."""


def rename_old_keys(key: str) -> str:
  m = _OLD_ATTENTION.search(key)
  if not m:
    return key
  return key[:m.start()] + f"{m.group(1)}.{_OLD_NAMES[m.group(2)]}.{m.group(3)}"


def safetensors_files(folder, variant: str | None = None) -> list[epath.Path]:
  """The safetensors file(s) of one model folder (sharded files through their index)."""
  folder = epath.Path(folder)
  suffix = f".{variant}.safetensors" if variant else ".safetensors"
  indices = sorted(folder.glob(f"*{suffix}.index.json"))
  if indices:
    shards = sorted(set(json.loads(indices[0].read_text())["weight_map"].values()))
    return [folder / s for s in shards]
  names = [p.name for p in folder.glob(f"*{suffix}")]
  if not variant:
    names = [n for n in names if n.count(".") == 1]
  for preferred in _PREFERRED:
    if not variant and preferred in names:
      return [folder / preferred]
  if len(names) == 1:
    return [folder / names[0]]
  pickles = sorted(p.name for p in folder.glob("*") if p.suffix in _PICKLES)
  if not names and pickles:
    raise WeightsError(f"{folder}: only pickled weights ({', '.join(pickles)}); they are not "
                       "unpickled here. Convert them to safetensors (docs/latent.md, "
                       "'CompVis checkpoints').")
  raise WeightsError(f"{folder}: expected one *{suffix} weight file, found "
                     f"{sorted(names) or 'none'}.")


def read_safetensors(files) -> dict[str, np.ndarray]:
  """All tensors of the files as float32 NumPy arrays (bf16 read through the Flax backend)."""
  tensors = {}
  for path in files:
    mine = {}
    with distill_files.safetensors_errors(path), safe_open(str(path), framework="flax") as f:
      for key in f.keys():
        value = f.get_tensor(key)
        if jnp.issubdtype(value.dtype, jnp.floating):
          value = value.astype(jnp.float32)
        mine[key] = np.asarray(value)
    distill_files.check_finite(mine, what=str(path))
    tensors.update(mine)
  return tensors


def _canonical_flax(params) -> dict[tuple[str, str], tuple]:
  """``(module path joined by _, torch parameter name) -> Flax path``."""
  out = {}
  for path in traverse_util.flatten_dict(params):
    leaf = path[-1]
    torch_name = ("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
    key = ("_".join(path[:-1]), torch_name)
    if key in out:
      raise WeightsError(f"ambiguous parameter names {out[key]} and {path}")
    out[key] = path
  return out


def _leaf_path(canon, key: str):
  """The Flax path a file key ``a.b.0.c.weight`` fills (old attention names renamed), or None."""
  parts = rename_old_keys(key).split(".")
  return canon.get(("_".join(parts[:-1]), parts[-1]))


def _to_flax(key: str, value: np.ndarray, leaf: str, target_shape) -> np.ndarray:
  if leaf == "kernel":
    if len(target_shape) == 4 and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif len(target_shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
      value = value[:, :, 0, 0].T
    elif len(target_shape) == 2 and value.ndim == 2:
      value = value.T
  if tuple(value.shape) != tuple(target_shape):
    raise WeightsError(f"{key}: the file's tensor has shape {tuple(value.shape)} (as Flax "
                       f"{leaf}), the model built from config.json expects {tuple(target_shape)}.")
  return value


def load_into(abstract_params: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
              what: str = "model") -> dict:
  """Fills a Flax parameter tree (shapes from ``jax.eval_shape``) from PyTorch-named tensors.

  ``what`` names the part in errors. Raises ``WeightsError`` on a missing, unexpected or
  mis-shaped tensor.
  """
  canon = _canonical_flax(abstract_params)
  targets = traverse_util.flatten_dict(abstract_params)
  filled = {}
  for key in sorted(tensors):
    if key in IGNORED:
      continue
    path = _leaf_path(canon, key)
    if path is None:
      raise WeightsError(f"{what}: unexpected tensor {key} {tuple(tensors[key].shape)}: no "
                         "parameter of the model built from config.json takes it.")
    if path in filled:
      raise WeightsError(f"{what}: {key} fills {'/'.join(path)} a second time.")
    filled[path] = jnp.asarray(_to_flax(f"{what}: {key}", tensors[key], path[-1],
                                        targets[path].shape), jnp.float32)
  missing = [p for p in targets if p not in filled]
  if missing:
    raise WeightsError(f"{what}: {len(missing)} parameter(s) missing from the file, first "
                       f"{'/'.join(missing[0])} {tuple(targets[missing[0]].shape)}.")
  return traverse_util.unflatten_dict(filled)


def _to_torch(value: np.ndarray, leaf: str, file_shape) -> np.ndarray:
  """Inverse of ``_to_flax``: a Flax leaf back to the layout of the file's tensor."""
  value = np.asarray(value, np.float32)
  if leaf == "kernel":
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)
    elif value.ndim == 2 and len(file_shape) == 4:
      value = value.T[:, :, None, None]
    elif value.ndim == 2:
      value = value.T
  return value


def export_like(params: Mapping[str, Any], files, *, what: str = "model",
                key_prefix: str = "") -> dict[str, np.ndarray]:
  """``params`` (a tree ``load_into`` filled from ``files``) as float32 tensors under the files'
  own keys and layouts, so the result can replace those files: what ``load_into`` did, undone.
  Ignored buffers (``IGNORED``) are copied from the files; ``key_prefix`` as when loading (file
  keys without it are looked up with it, e.g. ``text_model.`` for transformers 5 CLIP files)."""
  canon = _canonical_flax(params)
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path in files:
    with safe_open(str(path), framework="numpy") as f:
      for key in f.keys():
        shape = tuple(f.get_slice(key).get_shape())
        name = key if not key_prefix or key.startswith(key_prefix) else key_prefix + key
        if name in IGNORED:
          out[key] = f.get_tensor(key)
          continue
        leaf_path = _leaf_path(canon, name)
        if leaf_path is None:
          raise WeightsError(f"{what}: {key} of {path} has no parameter in the tree.")
        value = _to_torch(np.asarray(flat[leaf_path]), leaf_path[-1], shape)
        if value.shape != shape:
          raise WeightsError(f"{what}: {key}: parameter {'/'.join(leaf_path)} has shape "
                             f"{value.shape} in the file's layout, the file {shape}.")
        out[key] = value
  return out


# The segments of diffusers' and transformers' parameter names that hold an underscore or that
# follow one in our Flax module names (which join a PyTorch path with ``_``).
_SEGMENTS = frozenset("""
    down_blocks up_blocks mid_block resnets attentions transformer_blocks downsamplers upsamplers
    conv conv1 conv2 conv_in conv_out conv_norm_out conv_shortcut norm norm1 norm2 norm3
    time_emb_proj time_embedding linear_1 linear_2 cond_proj proj_in proj_out attn1 attn2 ff net
    proj to_q to_k to_v to_out group_norm encoder decoder quant_conv post_quant_conv quantize
    embedding text_model vision_model embeddings token_embedding position_embedding
    patch_embedding class_embedding layers self_attn q_proj k_proj v_proj out_proj mlp fc1 fc2
    layer_norm1 layer_norm2 final_layer_norm pre_layrnorm post_layernorm text_projection
    visual_projection logit_scale
""".split())
_LONGEST = max(s.count("_") + 1 for s in _SEGMENTS)


def torch_name(flax_path: tuple[str, ...]) -> str:
  """A Flax leaf path → the PyTorch key it is loaded from (``load_into``'s naming, undone):
  module names split into diffusers'/transformers' segments (``mid_block_attentions_0`` →
  ``mid_block.attentions.0``), ``kernel``/``scale``/``embedding`` → ``weight``."""
  *modules, leaf = flax_path
  words = "_".join(modules).split("_") if modules else []
  out, i = [], 0
  while i < len(words):
    if words[i].isdigit():
      out.append(words[i])
      i += 1
      continue
    for n in range(min(_LONGEST, len(words) - i), 0, -1):  # the longest known segment
      candidate = "_".join(words[i:i + n])
      if candidate in _SEGMENTS:
        out.append(candidate)
        i += n
        break
    else:
      raise WeightsError(f"{'/'.join(flax_path)}: no known PyTorch name for "
                         f"{'_'.join(words[i:])!r}.")
  out.append("weight" if leaf in ("kernel", "scale", "embedding") else leaf)
  return ".".join(out)


def torch_tensors(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``params`` as float32 PyTorch-layout tensors under diffusers'/transformers' keys, for a
  model trained here (``export_like`` rewrites a file that was read). Our modules are laid out
  as PyTorch's (a 1×1 convolution there is one here), so the layout follows from the leaf."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    key = torch_name(path)
    if key in out:
      raise WeightsError(f"{key} comes from two parameters.")
    out[key] = np.array(_to_torch(np.asarray(value), path[-1], ()), order="C")  # 0-d kept
  return out
