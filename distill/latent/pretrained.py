"""``load_pretrained(path)``: a diffusers-layout folder → Flax modules, parameters and helpers.

A Stable-Diffusion folder has ``model_index.json`` and one subfolder per part (``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``; a class-conditional LDM has
``vqvae/`` and ``class_embedder/`` instead of ``vae/``, ``text_encoder/``, ``tokenizer/``), each with its ``config.json`` (or
``scheduler_config.json``) and safetensors weights; a folder holding one part's ``config.json``
(e.g. an inpainting U-Net alone) loads that part. Each module is built from its config, so tiny
and full-size models come from the same code, and its parameters are filled by
``distill.latent.weights`` with full key coverage.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from distill import network
from distill.latent import clip, teacher, unet, vae, weights
from distill.latent import schedule as schedule_lib
from distill.latent import tokenizer as tokenizer_lib


def _config(folder: epath.Path, name: str = "config.json") -> dict:
  path = folder / name
  if not path.exists():
    raise FileNotFoundError(f"{folder}: no {name}; expected a diffusers-layout model folder.")
  return json.loads(path.read_text())


@functools.lru_cache(maxsize=32)
def _abstract_params(module, arg_specs: tuple) -> Any:
  """The parameters' shapes and dtypes of ``module`` (a hashable Flax module) initialised on
  arguments of ``arg_specs`` (``(shape, dtype)`` pairs): traced once per module and process, not
  once per load."""
  args = [jnp.zeros(shape, dtype) for shape, dtype in arg_specs]
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]


def _load_params(module, example_args, folder, what, variant, key_prefix: str = "", *,
                 shapes_only: bool = False):
  abstract = jax.tree.map(lambda leaf: leaf, _abstract_params(  # a copy of the cached tree
      module, tuple((tuple(a.shape), jnp.dtype(a.dtype)) for a in example_args)))
  if shapes_only:  # the parameters' shapes and dtypes: no weight file is read
    return abstract
  tensors = weights.read_safetensors(weights.safetensors_files(folder, variant))
  if key_prefix:
    tensors = {k if k.startswith(key_prefix) else key_prefix + k: v for k, v in tensors.items()}
  return weights.load_into(abstract, tensors, what=what)


def load_unet(folder, *, dtype=jnp.float32, remat: bool = False, variant: str | None = None,
              shapes_only: bool = False):
  """``(UNet2DConditionModel, params)`` from a diffusers ``unet/`` folder."""
  folder = epath.Path(folder)
  cfg = unet.UNetConfig.from_diffusers(_config(folder))
  module = unet.UNet2DConditionModel(cfg, dtype=dtype, remat=remat)
  size = 2 ** (len(cfg.block_out_channels) - 1)
  args = [jnp.zeros((1, size, size, cfg.in_channels)), jnp.zeros((1,)),
          jnp.zeros((1, 1, cfg.cross_attention_dim))]
  if cfg.time_cond_proj_dim is not None:
    args.append(jnp.zeros((1, cfg.time_cond_proj_dim)))
  return module, _load_params(module, args, folder, f"{folder.name}", variant,
                              shapes_only=shapes_only)


def load_vae(folder, *, dtype=jnp.float32, variant: str | None = None,
             shapes_only: bool = False):
  """``(AutoencoderKL, params)`` from a diffusers ``vae/`` folder."""
  folder = epath.Path(folder)
  cfg = vae.VAEConfig.from_diffusers(_config(folder))
  module = vae.AutoencoderKL(cfg, dtype=dtype)
  size = 2 ** (len(cfg.block_out_channels) - 1)
  args = [jnp.zeros((1, size, size, cfg.in_channels))]
  return module, _load_params(module, args, folder, f"{folder.name}", variant,
                              shapes_only=shapes_only)


def load_vqvae(folder, *, dtype=jnp.float32, variant: str | None = None,
               shapes_only: bool = False):
  """``(VQModel, params)`` from a diffusers ``vqvae/`` folder (LDM's VQ first stage)."""
  folder = epath.Path(folder)
  cfg = vae.VQConfig.from_diffusers(_config(folder))
  module = vae.VQModel(cfg, dtype=dtype)
  size = 2 ** (len(cfg.autoencoder.block_out_channels) - 1)
  args = [jnp.zeros((1, size, size, cfg.autoencoder.in_channels))]
  return module, _load_params(module, args, folder, f"{folder.name}", variant,
                              shapes_only=shapes_only)


def load_class_embedder(folder, *, variant: str | None = None, shapes_only: bool = False):
  """``(ClassEmbedder, params)`` from a ``class_embedder/`` folder: ``config.json`` with
  ``num_classes`` and ``embed_dim``, and ``embedding.weight`` in safetensors."""
  folder = epath.Path(folder)
  cfg = _config(folder)
  module = vae.ClassEmbedder(int(cfg["num_classes"]), int(cfg["embed_dim"]))
  return module, _load_params(module, [jnp.zeros((1,), jnp.int32)], folder, folder.name, variant,
                              shapes_only=shapes_only)


def load_text_encoder(folder, *, dtype=jnp.float32, variant: str | None = None,
                      shapes_only: bool = False):
  """``(CLIPTextTransformer, params)`` from a transformers ``text_encoder/`` folder."""
  folder = epath.Path(folder)
  cfg = clip.CLIPTextConfig.from_transformers(_config(folder))
  module = clip.CLIPTextTransformer(cfg, dtype=dtype)
  args = [jnp.zeros((1, cfg.max_position_embeddings), jnp.int32)]
  # transformers 5 saves CLIPTextModel keys without the ``text_model.`` prefix of SD 1.x files.
  return module, _load_params(module, args, folder, f"{folder.name}", variant,
                              key_prefix="text_model.", shapes_only=shapes_only)


@dataclasses.dataclass
class LatentModels:
  """The parts of a latent diffusion model that a folder provides (absent parts are ``None``)."""
  path: epath.Path
  unet: unet.UNet2DConditionModel | None = None
  unet_params: Any = None
  vae: vae.AutoencoderKL | None = None
  vae_params: Any = None
  text_encoder: clip.CLIPTextTransformer | None = None
  text_encoder_params: Any = None
  vqvae: vae.VQModel | None = None
  vqvae_params: Any = None
  class_embedder: vae.ClassEmbedder | None = None
  class_embedder_params: Any = None
  tokenizer: tokenizer_lib.CLIPTokenizer | None = None
  schedule: schedule_lib.DiscreteSchedule | None = None
  prediction_type: str | None = None

  def _need(self, part: str):
    if getattr(self, part) is None:
      raise ValueError(f"{self.path} has no {part}/ part.")

  def _first_stage(self):
    if self.vae is None and self.vqvae is None:
      raise ValueError(f"{self.path} has no vae/ or vqvae/ part.")
    return self.vae.config if self.vae is not None else self.vqvae.config.autoencoder

  def encode_prompt(self, prompts) -> jax.Array:
    """``[B, 77, D]``: CLIP ``last_hidden_state`` of the padded prompts (SD's context)."""
    self._need("tokenizer")
    self._need("text_encoder")
    return network.apply(self.text_encoder, self.text_encoder_params,
                         jnp.asarray(self.tokenizer(prompts)))

  def encode_image(self, images, rng=None) -> jax.Array:
    """NHWC images in [−1, 1] → ``scaling_factor``·latents: the KL encoder's mean (a draw if
    ``rng``), or a VQ first stage's pre-quantisation latents."""
    scale = self._first_stage().scaling_factor
    images = jnp.asarray(images, jnp.float32)
    if self.vae is None:
      return scale * network.apply(self.vqvae, self.vqvae_params, images, method="encode")
    mean, logvar = network.apply(self.vae, self.vae_params, images, method="encode")
    z = mean if rng is None else vae.sample_latents(mean, logvar, rng)
    return scale * z

  def decode_latents(self, latents) -> jax.Array:
    """Scaled latents → NHWC images (about [−1, 1]); a VQ first stage quantises first."""
    latents = jnp.asarray(latents, jnp.float32) / self._first_stage().scaling_factor
    if self.vae is None:
      return network.apply(self.vqvae, self.vqvae_params, latents, method="decode")
    return network.apply(self.vae, self.vae_params, latents, method="decode")

  def encode_class(self, labels) -> jax.Array:
    """Class labels → the one-token context ``[B, 1, D]`` of a class-conditional LDM."""
    self._need("class_embedder")
    return self.class_embedder.apply({"params": self.class_embedder_params},
                                     jnp.asarray(labels, jnp.int32))

  def unet_apply(self, latents, timesteps, context, **extra) -> jax.Array:
    """diffusers' ``UNet2DConditionModel(...).sample`` in NHWC; ``extra``: ``timestep_cond``."""
    self._need("unet")
    b = latents.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
    return network.apply(self.unet, self.unet_params, jnp.asarray(latents, jnp.float32), t,
                         jnp.asarray(context, jnp.float32), **extra)

  def denoise_fn(self, context, **extra):
    """Our ``denoise_fn(z, t) -> x̂`` for the U-Net teacher on the folder's schedule."""
    self._need("unet")
    self._need("schedule")
    return teacher.teacher_denoise_fn(lambda z, ts: self.unet_apply(z, ts, context, **extra),
                                      self.schedule, prediction_type=self.prediction_type)


_LOADERS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "VQModel": "vqvae",
            "CLIPTextModel": "text_encoder", "ClassEmbedder": "class_embedder"}


