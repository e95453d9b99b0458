"""Image grids and PNG files for samples in [−1, 1]."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from distill import files


def to_uint8(images) -> np.ndarray:
  """``[..., H, W, C]`` in [−1, 1] → uint8 in [0, 255] (clipped)."""
  x = (np.clip(np.asarray(images, np.float32), -1.0, 1.0) + 1.0) * 127.5
  return np.round(x).astype(np.uint8)


def grid(images, *, rows: int, pad: int = 1) -> np.ndarray:
  """``[N, H, W, C]`` → one ``[rows·(H+pad)+pad, cols·(W+pad)+pad, C]`` uint8 image, row-major."""
  x = to_uint8(images)
  n, h, w, c = x.shape
  cols = -(-n // rows)
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, col = divmod(i, cols)
    out[pad + r * (h + pad): pad + r * (h + pad) + h,
        pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
  return out


def save_png(image: np.ndarray, path, *, scale: int = 1) -> None:
  """Writes a uint8 ``[H, W, C]`` image (nearest-neighbour upscaled by ``scale``) atomically."""
  image = np.asarray(image)
  if scale > 1:
    image = image.repeat(scale, axis=0).repeat(scale, axis=1)
  if image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  files.write_atomic(path, buffer.getvalue())
