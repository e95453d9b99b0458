"""Image–caption pairs for text-conditioned latent teachers: ``data.name = "image_text"``.

``data.data_dir`` is one of:

* a folder with ``captions.jsonl``, one JSON object per line, ``{"file": "<path relative to the
  folder>", "caption": "..."}``;
* a folder of webdataset-style ``.tar`` shards as img2dataset writes them: members
  ``KEY.jpg`` / ``KEY.jpeg`` / ``KEY.png`` / ``KEY.webp`` with ``KEY.txt`` beside them (a key
  without both is skipped), read in sorted shard and member order;
* one such ``.tar`` file;
* with ``data.tfds_name`` set: a prepared tfds data set (its tfds data_dir in ``data.data_dir``)
  with an ``image`` feature and the text feature ``data.tfds_caption`` (``/`` descends into
  nested features: ``captions/text`` for ``coco_captions``); of a sequence of captions the first
  is used. Its splits are ``data.tfds_train_split`` and ``data.tfds_held_out_split``.

Each item is ``{"image": float32 [S, S, 3] in [−1, 1], "caption": str}``: the image composited
on white if it has transparency, centre-cropped to a square and resized to ``S =
data.image_size`` (bicubic). Random access by index, so the grain pipeline of
``distill/input_pipeline.py`` splits and resumes these as it does every source. Of local files,
the first ``data.held_out`` pairs (in that order) are the held-out split; the rest train.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from etils import epath
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def prepare_image(data: bytes | Image.Image, size: int) -> np.ndarray:
  """Image bytes → ``[size, size, 3]`` float32 in [−1, 1]: on white, centre-cropped, resized."""
  image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
  image = image.convert("RGBA")
  white = Image.new("RGBA", image.size, (255, 255, 255, 255))
  image = Image.alpha_composite(white, image).convert("RGB")
  w, h = image.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  image = image.crop((left, top, left + side, top + side))
  if side != size:
    image = image.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(image, np.float32) / 127.5 - 1.0


def _pairs_from_jsonl(folder: epath.Path):
  pairs = []
  for n, line in enumerate((folder / "captions.jsonl").read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      pairs.append((str(folder / row["file"]), str(row["caption"])))
    except (ValueError, KeyError, TypeError):
      raise ValueError(f"{folder / 'captions.jsonl'} line {n}: expected "
                       '{"file": "...", "caption": "..."}.') from None
  return [("file", path, None, caption) for path, caption in pairs]


def _pairs_from_tars(shards):
  pairs = []
  for shard in shards:
    with tarfile.open(str(shard)) as tar:
      members = {m.name: m for m in tar.getmembers() if m.isfile()}
      for name in sorted(members):
        stem, dot, suffix = name.rpartition(".")
        if not dot or "." + suffix.lower() not in IMAGE_SUFFIXES or stem + ".txt" not in members:
          continue
        caption = tar.extractfile(members[stem + ".txt"]).read().decode("utf-8").strip()
        pairs.append(("tar", str(shard), name, caption))
  return pairs


class ImageTextSource:
  """Random-access ``{"image", "caption"}`` pairs of ``data_dir`` (see the module docstring)."""

  def __init__(self, data_dir: str, image_size: int, *, split: str = "train", held_out: int = 0):
    if not data_dir:
      raise ValueError("data.name='image_text' needs --config.data.data_dir=FOLDER (captions.jsonl "
                       "with images, or .tar shards of KEY.jpg/KEY.png + KEY.txt).")
    path = epath.Path(data_dir)
    if path.is_dir() and (path / "captions.jsonl").exists():
      pairs = _pairs_from_jsonl(path)
    elif path.is_dir():
      pairs = _pairs_from_tars(sorted(path.glob("*.tar")))
    elif path.is_file() and path.suffix == ".tar":
      pairs = _pairs_from_tars([path])
    else:
      raise ValueError(f"data.data_dir={data_dir}: not a folder or a .tar file.")
    if not pairs:
      raise ValueError(f"data.data_dir={data_dir}: no image–caption pairs (a captions.jsonl, or "
                       ".tar shards with KEY.jpg/KEY.png and KEY.txt members).")
    if split not in ("train", "held_out", "test"):
      raise ValueError(f"image_text split {split!r} is not one of 'train', 'held_out'.")
    if held_out >= len(pairs):
      raise ValueError(f"data.held_out={held_out} leaves no training pairs of {len(pairs)}.")
    self._pairs = pairs[held_out:] if split == "train" else pairs[:held_out]
    self._size = int(image_size)

  def __len__(self):
    return len(self._pairs)

  def __getitem__(self, i):
    kind, path, member, caption = self._pairs[int(i)]
    if kind == "file":
      data = epath.Path(path).read_bytes()
    else:
      with tarfile.open(path) as tar:
        data = tar.extractfile(member).read()
    try:
      image = prepare_image(data, self._size)
    except Exception as e:  # PIL raises several types for a broken file
      raise ValueError(f"{path}{':' + member if member else ''}: not a readable image "
                       f"({type(e).__name__}: {e}).") from None
    return {"image": image, "caption": caption}


class TfdsImageTextSource:
  """Random-access ``{"image", "caption"}`` pairs of a tfds data set (see the module docstring)."""

  def __init__(self, data_config, split: str = "train"):
    from distill import input_pipeline  # pylint: disable=import-outside-toplevel
    if split not in ("train", "held_out", "test"):
      raise ValueError(f"image_text split {split!r} is not one of 'train', 'held_out'.")
    name = str(data_config.tfds_name)
    split_name = str(data_config.tfds_train_split if split == "train" else
                     data_config.tfds_held_out_split)
    self._source = input_pipeline.open_tfds(name, split_name, data_config)
    self._keys = tuple(str(data_config.tfds_caption).split("/"))
    self._size = int(data_config.image_size)
    self._where = f"data.tfds_name={name!r}"
    if not len(self._source):
      raise ValueError(f"{self._where}, split {split_name!r}: no examples.")
    self[0]  # a missing feature is reported now, not in the first training step

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    item = self._source[int(i)]
    if "image" not in item:
      raise ValueError(f"{self._where} has no 'image' feature (its features: {sorted(item)}).")
    text = item
    for key in self._keys:
      if not isinstance(text, dict) or key not in text:
        raise ValueError(f"data.tfds_caption={'/'.join(self._keys)!r}: {self._where} has no such "
                         f"text feature (its features: {sorted(item)}).")
      text = text[key]
    text = np.asarray(text)
    if text.ndim:  # a sequence of captions: the first
      if not text.size:
        raise ValueError(f"{self._where}: example {i} has no caption.")
      text = text.reshape(-1)[0]
    text = text.item() if isinstance(text, np.ndarray) else text
    caption = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    pixels = np.asarray(item["image"], np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
      pixels = pixels[..., 0]
    return {"image": prepare_image(Image.fromarray(pixels), self._size), "caption": caption}


def source(data_config, split: str = "train"):
  """The image–caption source of ``data_config``: tfds when ``data.tfds_name`` is set, else the
  local files of ``data.data_dir``."""
  if data_config.get("tfds_name"):
    return TfdsImageTextSource(data_config, split)
  return ImageTextSource(data_config.get("data_dir"), data_config.image_size, split=split,
                         held_out=int(data_config.get("held_out", 0)))