def load_pretrained(path, *, dtype=jnp.float32, remat: bool = False,
                    variant: str | None = None, shapes_only: bool = False) -> LatentModels:
  """Loads a diffusers-layout folder (see module docstring); ``variant`` picks e.g.
  ``*.fp16.safetensors`` files; ``dtype`` is the activation dtype of every module.
  ``shapes_only``: the parameters are ``jax.ShapeDtypeStruct`` leaves and no weight file is
  read (a folder of ``config.json`` files suffices), for building and lowering programs."""
  path = epath.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a folder; load_pretrained reads a diffusers-layout "
                            "model folder.")
  if (path / "model_index.json").exists():
    index = json.loads((path / "model_index.json").read_text())
    parts = {name: path / name for name, value in index.items()
             if isinstance(value, list) and value[0] is not None and (path / name).is_dir()}
  elif (path / "config.json").exists():
    kind = _LOADERS.get(_config(path).get("_class_name"))
    if kind is None and "text_config" not in _config(path) and "vocab_size" in _config(path):
      kind = "text_encoder"
    if kind is None:
      raise ValueError(f"{path}/config.json: _class_name "
                       f"{_config(path).get('_class_name')!r} is not one of {sorted(_LOADERS)}.")
    parts = {kind: path}
  else:
    raise FileNotFoundError(f"{path}: neither model_index.json nor config.json; expected a "
                            "diffusers-layout folder.")
  out = LatentModels(path=path)
  if "unet" in parts:
    out.unet, out.unet_params = load_unet(parts["unet"], dtype=dtype, remat=remat,
                                          variant=variant, shapes_only=shapes_only)
  if "vae" in parts:
    out.vae, out.vae_params = load_vae(parts["vae"], dtype=dtype, variant=variant,
                                       shapes_only=shapes_only)
  if "vqvae" in parts:
    out.vqvae, out.vqvae_params = load_vqvae(parts["vqvae"], dtype=dtype, variant=variant,
                                             shapes_only=shapes_only)
  if "class_embedder" in parts:
    out.class_embedder, out.class_embedder_params = load_class_embedder(
        parts["class_embedder"], variant=variant, shapes_only=shapes_only)
  if "text_encoder" in parts:
    out.text_encoder, out.text_encoder_params = load_text_encoder(
        parts["text_encoder"], dtype=dtype, variant=variant, shapes_only=shapes_only)
  if "tokenizer" in parts:
    # Prompts are padded to the text encoder's positions (77 in Stable Diffusion).
    length = (out.text_encoder.config.max_position_embeddings if out.text_encoder is not None
              else 77)
    out.tokenizer = tokenizer_lib.CLIPTokenizer(parts["tokenizer"], length)
  if "scheduler" in parts:
    sched_cfg = _config(parts["scheduler"], "scheduler_config.json")
    out.schedule = schedule_lib.DiscreteSchedule.from_config(sched_cfg)
    out.prediction_type = teacher.check_prediction_type(
        sched_cfg.get("prediction_type", "epsilon"))
  return out


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
