"""Latent-space models against diffusers/transformers outputs stored by
tests/fixtures/make_latent_fixtures.py (parity), weight-import errors, the tokenizer, and the
parameter counts of the full-size models."""

import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from distill.latent import clip, pretrained, reference_configs, unet, vae, weights
from distill.latent import tokenizer as tokenizer_lib

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "latent"
TOL = 5e-5


def nhwc(a):
  return np.transpose(a, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "outputs.npz"))


@pytest.fixture(scope="module")
def sd():
  return pretrained.load_pretrained(FIXTURES / "tiny-sd")


@pytest.fixture(autouse=True)
def highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _max_err(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)))


def test_text_unet_matches_diffusers(sd, ref):
  out = sd.unet_apply(nhwc(ref["latents"]), ref["timesteps"], ref["context"])
  assert _max_err(out, nhwc(ref["unet_out"])) <= TOL
  assert np.abs(ref["unet_out"]).max() > 0.1  # a real signal, not zeros


@pytest.mark.parametrize("name", ["unet-inpaint", "unet-lcm"])
def test_unet_variants_match_diffusers(ref, name):
  models = pretrained.load_pretrained(FIXTURES / name)
  extra = {"timestep_cond": ref[f"{name}_timestep_cond"]} if name == "unet-lcm" else {}
  out = models.unet_apply(nhwc(ref[f"{name}_sample"]), ref["timesteps"], ref[f"{name}_context"],
                          **extra)
  assert _max_err(out, nhwc(ref[f"{name}_out"])) <= TOL
  if name == "unet-lcm":  # the condition matters
    other = models.unet_apply(nhwc(ref[f"{name}_sample"]), ref["timesteps"],
                              ref[f"{name}_context"], timestep_cond=0 * extra["timestep_cond"])
    assert _max_err(other, nhwc(ref[f"{name}_out"])) > 1e-3
    with pytest.raises(ValueError, match="timestep_cond"):
      models.unet_apply(nhwc(ref[f"{name}_sample"]), ref["timesteps"], ref[f"{name}_context"])


def test_class_conditional_ldm_matches_diffusers(ref):
  """VQ first stage (pre-quantisation latents; decode quantises), class context, U-Net."""
  cin = pretrained.load_pretrained(FIXTURES / "tiny-cin")
  latents = cin.encode_image(nhwc(ref["cin_images"]))
  assert _max_err(latents, nhwc(ref["cin_latents"])) <= TOL
  context = cin.encode_class(ref["cin_labels"])
  assert context.shape == (2, 1, 12) and _max_err(context, ref["cin_context"]) <= TOL
  assert _max_err(cin.decode_latents(latents), nhwc(ref["cin_decoded"])) <= TOL
  out = cin.unet_apply(latents, ref["timesteps"], context)
  assert _max_err(out, nhwc(ref["cin_unet_out"])) <= TOL
  # Decoding quantises: without it the images differ.
  unquantised = cin.vqvae.apply({"params": cin.vqvae_params}, latents, True,
                                method=vae.VQModel.decode)
  assert _max_err(unquantised, nhwc(ref["cin_decoded"])) > 1e-3
  assert cin.schedule.logsnr_table[-1] == pytest.approx(-8.857, abs=2e-3)


@pytest.mark.parametrize("name", ["unet-fp16", "unet-bf16"])
def test_half_precision_files_load(ref, name):
  models = pretrained.load_pretrained(FIXTURES / name)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(models.unet_params))
  out = models.unet_apply(nhwc(ref["latents"]), ref["timesteps"], ref["context"])
  assert _max_err(out, nhwc(ref[f"{name}_out"])) <= TOL


def test_vae_matches_diffusers_with_old_attention_names(sd, ref):
  keys = load_file(str(FIXTURES / "tiny-sd" / "vae" / "diffusion_pytorch_model.safetensors"))
  assert any(".query." in k for k in keys)  # the file carries the pre-0.14 names
  mean, logvar = sd.vae.apply({"params": sd.vae_params}, nhwc(ref["images"]),
                              method=vae.AutoencoderKL.encode)
  assert _max_err(mean, nhwc(ref["vae_mean"])) <= TOL
  assert _max_err(logvar, nhwc(ref["vae_logvar"])) <= TOL
  scaled = sd.encode_image(nhwc(ref["images"]))
  np.testing.assert_allclose(np.asarray(scaled), 0.18215 * np.asarray(mean), atol=1e-6)
  assert _max_err(sd.decode_latents(scaled), nhwc(ref["vae_decoded"])) <= TOL
  draw = sd.encode_image(nhwc(ref["images"]), rng=jax.random.key(0))
  assert draw.shape == scaled.shape and _max_err(draw, np.asarray(scaled)) > 1e-4


