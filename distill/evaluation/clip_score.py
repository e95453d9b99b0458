"""CLIP score and CLIP image features (the paper's Fig. 10 and Table 2).

The CLIP score of an image and its caption is ``100·max(cos(E_image, E_text), 0)`` with the
embeddings of a CLIP model (``distill/latent/clip_loader.py``), averaged over the pairs: the
convention of torchmetrics' ``CLIPScore``. (Some papers print the raw cosine, ×0.01: the paper's
0.30 is a score of 30.) Images in [−1, 1], NHWC, of any size, are brought to what the model
expects as its own preprocessing does: resized so that the shorter side is the model's image
size (bicubic, antialiased), centre-cropped to a square, scaled to [0, 1] and normalised with the
model's mean and std.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from distill import network
from distill.latent import clip_loader


def preprocess(images, *, size: int, mean, std) -> jax.Array:
  """``[B, H, W, 3]`` in [−1, 1] → ``[B, size, size, 3]``, normalised as the CLIP model expects."""
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images have shape {images.shape}; CLIP takes [B, H, W, 3] RGB.")
  _, h, w, _ = images.shape
  scale = size / min(h, w)
  rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
  x = (images + 1.0) / 2.0
  if (rh, rw) != (h, w):
    x = jax.image.resize(x, (x.shape[0], rh, rw, 3), method="bicubic", antialias=True)
  top, left = (rh - size) // 2, (rw - size) // 2
  x = x[:, top:top + size, left:left + size]
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@functools.lru_cache(maxsize=8)
def _image_fn(model: clip_loader.CLIPModel):
  @jax.jit
  def run(params, images):
    pixels = preprocess(images, size=model.image_size, mean=model.mean, std=model.std)
    return model.vision.apply({"params": params}, pixels)
  return run


def _batched(fn, params, inputs, batch_size: int) -> np.ndarray:
  out = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    pad = batch_size - len(chunk) if len(inputs) > batch_size else 0
    if pad:  # every batch one shape: one compiled program
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(params, chunk))[:batch_size - pad])
  return np.concatenate(out)


def image_embeddings(model: clip_loader.CLIPModel, images, *, batch_size: int = 100) -> np.ndarray:
  """``[N, projection_dim]`` image embeddings (not normalised) of images in [−1, 1]."""
  return _batched(_image_fn(model), model.vision_params, np.asarray(images, np.float32),
                  batch_size)


def text_embeddings(model: clip_loader.CLIPModel, prompts, *, batch_size: int = 100) -> np.ndarray:
  """``[N, projection_dim]`` text embeddings (not normalised) of the prompts."""
  return _batched(functools.partial(network.apply, model.text), model.text_params,
                  model.tokenizer(list(prompts)), batch_size)


def score_from_embeddings(image_embeds, text_embeds) -> np.ndarray:
  """Per pair ``100·max(cos, 0)``."""
  a = np.asarray(image_embeds, np.float64)
  b = np.asarray(text_embeds, np.float64)
  cos = np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  return 100.0 * np.maximum(cos, 0.0)


def clip_score(model: clip_loader.CLIPModel, images, prompts, *, batch_size: int = 100) -> float:
  """The mean CLIP score of ``images[i]`` with ``prompts[i]``."""
  prompts = list(prompts)
  if len(prompts) != len(images):
    raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts.")
  return float(np.mean(score_from_embeddings(
      image_embeddings(model, images, batch_size=batch_size),
      text_embeddings(model, prompts, batch_size=batch_size))))
