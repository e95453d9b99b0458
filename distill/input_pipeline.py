"""Input pipelines: the embedded digits data and tfds data sets through ``grain``.

Every pipeline is a ``grain.MapDataset`` of **process-local** batches indexed by training step:
``dataset[step]`` is the batch of that step, a pure function of ``(seed, step, process)``. So a
restarted run resumes at exactly the right position with no iterator state to save.

* ``digits``: scikit-learn's ``load_digits`` (8×8×1, values 0..16 → [−1, 1], 10 classes), with a
  fixed held-out split of 297 images (seeded permutation, independent of the run's seed).
* ``cifar10`` and ``imagenet64`` (tfds ``imagenet_resized/64x64``): ``tfds.data_source`` (random
  access, never downloads here), random horizontal flip, scaled to [−1, 1], area-downsampled
  when ``data.image_size`` is an integer fraction of the native size (the ``runlocal`` configs).
* ``image_text``: image–caption pairs from a folder with ``captions.jsonl``, webdataset
  ``.tar`` shards or a tfds data set with an image and a text feature (``data.tfds_name``,
  ``distill/image_text.py``), for text-conditioned latent teachers; batches
  hold ``caption`` strings instead of labels.
* ``emoji``: the embedded text-to-image data, Twemoji with their English names as captions
  (``distill/emoji_data.py``).

Each host reads only its own rows of every global batch, so the batches of a run are the same
for any number of hosts.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import grain
import jax
import numpy as np

DIGITS_HELD_OUT = 297
DIGITS_SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
  tfds_name: str
  train_split: str
  eval_split: str
  native_size: int
  channels: int
  num_classes: int


TFDS_DATASETS = {
    "cifar10": TfdsSpec("cifar10", "train", "test", 32, 3, 10),
    "imagenet64": TfdsSpec("imagenet_resized/64x64", "train", "validation", 64, 3, 1000),
}
CAPTIONED = ("image_text", "emoji")  # batches hold captions, not labels
DATASETS = ("digits",) + tuple(TFDS_DATASETS) + CAPTIONED


def captioned(data_config) -> bool:
  """Whether the data come as image–caption pairs (no labels)."""
  return data_config.name in CAPTIONED


def digits_arrays(split: str = "train"):
  """The digits split as ``(images [N, 8, 8, 1] in [−1, 1], labels [N])``."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  data = load_digits()
  images = (data.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  labels = data.target.astype(np.int32)
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
  held_out, train = order[:DIGITS_HELD_OUT], order[DIGITS_HELD_OUT:]
  if split == "train":
    idx = train
  elif split in ("test", "held_out"):
    idx = held_out
  else:
    raise ValueError(f"digits split {split!r} is not one of 'train', 'held_out'.")
  return images[idx], labels[idx]


class _ArraySource:
  """Random-access source over in-memory arrays."""

  def __init__(self, images, labels):
    self._images, self._labels = images, labels

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, i):
    return {"image": self._images[i], "label": self._labels[i]}


