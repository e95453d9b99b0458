"""The latent cache (paper §4.2 at scale): the training split encoded once, read by every link.

With ``latent.cache = True`` the chain's first training run encodes the data set with the frozen
first stage (and, for image–caption data, the text encoder) into ``workdir/latent_cache/``, and
every link then reads latents and contexts instead of encoding images in each step. Per item it
holds exactly what ``LatentFamily.prepare_batches`` computes from the images, so a cached run
trains on the same batches as an uncached one:

* ``latents``: the scaled latents of the item's image (the posterior mean, or a VQ model's
  pre-quantisation latents), and with ``data.random_flip`` also ``latents_flipped`` of the
  mirrored image, since flipping latents is not flipping images;
* ``contexts``: the text encoder's context of each caption, or ``labels`` for labelled data
  (their contexts are rows of the family's context table).

Layout: ``shard-NNNNN/`` directories of ``SHARD_SIZE`` items, one ``.npy`` per field, each
shard assembled under a temporary name and renamed into place, so a killed build resumes at its
first missing shard and never trusts a half-written one; ``index.json`` is written last. The
shards are shared out over the processes of a multi-host run. Items are read a row at a time
from the ``.npy`` files (a seek and a read, local or ``gs://``), so each host reads only its
rows of each batch. Size per item: the latents (``4·h·w·c`` bytes, twice with flips) plus, for
captions, ``4·L·D`` bytes of context (236 KB for SD 1.5's 77×768).
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import jax
import numpy as np
from etils import epath

from distill import files, input_pipeline

DIRECTORY = "latent_cache"
SHARD_SIZE = 1024
ENCODE_BATCH = 64  # images per call of the first stage (and prompts per call of the text encoder)


def directory(workdir) -> epath.Path:
  return epath.Path(workdir) / DIRECTORY


def is_enabled(config) -> bool:
  return config.get("family") == "latent" and bool(config.latent.get("cache", False))


def _shard_name(index: int) -> str:
  return f"shard-{index:05d}"


def _encode_shard(fam, items, *, flip: bool) -> dict[str, np.ndarray]:
  """The cached fields of ``items`` (the data source's ``{"image", "label" | "caption"}``)."""
  images = np.stack([item["image"] for item in items]).astype(np.float32)
  out = {"latents": [], "latents_flipped": [], "contexts": []}
  for start in range(0, len(items), ENCODE_BATCH):
    part = images[start:start + ENCODE_BATCH]
    out["latents"].append(np.asarray(fam.encode_images(part), np.float32))
    if flip:
      out["latents_flipped"].append(np.asarray(fam.encode_images(part[:, :, ::-1]), np.float32))
    if "caption" in items[0]:
      prompts = [str(item["caption"]) for item in items[start:start + ENCODE_BATCH]]
      out["contexts"].append(np.asarray(fam.cond_from_prompts(prompts), np.float32))
  fields = {k: np.concatenate(v) for k, v in out.items() if v}
  if "caption" not in items[0]:
    fields["labels"] = np.asarray([item["label"] for item in items], np.int32)
  return fields


def build(config, workdir, fam) -> epath.Path:
  """Encodes the training split into ``workdir/latent_cache`` (resuming at the first missing
  shard); returns at once when ``index.json`` exists."""
  root = directory(workdir)
  if (root / "index.json").exists():
    return root
  source = input_pipeline.source(config.data, "train")
  n = len(source)
  num_shards = -(-n // SHARD_SIZE)
  flip = bool(config.data.get("random_flip", False))
  fields = ["latents"] + (["latents_flipped"] if flip else []) + (
      ["contexts"] if input_pipeline.captioned(config.data) else ["labels"])
  root.mkdir(parents=True, exist_ok=True)
  start = time.time()
  mine = range(jax.process_index(), num_shards, jax.process_count())
  for count, s in enumerate(mine, start=1):
    out = root / _shard_name(s)
    if out.exists():
      continue
    items = [source[i] for i in range(s * SHARD_SIZE, min(n, (s + 1) * SHARD_SIZE))]
    encoded = _encode_shard(fam, items, flip=flip)
    assert sorted(encoded) == sorted(fields), (sorted(encoded), fields)
    staging = root / (_shard_name(s) + ".tmp")
    if staging.exists():
      shutil.rmtree(str(staging))
    staging.mkdir()
    for name, value in encoded.items():
      with (staging / f"{name}.npy").open("wb") as f:
        np.save(f, value)
    staging.rename(out)
    logging.info("latent_cache: shard %d of %d written (%d of this process's %d, %.0f s)",
                 s + 1, num_shards, count, len(mine), time.time() - start)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("latent_cache")
  if jax.process_index() == 0:
    missing = [s for s in range(num_shards) if not (root / _shard_name(s)).exists()]
    if missing:
      raise ValueError(f"{root}: shards {missing[:5]} are missing after the build; rerun.")
    files.write_atomic(root / "index.json", json.dumps(
        {"num_examples": n, "shard_size": SHARD_SIZE, "random_flip": flip,
         "fields": fields}, indent=2) + "\n")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("latent_cache_index")
  return root


class _NpyRows:
  """Row ``i`` of a ``.npy`` file, read with one seek (no memory map, so ``gs://`` works too)."""

  def __init__(self, path: epath.Path):
    self._path = path
    with path.open("rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
                     np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      self._offset = f.tell()
    if fortran:
      raise ValueError(f"{path}: a Fortran-ordered array; delete {path.parent.parent} to rebuild.")
    self._dtype, self._row_shape = np.dtype(dtype), tuple(shape[1:])
    self._row_bytes = self._dtype.itemsize * int(np.prod(self._row_shape, dtype=np.int64))
    self.length = int(shape[0])

  def __getitem__(self, i: int) -> np.ndarray:
    with self._path.open("rb") as f:
      f.seek(self._offset + i * self._row_bytes)
      data = f.read(self._row_bytes)
    return np.frombuffer(data, self._dtype).reshape(self._row_shape)


class CachedSource:
  """Random-access ``{"latents"[, "latents_flipped"], "context" | "label"}`` items of a built
  cache, in the data source's order (``input_pipeline.train_batches`` shuffles and splits them as
  it does the images)."""

  def __init__(self, workdir):
    root = directory(workdir)
    if not (root / "index.json").exists():
      raise ValueError(f"{root} holds no finished latent cache (no index.json): run a training "
                       "link with --config.latent.cache=true to build it.")
    index = json.loads((root / "index.json").read_text())
    self._n, self._shard = int(index["num_examples"]), int(index["shard_size"])
    self._fields = tuple(index["fields"])
    self._shards: dict[int, dict[str, _NpyRows]] = {}
    self._root = root

  def _rows(self, s: int) -> dict[str, _NpyRows]:
    if s not in self._shards:
      folder = self._root / _shard_name(s)
      self._shards[s] = {name: _NpyRows(folder / f"{name}.npy") for name in self._fields}
    return self._shards[s]

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    s, row = divmod(int(i), self._shard)
    rows = self._rows(s)
    item = {name: rows[name][row] for name in self._fields}
    if "labels" in item:
      item["label"] = np.int32(item.pop("labels"))
    if "contexts" in item:
      item["context"] = item.pop("contexts")
    return item
