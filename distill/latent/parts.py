"""The parts of a text-to-image teacher trained here, before the teacher: the ``autoencoder``,
the ``clip`` that conditions the teacher, and the ``clip_eval`` that scores it.

A config with an ``autoencoder`` section (``configs/emoji.py``) begins its chain with these links
(``layout.trains_parts``). Each trains with the one loop of ``distill/train.py``; only the
objective differs:

* ``autoencoder``: our ``AutoencoderKL`` on the training images; per example the squared error
  of the reconstruction from a posterior draw plus ``kl_weight`` times the KL divergence from
  N(0, I), both as means over elements (``autoencoder_objective``).
* ``clip`` and ``clip_eval``: our CLIP towers with a learned temperature, trained contrastively on
  the image–caption pairs of the training split (CLIP's symmetric cross-entropy over the batch,
  ``clip_objective``), with a BPE tokenizer learnt from the training captions first
  (``tokenizer.train_bpe``). ``clip_eval`` is the same recipe with another seed (its link's own
  initialisation and data order): the eval stage's CLIP score and CLIP features come from it,
  never from the model that conditions the teacher.

A finished part is written in the diffusers / transformers folder layout (``write_part``): the
autoencoder as ``autoencoder/vae/`` with ``scaling_factor = 1/std`` of its latents on training
images (Stable Diffusion's recipe) and its held-out PSNR in ``autoencoder/metrics.json``; each
CLIP as a transformers ``CLIPModel`` folder, ``clip/model/``, with its tokenizer. ``assemble``
then writes ``parts/``, the teacher's diffusers-layout folder: the VAE, the conditioning CLIP's
text tower as ``text_encoder/`` with ``tokenizer/``, the ``scheduler/`` of ``latent.scheduler``
(its ``prediction_type`` says what the teacher's network predicts, ε by default), and ``unet/``
(``latent.unet``) at its initialisation. The latent family reads that folder as
``teacher.pretrained`` (``layout.fill_trained_parts``) and the teacher trains from it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from safetensors.numpy import load_file, save_file

from distill import files, input_pipeline, network
from distill.latent import clip, clip_loader, export, unet, vae
from distill.latent import tokenizer as tokenizer_lib

PARTS_DIR = "parts"
TOKENIZER_DIR = "tokenizer"
VAE_DIR = "vae"
CLIP_DIR = "model"
MAX_LOGIT_SCALE = float(np.log(100.0))  # CLIP clips its temperature at 100
_SCALING_IMAGES = 512


# --- configs -----------------------------------------------------------------------------------

def vae_config(config) -> vae.VAEConfig:
  m = config.autoencoder.model
  return vae.VAEConfig(in_channels=3, out_channels=3, latent_channels=int(m.latent_channels),
                       block_out_channels=tuple(int(c) for c in m.block_out_channels),
                       layers_per_block=int(m.layers_per_block),
                       norm_num_groups=int(m.norm_num_groups), scaling_factor=1.0,
                       sample_size=int(config.data.image_size))


def clip_configs(config, vocab_size: int) -> tuple[clip.CLIPVisionConfig, clip.CLIPTextConfig]:
  c = config.clip
  vision = clip.CLIPVisionConfig(
      image_size=int(config.data.image_size), patch_size=int(c.vision.patch_size),
      hidden_size=int(c.vision.hidden_size), intermediate_size=int(c.vision.intermediate_size),
      num_hidden_layers=int(c.vision.num_hidden_layers),
      num_attention_heads=int(c.vision.num_attention_heads))
  text = clip.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=int(c.text.hidden_size),
      intermediate_size=int(c.text.intermediate_size),
      num_hidden_layers=int(c.text.num_hidden_layers),
      num_attention_heads=int(c.text.num_attention_heads),
      max_position_embeddings=int(c.max_length))
  return vision, text


def unet_config(config) -> unet.UNetConfig:
  """``latent.unet`` (diffusers' field names) with the autoencoder's latent channels (their
  ``2·C + 1`` inputs with ``latent.inpainting``) and the CLIP text width as its
  cross-attention width."""
  fields = dict(config.latent.unet.to_dict())
  channels = int(config.autoencoder.model.latent_channels)
  fields.update(in_channels=2 * channels + 1 if config.latent.get("inpainting") else channels,
                out_channels=int(config.autoencoder.model.latent_channels),
                cross_attention_dim=int(config.clip.text.hidden_size),
                sample_size=int(config.data.image_size) // 2 ** (
                    len(config.autoencoder.model.block_out_channels) - 1))
  return unet.UNetConfig.from_diffusers(fields)


# --- the tokenizer -----------------------------------------------------------------------------

def train_captions(config) -> list[str]:
  return list(input_pipeline.source(config.data, "train").captions)


def tokenizer_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / TOKENIZER_DIR


def ensure_tokenizer(config, workdir) -> tokenizer_lib.CLIPTokenizer:
  """The BPE tokenizer of the training captions, learnt once into ``workdir/tokenizer``."""
  folder = tokenizer_dir(workdir)
  if not (folder / "tokenizer.json").exists():
    if jax.process_index() == 0:
      tok = tokenizer_lib.train_bpe(train_captions(config), int(config.clip.vocab_size))
      export.write_atomically(folder, lambda d: tokenizer_lib.save(
          tok, d, max_length=int(config.clip.max_length)))
    sync("tokenizer")
  return tokenizer_lib.CLIPTokenizer(folder, int(config.clip.max_length))


def sync(name: str) -> None:
  """Every process waits here for the others (for a folder process 0 has just written)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(f"parts:{name}")


# --- the networks and their objectives ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClipNets:
  vision: clip.CLIPVisionModelWithProjection
  text: clip.CLIPTextModelWithProjection
  eos_token_id: int


def clip_nets(config, tok: tokenizer_lib.CLIPTokenizer) -> ClipNets:
  vision_cfg, text_cfg = clip_configs(config, tok.vocab_size)
  dim = int(config.clip.projection_dim)
  return ClipNets(vision=clip.CLIPVisionModelWithProjection(vision_cfg, dim),
                  text=clip.CLIPTextModelWithProjection(text_cfg, dim, tok.eos_id),
                  eos_token_id=tok.eos_id)


def init_autoencoder(config, rng):
  size = int(config.data.image_size)
  return vae.AutoencoderKL(vae_config(config)).init(rng, jnp.zeros((1, size, size, 3)))["params"]


def init_clip(nets: ClipNets, rng):
  k_v, k_t = jax.random.split(rng)
  size, length = nets.vision.config.image_size, nets.text.config.max_position_embeddings
  return {"vision": nets.vision.init(k_v, jnp.zeros((1, size, size, 3)))["params"],
          "text": nets.text.init(k_t, jnp.zeros((1, length), jnp.int32))["params"],
          # CLIP's initial temperature 1/0.07
          "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}


def kl_to_standard_normal(mean, logvar):
  """Per-example mean over elements of KL(N(mean, exp(logvar)) ‖ N(0, 1))."""
  kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
  return jnp.mean(kl, axis=tuple(range(1, kl.ndim)))


def autoencoder_objective(config):
  """``(params, frozen, batch, key) -> (loss, metrics)``: reconstruction from a posterior draw
  plus ``autoencoder.kl_weight``·KL, per example as means over elements."""
  model = vae.AutoencoderKL(vae_config(config))
  kl_weight = float(config.autoencoder.kl_weight)

  def objective(params, frozen, batch, key):
    del frozen
    x = batch["image"]
    mean, logvar = model.apply({"params": params}, x, method=vae.AutoencoderKL.encode)
    z = vae.sample_latents(mean, logvar, key)
    recon = model.apply({"params": params}, z, method=vae.AutoencoderKL.decode)
    mse = jnp.mean(jnp.square(recon - x), axis=(1, 2, 3))
    kl = kl_to_standard_normal(mean, logvar)
    loss = jnp.mean(mse + kl_weight * kl)
    return loss, {"mse": jnp.mean(mse), "kl": jnp.mean(kl)}
  return objective


def clip_pixels(images):
  """Images in [−1, 1] → the CLIP's input, normalised with OpenAI's mean and std (what the
  exported folder's ``preprocessor_config.json`` says)."""
  mean = jnp.asarray(clip_loader.OPENAI_MEAN, jnp.float32)
  std = jnp.asarray(clip_loader.OPENAI_STD, jnp.float32)
  return ((images + 1.0) / 2.0 - mean) / std


def contrastive_loss(image_embeds, text_embeds, logit_scale):
  """CLIP's loss: the cross-entropy of ``exp(logit_scale)·cos`` between every image and every
  caption of the batch, image → text and text → image, averaged; pair i is the right answer of
  row and column i. ``logit_scale`` is clipped at log 100. Returns ``(loss, accuracy)``."""
  img = image_embeds / jnp.linalg.norm(image_embeds, axis=-1, keepdims=True)
  txt = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)
  logits = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE)) * img @ txt.T
  labels = jnp.arange(logits.shape[0])
  loss_i = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  loss_t = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return 0.5 * (jnp.mean(loss_i) + jnp.mean(loss_t)), jnp.mean(jnp.argmax(logits, 1) == labels)


