"""Image editing with any model of the chain: image-to-image (SDEdit) and inpainting.

**Image-to-image** (paper §4.2.3, after SDEdit): the source ``x`` is noised once to
``z_{t₀} = α_{t₀} x + σ_{t₀} ε`` (stochastic encoding), and the deterministic sampler runs from
``t₀`` to 0. ``strength`` is ``t₀``: near 0 the edit stays close to the source, at 1 it is a new
sample. A teacher or stage-one model integrates from any ``t₀``. A stage-two student with ``N``
steps has learned jumps of ``1/N`` from the points of its grid ``i/N`` only, so ``t₀`` is
rounded to the nearest grid point ``k/N`` (``1 ≤ k ≤ N``) and the student takes ``k`` of its own
steps (``start_on_grid``): a 4-step student at strength 0.75 takes 3 steps, as in the paper's
image-to-image figure.

**Inpainting by replacement** works with any model, including every 4-channel student: after
every step the known region of the state is replaced by the source noised to that step's time
with the noise ``ε`` of the start, and the returned sample's by the clean source
(``known_region``). The decoded image then takes the source's pixels wherever the mask keeps
them (``composite``), so the known region is the source's exactly, also in latent space.

Masks follow the common convention: 1 (white) where the image is to be filled, 0 (black) where
it is kept.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from distill import diffusion


def check_strength(strength: float) -> float:
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength={strength} must be in (0, 1]: the start time t0 of the edit.")
  return float(strength)


def start_on_grid(strength: float, grid_steps: int) -> tuple[int, float]:
  """``(k, k/N)``: the point of a student's grid ``i/N`` nearest to ``strength`` (at least the
  first, ``1/N``) and the number of its steps from there to 0."""
  check_strength(strength)
  k = min(max(int(np.floor(strength * grid_steps + 0.5)), 1), grid_steps)
  return k, k / grid_steps


def stochastic_encoding(x, eps, t_start, *, logsnr_fn):
  """SDEdit's start: ``z_{t₀} = α_{t₀} x + σ_{t₀} ε``."""
  return diffusion.diffuse(x, eps, logsnr_fn(jnp.asarray(t_start, jnp.float32)))


def known_region(x, keep, eps):
  """``known_fn(z, λ)`` for the samplers: ``keep · (α_λ x + σ_λ ε) + (1 − keep) · z``, or with the
  clean ``x`` when ``λ`` is None (the returned sample). ``keep`` is 1 where the source is kept and
  broadcasts against ``x``."""
  def fn(z, logsnr=None):
    source = x if logsnr is None else diffusion.diffuse(x, eps, logsnr)
    return keep * source + (1.0 - keep) * z
  return fn


def keep_at(fill_mask, shape):
  """The keep mask (1 = kept) at a state's ``[B, H, W, C]`` ``shape`` from a fill mask
  ``[B, h, w]`` (1 = fill) at image resolution: a latent cell is kept only if every pixel it
  covers is kept, so that nothing to be filled is pinned to the source."""
  fill = jnp.asarray(fill_mask, jnp.float32)
  b, h, w = fill.shape
  _, hh, ww, _ = shape
  if h % hh or w % ww:
    raise ValueError(f"a mask of {h}x{w} pixels does not tile a state of {hh}x{ww}.")
  fill = fill.reshape(b, hh, h // hh, ww, w // ww).max(axis=(2, 4))
  return (1.0 - fill)[..., None]


def composite(decoded, source, fill_mask):
  """The final image: the source's pixels where the mask keeps them, the decoded sample's where
  it fills."""
  fill = jnp.asarray(fill_mask, jnp.float32)[..., None]
  return fill * decoded + (1.0 - fill) * source


def check_image_file(path) -> None:
  """Refuses ``path`` (as a user typed it) when no file is there: before anything is loaded."""
  from distill import paths  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(paths.resolve(str(path))):
    raise ValueError(f"{path}: no such image file.")


def read_image(path, *, size: tuple[int, int], channels: int) -> np.ndarray:
  """An image file as ``[H, W, C]`` float32 in [−1, 1], resized to ``size`` (``(H, W)``),
  grey (``channels = 1``) or RGB (``3``); transparency is composited on white."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from distill import paths  # pylint: disable=import-outside-toplevel
  check_image_file(path)
  resolved = paths.resolve(str(path))
  try:
    with Image.open(resolved) as img:
      img.load()
      rgba = img.convert("RGBA")
  except OSError as e:
    raise ValueError(f"{path}: not an image PIL can read ({e}).") from e
  white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  img = Image.alpha_composite(white, rgba).convert("L" if channels == 1 else "RGB")
  img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
  arr = np.asarray(img, np.float32).reshape(size[0], size[1], channels)
  return arr / 127.5 - 1.0


def read_mask(path, *, size: tuple[int, int]) -> np.ndarray:
  """A mask file as ``[H, W]`` float32 of 0 (keep) and 1 (fill: white), resized to ``size``."""
  grey = read_image(path, size=size, channels=1)[..., 0]
  mask = (grey > 0.0).astype(np.float32)  # brighter than mid-grey: fill
  if not mask.any():
    raise ValueError(f"--mask={path} is black everywhere: nothing to fill (white marks the region "
                     "to fill).")
  return mask
