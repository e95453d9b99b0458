"""CLIP: our Flax towers against transformers' CLIPModel and OpenCLIP's CLIP on tiny random
models (tests/fixtures/make_latent_fixtures.py, --parts=clip), and the CLIP score."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.evaluation import clip_score
from distill.latent import clip_loader, weights

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "latent"


@pytest.fixture(scope="module")
def ref():
  with np.load(FIXTURES / "clip_outputs.npz") as f:
    return dict(f)


@pytest.mark.parametrize("name", ["clip-tiny", "openclip-tiny"])
def test_towers_match_the_reference_implementation(ref, name):
  model = clip_loader.load(FIXTURES / name)
  pixels = jnp.asarray(ref["pixels"].transpose(0, 2, 3, 1))  # normalised, NCHW → NHWC
  image = model.vision.apply({"params": model.vision_params}, pixels)
  np.testing.assert_allclose(image, ref[f"{name}_image_embeds"], rtol=1e-4, atol=1e-5)
  # Our tokenizer pads with the end token, OpenCLIP's with 0: the causal text tower and the
  # pooling at the end token make the embeddings the same.
  ids = model.tokenizer(list(ref["prompts"]))
  np.testing.assert_array_equal(ids, ref["ids"])
  text = model.text.apply({"params": model.text_params}, jnp.asarray(ids))
  np.testing.assert_allclose(text, ref[f"{name}_text_embeds"], rtol=1e-4, atol=1e-5)
  assert model.text.config.hidden_act == ("quick_gelu" if name == "clip-tiny" else "gelu")


def test_clip_score_of_images_in_minus_one_one(ref):
  """The whole path: images in [−1, 1] at the model's size (preprocessing only normalises them)
  → the reference implementation's mean of 100·max(cos, 0)."""
  model = clip_loader.load(FIXTURES / "clip-tiny")
  pixels = ref["pixels"].transpose(0, 2, 3, 1)
  images = 2.0 * (pixels * np.asarray(model.std) + np.asarray(model.mean)) - 1.0
  got = clip_score.clip_score(model, images, list(ref["prompts"]), batch_size=3)
  np.testing.assert_allclose(got, ref["clip-tiny_score"], rtol=1e-4)


def test_score_is_hundred_times_the_clamped_cosine():
  a = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
  b = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.1]])
  np.testing.assert_allclose(clip_score.score_from_embeddings(a, b),
                             [100.0, 100.0 / np.sqrt(2.0), 0.0])


def test_preprocessing_resizes_the_short_side_and_crops_the_centre():
  # 32 × 64: a blue centre between red bands a quarter wide; the crop keeps only blue.
  image = -np.ones((1, 32, 64, 3), np.float32)
  image[:, :, :16, 0] = image[:, :, 48:, 0] = 1.0
  image[:, :, 16:48, 2] = 1.0
  out = np.asarray(clip_score.preprocess(image, size=16, mean=(0.0, 0.0, 0.0),
                                         std=(1.0, 1.0, 1.0)))
  assert out.shape == (1, 16, 16, 3)
  np.testing.assert_allclose(out[0, :, 3:13], np.broadcast_to([0.0, 0.0, 1.0], (16, 10, 3)),
                             atol=1e-5)
  flat = np.full((2, 20, 20, 3), 0.2, np.float32)  # a constant image stays constant
  np.testing.assert_allclose(clip_score.preprocess(flat, size=8, mean=(0.5,) * 3, std=(0.5,) * 3),
                             np.full((2, 8, 8, 3), (0.6 - 0.5) / 0.5), atol=1e-5)


def test_openclip_keys_split_the_packed_attention():
  w = np.arange(12.0).reshape(6, 2)
  out = clip_loader.openclip_to_transformers({
      "visual.transformer.resblocks.3.attn.in_proj_weight": w,
      "text_projection": np.ones((4, 2)), "transformer.resblocks.0.mlp.c_fc.bias": np.zeros(5)})
  np.testing.assert_array_equal(out["vision_model.encoder.layers.3.self_attn.q_proj.weight"], w[:2])
  np.testing.assert_array_equal(out["vision_model.encoder.layers.3.self_attn.v_proj.weight"], w[4:])
  assert out["text_projection.weight"].shape == (2, 4)
  assert "text_model.encoder.layers.0.mlp.fc1.bias" in out
  with pytest.raises(weights.WeightsError, match="unexpected tensor visual.attnpool"):
    clip_loader.openclip_to_transformers({"visual.attnpool.q": w})


# OpenCLIP's model configs (open_clip/model_configs/*.json) and the parameter counts of
# OpenCLIP's own models built from them (on PyTorch's meta device), logit_scale included.
FULL_SIZE = {
    "ViT-B-32": (dict(embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768,
                                                     patch_size=32),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=512, heads=8,
                                    layers=12)), 151_277_313),
    "ViT-L-14": (dict(embed_dim=768, vision_cfg=dict(image_size=224, layers=24, width=1024,
                                                     patch_size=14),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=768, heads=12,
                                    layers=12)), 427_616_513),
    "ViT-g-14": (dict(embed_dim=1024, vision_cfg=dict(image_size=224, layers=40, width=1408,
                                                      head_width=88, mlp_ratio=4.3637,
                                                      patch_size=14),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16,
                                    layers=24)), 1_366_678_273),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_models_have_openclips_parameter_counts(name):
  model_cfg, count = FULL_SIZE[name]
  _, vision, _, text = clip_loader.openclip_towers(model_cfg)
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves((vision, text)))
  assert ours + 1 == count  # + logit_scale


def test_bad_folders_are_one_line_errors(tmp_path):
  with pytest.raises(ValueError, match="not a folder"):
    clip_loader.load(tmp_path / "nothing")
  with pytest.raises(ValueError, match="no config.json or open_clip_config.json"):
    clip_loader.load(tmp_path)
  (tmp_path / "open_clip_config.json").write_text(
      (FIXTURES / "openclip-tiny" / "open_clip_config.json").read_text())
  with pytest.raises(ValueError, match="no open_clip_model.safetensors .*only safetensors"):
    clip_loader.load(tmp_path)