def test_text_encoder_and_tokenizer_match_transformers(sd, ref):
  ids = sd.tokenizer(["a photo of a cat", "A  PHOTO of a   cat!", "", "cat photo of a photo"])
  np.testing.assert_array_equal(ids, ref["prompts_ids"])
  context = sd.encode_prompt(["a photo of a cat", "A  PHOTO of a   cat!", "",
                              "cat photo of a photo"])
  assert context.shape == (4, 77, 16)
  assert _max_err(context, ref["text_last_hidden_state"]) <= TOL


def test_tokenizer_from_bpe_files_and_padding(tmp_path, ref):
  folder = tmp_path / "tokenizer"
  shutil.copytree(FIXTURES / "tiny-sd" / "tokenizer", folder)
  (folder / "tokenizer.json").unlink()
  tok = tokenizer_lib.CLIPTokenizer(folder)
  np.testing.assert_array_equal(
      tok(["a photo of a cat", "A  PHOTO of a   cat!", "", "cat photo of a photo"]),
      ref["prompts_ids"])
  vocab = json.loads((folder / "vocab.json").read_text())
  bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
  np.testing.assert_array_equal(tok("")[0], [bos] + [eos] * 76)  # SD's empty prompt
  long = tok(" ".join(["photo"] * 100))[0]
  assert long.shape == (77,) and long[0] == bos and long[-1] == eos and long[-2] == vocab[
      "photo</w>"]
  (folder / "vocab.json").unlink()
  with pytest.raises(FileNotFoundError, match="tokenizer.json or vocab.json"):
    tokenizer_lib.CLIPTokenizer(folder)


def _real_clip_bpe():
  for package, sub in (("open_clip", "bpe_simple_vocab_16e6.txt.gz"),
                       ("clip", "bpe_simple_vocab_16e6.txt.gz")):
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
      if (pathlib.Path(root) / sub).exists():
        return pathlib.Path(root) / sub
  return None


@pytest.mark.skipif(_real_clip_bpe() is None,
                    reason="the CLIP BPE file (open_clip_torch or clip-anytorch wheel) is absent")