class _TfdsSource:
  """A tfds data source read one item at a time (as ``tfds.testing.mock_data`` supports)."""

  def __init__(self, source, image_size: int, native_size: int):
    self._source, self._factor = source, native_size // image_size

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    item = self._source[int(i)]
    image = np.asarray(item["image"], np.float32) / 127.5 - 1.0
    if self._factor > 1:  # area downsampling by an integer factor
      h, w, c = image.shape
      f = self._factor
      image = image.reshape(h // f, f, w // f, f, c).mean(axis=(1, 3))
    return {"image": image.astype(np.float32), "label": np.int32(item["label"])}


def open_tfds(tfds_name: str, split_name: str, data_config):
  """Opens split ``split_name`` of the prepared tfds data set ``tfds_name`` (in
  ``data.data_dir``) for random access, or says how to prepare it. Nothing downloads."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    return tfds.data_source(tfds_name, split=split_name,
                            data_dir=data_config.get("data_dir") or None, download=False)
  except Exception as e:  # tfds raises several types for "not prepared"
    raise ValueError(
        f"data set {tfds_name!r} (data.name={data_config.name!r}), split {split_name!r}, is not "
        f"prepared in data_dir={data_config.get('data_dir')!r}: prepare it with `tfds build "
        f"{tfds_name} --data_dir=DIR --file_format=array_record` (ImageNet needs its "
        f"manual download) and set --config.data.data_dir=DIR "
        f"[{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from None


def tfds_source(data_config, split: str):
  """A labelled tfds data set of ``TFDS_DATASETS``, resized to ``data.image_size``."""
  spec = TFDS_DATASETS[data_config.name]
  split_name = spec.train_split if split == "train" else spec.eval_split
  return _TfdsSource(open_tfds(spec.tfds_name, split_name, data_config), data_config.image_size,
                     spec.native_size)


def source(data_config, split: str = "train"):
  """Random-access source of ``{"image": float32 [H, W, C] in [−1, 1], "label": int32}`` (or
  ``"caption": str`` instead of the label for captioned data: ``distill/image_text.py``,
  ``distill/emoji_data.py``)."""
  if data_config.name == "digits":
    return _ArraySource(*digits_arrays(split))
  if data_config.name == "image_text":
    from distill import image_text  # pylint: disable=import-outside-toplevel
    return image_text.source(data_config, split)
  if data_config.name == "emoji":
    from distill import emoji_data  # pylint: disable=import-outside-toplevel
    return emoji_data.EmojiSource(data_config.image_size, split)
  if data_config.name in TFDS_DATASETS:
    return tfds_source(data_config, split)
  raise ValueError(f"data.name={data_config.name!r} is unknown: use one of {list(DATASETS)}.")


def _flip(item, rng: np.random.Generator):
  flip = rng.random() < 0.5
  if "latents_flipped" in item:  # a latent-cache item holds both orientations
    item = dict(item)
    flipped = item.pop("latents_flipped")
    return dict(item, latents=flipped) if flip else item
  if flip:
    item = dict(item, image=item["image"][:, ::-1])
  return item


def _stack(items):
  out = {}
  for key in items[0]:
    if key == "caption":
      out[key] = np.asarray([x[key] for x in items], object)
    elif key == "label":
      out[key] = np.asarray([x[key] for x in items], np.int32)
    else:  # image, or a latent cache's latents and context
      out[key] = np.stack([x[key] for x in items]).astype(np.float32)
  return out


def train_batches(data_config, *, global_batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  items=None):
  """``MapDataset`` whose item ``step`` is this process's share of that step's global batch.

  The global order is one seeded shuffle of the whole split (re-shuffled each epoch), so the
  global batch of a step does not depend on how many processes share it: process ``p`` of
  ``P`` reads rows ``[p·B/P, (p+1)·B/P)`` of it, and only those elements. ``items``: a
  random-access source to read instead of ``source(data_config)`` in the same order (a latent
  cache, ``distill/latent/cache.py``).
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"batch_size={global_batch_size} is not divisible by the "
                     f"{process_count} processes.")
  ds = grain.MapDataset.source(source(data_config, "train") if items is None else items)
  ds = ds.shuffle(seed=seed).repeat(None)
  if data_config.get("random_flip", False):
    ds = ds.random_map(_flip, seed=seed + 1)  # keyed by the global position
  local = global_batch_size // process_count
  offset = process_index * local

  def element(i):
    step, row = divmod(i, local)
    return ds[step * global_batch_size + offset + row]

  mine = grain.MapDataset.range(len(ds) // global_batch_size * local).map(element)
  return mine.batch(local, drop_remainder=True, batch_fn=_stack)


def iterate(batches, start_step: int = 0, *, num_threads: int = 2) -> Iterator[dict]:
  """Iterates the batches from ``start_step`` on, prefetching in background threads."""
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
  return iter(batches[start_step:].to_iter_dataset(options))