def clip_objective(nets: ClipNets):
  """``contrastive_loss`` of the two towers on a batch of ``{"image", "ids"}``."""

  def objective(params, frozen, batch, key):
    del frozen, key
    img = nets.vision.apply({"params": params["vision"]}, clip_pixels(batch["image"]))
    txt = nets.text.apply({"params": params["text"]}, batch["ids"])
    loss, accuracy = contrastive_loss(img, txt, params["logit_scale"])
    return loss, {"accuracy": accuracy,
                  "temperature": jnp.exp(jnp.minimum(params["logit_scale"], MAX_LOGIT_SCALE))}
  return objective


# --- the links ---------------------------------------------------------------------------------

def link_parts(config, workdir, name: str):
  """``(objective, init_params(rng), prepare(batches))`` of the part link ``name``."""
  if name == "autoencoder":
    return (autoencoder_objective(config), jax.jit(lambda rng: init_autoencoder(config, rng)),
            lambda batches: batches.map(lambda b: {"image": b["image"]}))
  tok = ensure_tokenizer(config, workdir)
  nets = clip_nets(config, tok)

  def prepare(batches):
    return batches.map(lambda b: {"image": b["image"],
                                  "ids": tok([str(c) for c in b["caption"]])})
  return clip_objective(nets), jax.jit(lambda rng: init_clip(nets, rng)), prepare