def test_real_clip_vocabulary(tmp_path):
  """The published ids of "a photo of a cat" from the real 49,408-token vocabulary."""
  import gzip  # pylint: disable=import-outside-toplevel
  lines = gzip.open(_real_clip_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
  merges = [tuple(line.split()) for line in lines]
  chars = tokenizer_lib.byte_alphabet()
  vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  assert len(vocab) == 49408
  (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
  ids = tokenizer_lib.CLIPTokenizer(tmp_path)("a photo of a cat")[0]
  np.testing.assert_array_equal(ids[:7], [49406, 320, 1125, 539, 320, 2368, 49407])
  assert (ids[7:] == 49407).all()


def test_denoise_fn_on_the_folders_schedule(sd, ref):
  """x̂ = (z − σ ε̂)/α at the interpolated log-SNR of the fractional timestep, in float64."""
  z = nhwc(ref["latents"])
  timesteps = ref["timesteps"].astype(np.float64)
  t = (timesteps + 1) / 1000
  x_hat = sd.denoise_fn(ref["context"])(jnp.asarray(z), jnp.asarray(t, jnp.float32))
  lam_table = sd.schedule.logsnr_table
  lam = np.interp(timesteps, np.arange(1000), lam_table)[:, None, None, None]
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  expected = (z - sigma * nhwc(ref["unet_out"])) / alpha
  np.testing.assert_allclose(np.asarray(x_hat), expected, rtol=1e-4, atol=1e-3)
  assert sd.prediction_type == "epsilon"


# Weight-import errors, on copies of the LCM U-Net folder.
def _edited_unet(tmp_path, edit):
  folder = tmp_path / "unet"
  shutil.copytree(FIXTURES / "unet-lcm", folder)
  path = folder / "diffusion_pytorch_model.safetensors"
  tensors = load_file(str(path))
  edit(tensors)
  save_file(tensors, str(path))
  return folder


def test_missing_tensor_is_named(tmp_path):
  folder = _edited_unet(tmp_path, lambda t: t.pop("time_embedding.cond_proj.weight"))
  with pytest.raises(weights.WeightsError,
                     match=r"missing from the file, first time_embedding_cond_proj/kernel \(6, 8\)"):
    pretrained.load_unet(folder)


def test_unexpected_tensor_is_named(tmp_path):
  def add(t):
    t["mid_block.attentions.0.extra.weight"] = np.zeros((3, 3), np.float32)
  folder = _edited_unet(tmp_path, add)
  with pytest.raises(weights.WeightsError,
                     match=r"unexpected tensor mid_block\.attentions\.0\.extra\.weight \(3, 3\)"):
    pretrained.load_unet(folder)


def test_shape_mismatch_names_both_shapes(tmp_path):
  def widen(t):
    t["conv_in.weight"] = np.zeros((8, 5, 3, 3), np.float32)
  folder = _edited_unet(tmp_path, widen)
  with pytest.raises(weights.WeightsError,
                     match=r"conv_in\.weight: the file's tensor has shape \(3, 3, 5, 8\).*"
                           r"expects \(3, 3, 4, 8\)"):
    pretrained.load_unet(folder)


def test_pickled_weights_are_refused_and_configs_checked(tmp_path):
  folder = tmp_path / "unet"
  folder.mkdir()
  shutil.copy(FIXTURES / "unet-lcm" / "config.json", folder)
  (folder / "diffusion_pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(weights.WeightsError, match="only pickled weights"):
    pretrained.load_unet(folder)
  config = json.loads((FIXTURES / "unet-lcm" / "config.json").read_text())
  with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
    unet.UNetConfig.from_diffusers(dict(config, class_embed_type="timestep"))
  with pytest.raises(ValueError, match="down_block_types"):
    unet.UNetConfig.from_diffusers(dict(config, down_block_types=["SimpleCrossAttnDownBlock2D",
                                                                  "DownBlock2D"]))
  with pytest.raises(FileNotFoundError, match="neither model_index.json nor config.json"):
    pretrained.load_pretrained(tmp_path)


def _count(module, *args):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_full_size_parameter_counts():
  """Exact counts of the full-size models (docs/latent.md, BENCHMARKS.md), and the published
  sizes: SD 1.5 U-Net 859.5 M, text encoder 123.1 M, VAE 83.7 M."""
  u = unet.UNet2DConditionModel(unet.UNetConfig.from_diffusers(reference_configs.SD15_UNET))
  n_unet = _count(u, jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 768)))
  t = clip.CLIPTextTransformer(
      clip.CLIPTextConfig.from_transformers(reference_configs.SD15_TEXT_ENCODER))
  n_text = _count(t, jnp.zeros((1, 77), jnp.int32))
  v = vae.AutoencoderKL(vae.VAEConfig.from_diffusers(reference_configs.SD15_VAE))
  n_vae = _count(v, jnp.zeros((1, 64, 64, 3)))
  c = unet.UNet2DConditionModel(unet.UNetConfig.from_diffusers(reference_configs.CIN256_UNET))
  n_cin = _count(c, jnp.zeros((1, 64, 64, 3)), jnp.zeros((1,)), jnp.zeros((1, 1, 512)))
  q = vae.VQModel(vae.VQConfig.from_diffusers(reference_configs.CIN256_VQ))
  n_vq = _count(q, jnp.zeros((1, 16, 16, 3)))
  print(f"SD 1.5 U-Net {n_unet:,}, text encoder {n_text:,}, VAE {n_vae:,}; "
        f"cin256 U-Net {n_cin:,}, VQ-f4 {n_vq:,}")
  assert n_unet == 859_520_964 and round(n_unet / 1e6, 1) == 859.5
  assert n_text == 123_060_480 and round(n_text / 1e6, 1) == 123.1
  assert n_vae == 83_653_863 and round(n_vae / 1e6, 1) == 83.7
  assert n_cin == 400_920_579
  assert n_vq == 55_322_782
