"""The latent cache (distill/latent/cache.py): the training split encoded once.

Oracle: the family's own encoding of the data source's images (``encode_images``,
``encode_prompt``), the path every uncached run takes, and the uncached run itself.
"""

import json
import shutil

import jax
import numpy as np
import pytest

from distill import family, input_pipeline, layout, pipeline
from distill.config_utils import load_config
from distill.latent import cache

from test_image_text import CAPTIONS, _image, _png  # small RGBA images with captions


def _cin_config(**overrides):
  config = load_config("ldm_cin256:runlocal")
  config.num_devices = 1
  config.data.random_flip = True
  for key, value in overrides.items():
    *sections, field = key.split(".")
    holder = config
    for section in sections:
      holder = holder[section]
    holder[field] = value
  return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  config = _cin_config()
  workdir = tmp_path_factory.mktemp("cache")
  cache.build(config, workdir, family.of(config))
  return config, workdir


def test_the_cache_holds_the_familys_encoding_of_every_item(built):
  config, workdir = built
  fam, source = family.of(config), input_pipeline.source(config.data, "train")
  cached = cache.CachedSource(workdir)
  assert len(cached) == len(source) == 1500
  index = json.loads((workdir / "latent_cache" / "index.json").read_text())
  assert index["fields"] == ["latents", "latents_flipped", "labels"]
  for i in (0, 1, 1023, 1024, 1499):  # both shards and their edges
    image = source[i]["image"][None]
    item = cached[i]
    np.testing.assert_allclose(item["latents"], np.asarray(fam.encode_images(image))[0], atol=1e-5)
    np.testing.assert_allclose(item["latents_flipped"],
                               np.asarray(fam.encode_images(image[:, :, ::-1]))[0], atol=1e-5)
    assert item["label"] == source[i]["label"]
  assert not np.allclose(cached[5]["latents"], cached[5]["latents_flipped"])


def test_cached_batches_are_the_uncached_ones(built):
  """Same shuffle, same flips, same latents and contexts, also split over two processes."""
  config, workdir = built
  fam = family.of(config)
  kw = dict(global_batch_size=16, seed=3)
  plain = fam.prepare_batches(input_pipeline.train_batches(config.data, **kw))
  fast = fam.prepare_batches(input_pipeline.train_batches(
      config.data, items=cache.CachedSource(workdir), **kw))
  halves = [fam.prepare_batches(input_pipeline.train_batches(
      config.data, items=cache.CachedSource(workdir), process_index=p, process_count=2, **kw))
      for p in (0, 1)]
  for step in (0, 1, 90, 200):  # 200 is past the first epoch (93 batches)
    a, b = plain[step], fast[step]
    np.testing.assert_allclose(b["latents"], a["latents"], atol=1e-5)
    np.testing.assert_array_equal(b["context"], a["context"])
    joined = np.concatenate([h[step]["latents"] for h in halves])
    np.testing.assert_array_equal(joined, b["latents"])


def test_a_killed_build_resumes_at_its_missing_shard(built, tmp_path):
  config, workdir = built
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  root = copy / "latent_cache"
  (root / "index.json").unlink()
  shutil.rmtree(root / "shard-00001")
  (root / "shard-00001.tmp").mkdir()  # a half-written shard of the killed build
  (root / "shard-00001.tmp" / "latents.npy").write_bytes(b"partial")
  kept = (root / "shard-00000" / "latents.npy").stat().st_mtime_ns
  cache.build(config, copy, family.of(config))
  assert (root / "shard-00000" / "latents.npy").stat().st_mtime_ns == kept  # not re-encoded
  assert not (root / "shard-00001.tmp").exists()
  for name in ("latents", "latents_flipped", "labels"):
    np.testing.assert_array_equal(np.load(root / "shard-00001" / f"{name}.npy"),
                                  np.load(workdir / "latent_cache" / "shard-00001" / f"{name}.npy"))


def test_caption_contexts_are_cached(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  lines = []
  for i, caption in enumerate(CAPTIONS):
    (data / f"{i}.png").write_bytes(_png(_image(i)))
    lines.append(json.dumps({"file": f"{i}.png", "caption": caption}))
  (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
  config = load_config("sd15:runlocal")
  config.data.name, config.data.data_dir = "image_text", str(data)
  config.data.image_size, config.data.channels, config.data.num_classes = 16, 3, 0
  config.data.random_flip = False
  config.latent.class_names = ()
  fam = family.of(config)
  cache.build(config, tmp_path / "run", fam)
  cached = cache.CachedSource(tmp_path / "run")
  want = np.asarray(fam.models.encode_prompt(CAPTIONS))
  for i in range(len(CAPTIONS)):
    assert sorted(cached[i]) == ["context", "latents"]
    np.testing.assert_allclose(cached[i]["context"], want[i], atol=1e-6)


def test_the_chain_trains_on_the_cache(tmp_path):
  """teacher_v on the cache ends where the uncached link ends (to the rounding of encoding in
  other batch sizes); the manifest records the cache, and a rerun does not rebuild it."""
  overrides = {"teacher_v.num_train_steps": 3, "teacher_v.checkpoint_every": 3,
               "teacher_v.sample_every": 0, "stages": "teacher,teacher_v"}
  ends = {}
  for use in (False, True):
    config = _cin_config(**overrides, **{"latent.cache": use})
    workdir = tmp_path / str(use)
    pipeline.run(config, str(workdir))
    link = layout.chain(config)[1]
    ends[use] = jax.device_get(layout.read_final_params(config, workdir, link,
                                                        pipeline.make_mesh(config)))
  manifest = json.loads((tmp_path / "True" / "manifest.json").read_text())
  assert "latent_cache" in manifest["stages"]
  assert not (tmp_path / "False" / "latent_cache").exists()
  for a, b in zip(jax.tree.leaves(ends[False]), jax.tree.leaves(ends[True])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(ends[True]), jax.tree.leaves(family.of(config).models.unet_params)))
  index = tmp_path / "True" / "latent_cache" / "index.json"
  before = index.stat().st_mtime_ns
  pipeline.run(config, str(tmp_path / "True"))
  assert index.stat().st_mtime_ns == before


def test_no_cache_is_a_one_line_error(tmp_path):
  with pytest.raises(ValueError, match="no finished latent cache .* --config.latent.cache=true"):
    cache.CachedSource(tmp_path)