def export_dir(workdir, name: str) -> epath.Path:
  return epath.Path(workdir) / name / (VAE_DIR if name == "autoencoder" else CLIP_DIR)


def is_exported(workdir, name: str) -> bool:
  return (export_dir(workdir, name) / "config.json").exists()


def write_part(config, workdir, name: str, params) -> epath.Path:
  """Writes a finished part's folder (module docstring); returns it."""
  params = jax.device_get(params)
  if name == "autoencoder":
    return _export_autoencoder(config, workdir, params)
  tok = ensure_tokenizer(config, workdir)
  nets = clip_nets(config, tok)
  vision_cfg, text_cfg = nets.vision.config, nets.text.config

  def fill(folder):
    tensors_params = {**params["vision"], **params["text"]}
    ids = dict(bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id)
    export.write_model(folder, export.clip_config(
        vision_cfg, text_cfg, projection_dim=int(config.clip.projection_dim), **ids),
                       {**tensors_params, "logit_scale": params["logit_scale"]},
                       filename=export.TRANSFORMERS_FILE)
    tokenizer_lib.copy_files(tokenizer_dir(workdir), folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(clip_loader.OPENAI_MEAN), "image_std": list(clip_loader.OPENAI_STD),
         "crop_size": vision_cfg.image_size, "size": vision_cfg.image_size}, indent=2))
  return export.write_atomically(export_dir(workdir, name), fill)


