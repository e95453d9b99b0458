"""The inpainting U-Net's condition (paper §4.2.4): Stable Diffusion Inpainting's layout.

The network sees ``9 = 4 + 1 + 4`` input channels, in this order: the noisy latents, the mask at
latent resolution (1 = fill), and the latents of the masked image. The masked image is the image
with the region to fill set to 0 (mid-grey in [−1, 1]), encoded by the first stage like any
image. The mask reaches latent resolution as diffusers' pipeline brings it there: nearest
neighbour, each latent cell taking the pixel at its top-left corner. Classifier-free guidance
drops the text (or class) context only; both branches see the mask and the masked image.

``cond`` of an inpainting family is a dict ``{"context", "mask", "masked"}``, which the losses,
samplers and shardings handle as any pytree.

**Training masks** (``draw_mask``) follow SD-inpainting's recipe in outline: a quarter of the
examples mask the whole image (the model then generates, so it keeps a text-to-image mode), the
others 1–3 random rectangles, each side between 1/8 and 3/4 of the image. (SD-inpainting drew
LaMa's stroke-and-box masks; rectangles are our simplification.) A mask is a function of the
run's seed, the step and the example's row in the global batch, so a resumed run, or one on
another number of processes, draws the same masks.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

FULL_MASK_SHARE = 0.25  # examples whose whole image is to be filled
MAX_RECTANGLES = 3


def draw_mask(rng: np.random.Generator, size: int) -> np.ndarray:
  """A ``[size, size]`` float32 training mask (1 = fill), see the module docstring."""
  if rng.random() < FULL_MASK_SHARE:
    return np.ones((size, size), np.float32)
  mask = np.zeros((size, size), np.float32)
  low, high = max(1, size // 8), max(1, 3 * size // 4)
  for _ in range(int(rng.integers(1, MAX_RECTANGLES + 1))):
    h, w = rng.integers(low, high + 1, size=2)
    top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    mask[top:top + h, left:left + w] = 1.0
  return mask


def mask_rng(seed: int, step: int, row: int) -> np.random.Generator:
  """The generator of the mask of global-batch row ``row`` at ``step``."""
  return np.random.default_rng([int(seed), int(step), int(row)])


def masked_image(images, fill_mask):
  """``[B, H, W, C]`` images with the region to fill (``fill_mask [B, H, W] >= 0.5``) set to 0."""
  keep = (jnp.asarray(fill_mask, jnp.float32) < 0.5).astype(jnp.float32)
  return jnp.asarray(images, jnp.float32) * keep[..., None]


def latent_mask(fill_mask, latent_size: int):
  """``[B, H, W]`` → ``[B, h, w, 1]`` binary (``>= 0.5``), nearest neighbour: cell ``(i, j)``
  takes pixel ``(i·H/h, j·W/w)``, as diffusers' ``interpolate`` does."""
  fill = jnp.asarray(fill_mask, jnp.float32)
  _, h, w = fill.shape
  if h % latent_size or w % latent_size:
    raise ValueError(f"a mask of {h}x{w} pixels does not tile latents of {latent_size}x"
                     f"{latent_size}.")
  picked = fill[:, ::h // latent_size, ::w // latent_size]
  return (picked >= 0.5).astype(jnp.float32)[..., None]


def condition(context, mask, masked) -> dict:
  """The inpainting family's ``cond``: the cross-attention context, the latent mask and the
  masked image's latents."""
  return {"context": context, "mask": mask, "masked": masked}


def loss_weights(cond, kept_weight: float):
  """Per-latent-cell weights ``[B, h, w, 1]`` of a training loss: ``kept_weight`` where the mask
  keeps the image, 1 where it is to be filled (``latent.kept_loss_weight``). The losses take the
  mean of the weighted squares, so a weight above 1 also scales an example's loss with its kept
  share (Adam's steps hardly change with the scale; a clipped gradient norm does). The network is
  given the kept cells' latents through the masked image and must return them (BENCHMARKS.md,
  "Inpainting: the kept region's loss weight")."""
  return 1.0 + (float(kept_weight) - 1.0) * (1.0 - jnp.asarray(cond["mask"], jnp.float32))


def unet_input(z, cond):
  """The U-Net's input: ``[z, mask, masked latents]`` along channels (SD-inpainting's order)."""
  mask = jnp.broadcast_to(cond["mask"], z.shape[:-1] + (1,)).astype(z.dtype)
  masked = jnp.broadcast_to(cond["masked"], z.shape).astype(z.dtype)
  return jnp.concatenate([z, mask, masked], axis=-1)
