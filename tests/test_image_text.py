"""Image–caption data (distill/image_text.py): the crop, both folder layouts and the batches the
latent family encodes (the SD-like chain trains on captions in tests/test_latent_pipeline.py)."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from distill import family, image_text, input_pipeline, pipeline
from distill.config_utils import load_config

CAPTIONS = ["a red square", "a blue square", "grinning face with big eyes", "thumbs up",
            "a green dot", "a yellow star"]


def _image(i):
  """A 12×8 RGBA image: distinct 2-pixel bands left and right, a pattern inside, one
  transparent pixel."""
  rng = np.random.default_rng(i)
  rgba = np.full((8, 12, 4), 255, np.uint8)
  rgba[:, :, :3] = rng.integers(0, 256, (8, 12, 3))
  rgba[:, :2, :3] = (255, 0, 0)
  rgba[:, -2:, :3] = (0, 0, 255)
  rgba[3, 5, 3] = 0  # fully transparent: white after compositing
  return rgba


def _png(rgba):
  buf = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("image_text")
  jsonl = root / "jsonl"
  (jsonl / "images").mkdir(parents=True)
  lines = []
  for i, caption in enumerate(CAPTIONS):
    (jsonl / "images" / f"{i}.png").write_bytes(_png(_image(i)))
    lines.append(json.dumps({"file": f"images/{i}.png", "caption": caption}))
  (jsonl / "captions.jsonl").write_text("\n".join(lines) + "\n")
  shards = root / "shards"
  shards.mkdir()
  for shard, keys in enumerate((range(0, 4), range(4, 6))):
    with tarfile.open(shards / f"{shard:05d}.tar", "w") as tar:
      members = [(f"{i:09d}.png", _png(_image(i))) for i in keys]
      members += [(f"{i:09d}.txt", CAPTIONS[i].encode()) for i in keys]
      members += [("orphan.png", _png(_image(9)))]  # no caption: skipped
      for name, data in members:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return jsonl, shards


def test_prepare_image_composites_on_white_and_centre_crops():
  rgba = _image(0)
  got = image_text.prepare_image(_png(rgba), 8)
  want = rgba[:, 2:10, :3].astype(np.float32) / 127.5 - 1.0  # the centre 8×8 of a 12×8 image
  want[3, 3] = 1.0  # the transparent pixel, on white
  np.testing.assert_array_equal(got, want)
  small = image_text.prepare_image(_png(rgba), 4)
  assert small.shape == (4, 4, 3) and small.min() >= -1.0 and small.max() <= 1.0


def test_jsonl_folder_and_tar_shards_hold_the_same_pairs(folders):
  jsonl, shards = folders
  a = image_text.ImageTextSource(str(jsonl), 8)
  b = image_text.ImageTextSource(str(shards), 8)
  one = image_text.ImageTextSource(str(shards / "00001.tar"), 8)
  assert len(a) == len(b) == 6 and len(one) == 2
  for i in range(6):
    assert a[i]["caption"] == b[i]["caption"] == CAPTIONS[i]
    np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
  assert one[1]["caption"] == CAPTIONS[5]
  held = image_text.ImageTextSource(str(jsonl), 8, split="held_out", held_out=2)
  train = image_text.ImageTextSource(str(jsonl), 8, held_out=2)
  assert [held[i]["caption"] for i in range(2)] == CAPTIONS[:2]
  assert [train[i]["caption"] for i in range(4)] == CAPTIONS[2:]


def test_bad_image_text_data_are_one_line_errors(tmp_path, folders):
  with pytest.raises(ValueError, match="needs --config.data.data_dir=FOLDER"):
    image_text.ImageTextSource("", 8)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image–caption pairs"):
    image_text.ImageTextSource(str(tmp_path / "empty"), 8)
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "captions.jsonl").write_text('{"file": "a.png"}\n')
  with pytest.raises(ValueError, match="line 1: expected"):
    image_text.ImageTextSource(str(tmp_path / "bad"), 8)
  config = _sd_config(folders[0])
  config.data.num_classes = 10
  with pytest.raises(ValueError, match="image–caption data have no labels"):
    pipeline.run(config, tmp_path / "run")
  pixel = load_config("digits:runlocal")
  pixel.data.name = "image_text"
  with pytest.raises(ValueError, match="holds captions, not labels"):
    pipeline.run(pixel, tmp_path / "run2")


def _sd_config(folder):
  config = load_config("sd15:runlocal")
  config.data.name = "image_text"
  config.data.data_dir = str(folder)
  config.data.image_size = 16
  config.data.channels = 3
  config.data.num_classes = 0
  config.latent.class_names = ()
  config.num_devices = 1
  return config


def test_caption_batches_become_latents_and_text_contexts(folders):
  config = _sd_config(folders[1])
  fam = family.of(config)
  batches = input_pipeline.train_batches(config.data, global_batch_size=4, seed=0)
  raw, mapped = batches[0], fam.prepare_batches(batches)[0]
  assert raw["caption"].dtype == object and set(raw["caption"]) <= set(CAPTIONS)
  want = fam.models.encode_prompt([str(c) for c in raw["caption"]])
  np.testing.assert_allclose(mapped["context"], np.asarray(want), atol=1e-6)
  np.testing.assert_allclose(mapped["latents"],
                             np.asarray(fam.models.encode_image(raw["image"])), atol=1e-5)
  assert fam.context_table.shape[0] == 1  # the null (empty) prompt only


def test_a_tfds_image_text_data_set_under_mock_data(tmp_path):
  """``data.tfds_name = "coco_captions"`` under ``tfds.testing.mock_data``: each item is the
  example's image, centre-cropped and resized, with the first of its captions; the batches
  become latents and the captions' text contexts; a wrong feature or an unprepared data set is
  a one-line error."""
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _sd_config(tmp_path)
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.tfds_name = "coco_captions"
  with pytest.raises(ValueError, match="'coco_captions' .* is not prepared in data_dir=.*tfds build"):
    image_text.source(config.data, "train")
  with tfds.testing.mock_data(num_examples=8):
    raw = tfds.data_source("coco_captions", split="train")
    train = input_pipeline.source(config.data, "train")
    assert len(train) == 8
    for i in range(8):
      item, example = train[i], raw[i]
      assert item["caption"] == str(example["captions"]["text"][0])
      pixels = np.asarray(example["image"], np.uint8)
      side = min(pixels.shape[:2])
      top, left = (pixels.shape[0] - side) // 2, (pixels.shape[1] - side) // 2
      square = Image.fromarray(pixels[top:top + side, left:left + side])
      want = np.asarray(square.resize((16, 16), Image.Resampling.BICUBIC), np.float32)
      np.testing.assert_allclose(item["image"], want / 127.5 - 1.0, atol=1e-6)
    held = input_pipeline.source(config.data, "held_out")
    assert len(held) == 8 and isinstance(held[0]["caption"], str)
    fam = family.of(config)
    batches = input_pipeline.train_batches(config.data, global_batch_size=4, seed=0)
    batch, mapped = batches[1], fam.prepare_batches(batches)[1]
    assert set(batch["caption"]) <= {str(raw[i]["captions"]["text"][0]) for i in range(8)}
    want = fam.models.encode_prompt([str(c) for c in batch["caption"]])
    np.testing.assert_allclose(mapped["context"], np.asarray(want), atol=1e-6)
    config.data.tfds_caption = "captions/words"
    with pytest.raises(ValueError, match="data.tfds_caption='captions/words': .* no such text"):
      pipeline.run(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