def _export_autoencoder(config, workdir, params) -> epath.Path:
  cfg = vae_config(config)
  model = vae.AutoencoderKL(cfg)
  encode = lambda p, x: network.apply(model, p, x, method="encode")[0]
  decode = functools.partial(network.apply, model, method="decode")
  train = input_pipeline.source(config.data, "train")
  images = np.stack([train[i]["image"] for i in range(min(_SCALING_IMAGES, len(train)))])
  latents = np.concatenate([np.asarray(encode(params, images[i:i + 128]))
                            for i in range(0, len(images), 128)])
  scaling = float(1.0 / np.std(latents))
  held = input_pipeline.source(config.data, "held_out")
  held_images = np.stack([held[i]["image"] for i in range(min(_SCALING_IMAGES, len(held)))])
  recon = np.concatenate([np.asarray(decode(params, encode(params, held_images[i:i + 128])))
                          for i in range(0, len(held_images), 128)])
  psnr = psnr_of(held_images, recon)
  out = export_dir(workdir, "autoencoder")
  # The metrics first: the folder, once there, marks the part as written.
  files.write_atomic(out.parent / "metrics.json", json.dumps(
      {"psnr_held_out": psnr, "held_out_images": len(held_images), "scaling_factor": scaling},
      indent=2))
  export.write_atomically(out, lambda folder: export.write_model(
      folder, export.vae_config(dataclasses.replace(cfg, scaling_factor=scaling)), params))
  logging.info("autoencoder: held-out PSNR %.2f dB over %d images, scaling_factor %.4f", psnr,
               len(held_images), scaling)
  return out


def psnr_of(images, recon) -> float:
  """PSNR in dB of images in [−1, 1] (peak-to-peak 2), averaged over images."""
  x = np.clip((np.asarray(images) + 1) / 2, 0, 1)
  y = np.clip((np.asarray(recon) + 1) / 2, 0, 1)
  mse = np.mean(np.square(x - y), axis=tuple(range(1, x.ndim)))
  return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


# --- the teacher's folder ----------------------------------------------------------------------

def parts_dir(workdir) -> epath.Path:
  return epath.Path(workdir) / PARTS_DIR


def teacher_prediction_type(config) -> str:
  """``latent.scheduler.prediction_type`` (default ``"epsilon"``, Stable Diffusion's): what the
  teacher trained here predicts, written to its folder's scheduler."""
  return config.latent.scheduler.get("prediction_type", "epsilon")


def scheduler_config(config) -> dict:
  return {"_class_name": "DDIMScheduler", **config.latent.scheduler.to_dict(),
          "prediction_type": teacher_prediction_type(config), "clip_sample": False,
          "set_alpha_to_one": False, "steps_offset": 1}


def assemble(config, workdir, unet_rng) -> epath.Path:
  """Writes ``parts/`` (module docstring) from the finished ``autoencoder`` and ``clip``."""
  workdir = epath.Path(workdir)
  cfg = unet_config(config)
  net = unet.UNet2DConditionModel(cfg)
  size = cfg.sample_size
  unet_params = jax.jit(lambda rng: net.init(
      rng, jnp.zeros((1, size, size, cfg.in_channels)), jnp.zeros((1,)),
      jnp.zeros((1, 1, cfg.cross_attention_dim)))["params"])(unet_rng)
  clip_folder = export_dir(workdir, "clip")
  clip_json = json.loads((clip_folder / "config.json").read_text())
  tensors = load_file(str(clip_folder / export.TRANSFORMERS_FILE))

  def fill(folder):
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": ("StableDiffusionInpaintPipeline" if config.latent.get("inpainting")
                        else "StableDiffusionPipeline"), "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers",
                                                                      "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None]}, indent=2))
    shutil.copytree(str(export_dir(workdir, "autoencoder")), str(folder / "vae"))
    text = folder / "text_encoder"
    text.mkdir()
    (text / "config.json").write_text(json.dumps(
        {"architectures": ["CLIPTextModel"], **clip_json["text_config"]}, indent=2))
    save_file({k: v for k, v in tensors.items() if k.startswith("text_model.")},
              str(text / export.TRANSFORMERS_FILE))
    tokenizer_lib.copy_files(tokenizer_dir(workdir), folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler_config(config), indent=2))
    export.write_model(folder / "unet", export.unet_config(cfg), unet_params)
  return export.write_atomically(parts_dir(workdir), fill)


def abstract_params(config, workdir, name: str):
  """Shapes of a part link's parameters (to read its checkpoint)."""
  _, init, _ = link_parts(config, workdir, name)
  return jax.eval_shape(init, jax.random.key(0))
