"""CompVis checkpoint → diffusers folder (``distill.latent.convert``), on tiny models.

The CompVis checkpoints are written here from tiny random diffusers / transformers models with
the CompVis key layout (``input_blocks.{1+i(L+1)+j}.0.in_layers.0``, ``encoder.down.i.block.j``,
4-D ``mid.attn_1.q``, ``cond_stage_model.transformer.text_model.*``, …); the converter maps them
back with diffusers' own conversion. The round trip must give every original tensor exactly, and
the folder must load with ``load_pretrained`` and reproduce the torch U-Net.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from safetensors.numpy import load_file  # pylint: disable=wrong-import-position

from distill.latent import convert, load_pretrained  # pylint: disable=wrong-import-position
from distill.latent import schedule as schedule_lib  # pylint: disable=wrong-import-position

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "latent"

LAYERS = 1  # num_res_blocks of the tiny models
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(key: str, up_attention_levels: set[int]) -> str:
  """A diffusers U-Net key → its CompVis ``model.diffusion_model.*`` key."""
  l1 = LAYERS + 1
  fixed = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0",
           "conv_out": "out.2"}
  for old, new in fixed.items():
    if key.startswith(old + "."):
      return "model.diffusion_model." + new + key[len(old):]

  def resnet(rest):
    name, tail = rest.split(".", 1)
    return f"{RESNET[name]}.{tail}"

  if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
    i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    block = f"input_blocks.{1 + i * l1 + j}"
    out = f"{block}.0.{resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
  elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
    out = f"input_blocks.{(int(m[1]) + 1) * l1}.0.op.{m[2]}"
  elif m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
    kind, j, rest = m[1], int(m[2]), m[3]
    out = (f"middle_block.{2 * j}.{resnet(rest)}" if kind == "resnets"
           else f"middle_block.1.{rest}")
  elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
    i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    block = f"output_blocks.{i * l1 + j}"
    out = f"{block}.0.{resnet(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
  elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
    i = int(m[1])
    slot = 2 if i in up_attention_levels else 1
    out = f"output_blocks.{i * l1 + LAYERS}.{slot}.conv.{m[2]}"
  else:
    raise KeyError(key)
  return "model.diffusion_model." + out


def vae_to_ldm(key: str, num_levels: int) -> str:
  """A diffusers AutoencoderKL / VQModel key → its CompVis ``first_stage_model.*`` key."""
  vae_resnet = {"conv_shortcut": "nin_shortcut"}
  attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
  k = key
  if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(.*)", k):
    k = f"{m[1]}.mid.block_{int(m[2]) + 1}.{vae_resnet.get(m[3], m[3])}.{m[4]}"
  elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", k):
    k = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
  elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", k):
    k = f"encoder.down.{m[1]}.block.{m[2]}.{vae_resnet.get(m[3], m[3])}.{m[4]}"
  elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", k):
    k = f"encoder.down.{m[1]}.downsample.{m[2]}"
  elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(.*)", k):
    k = f"decoder.up.{num_levels - 1 - int(m[1])}.block.{m[2]}.{vae_resnet.get(m[3], m[3])}.{m[4]}"
  elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", k):
    k = f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.{m[2]}"
  elif m := re.match(r"(encoder|decoder)\.conv_norm_out\.(.*)", k):
    k = f"{m[1]}.norm_out.{m[2]}"
  return "first_stage_model." + k


UNET_KW = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=LAYERS,
               block_out_channels=(32, 64), attention_head_dim=2, cross_attention_dim=64,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
AE_KW = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=LAYERS,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             sample_size=16)


def original_yaml(*, first_stage: str, cond: str, latent_channels: int, num_res_blocks=LAYERS):
  dd = dict(double_z=first_stage == "AutoencoderKL", z_channels=latent_channels, resolution=16,
            in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=LAYERS,
            attn_resolutions=[], dropout=0.0)
  fs_params = {"embed_dim": latent_channels, "ddconfig": dd}
  if first_stage == "VQModelInterface":
    fs_params["n_embed"] = 16
  cond_cfg = ({"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
              if cond == "clip" else
              {"target": "ldm.modules.encoders.modules.ClassEmbedder",
               "params": {"embed_dim": 64, "n_classes": 11}})
  return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
      "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 8,
      "channels": latent_channels, "scale_factor": 0.18215 if cond == "clip" else 1.0,
      "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
          "image_size": 8, "in_channels": latent_channels, "out_channels": latent_channels,
          "model_channels": 32, "attention_resolutions": [1], "num_res_blocks": num_res_blocks,
          "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
          "transformer_depth": 1, "context_dim": 64, "legacy": False}},
      "first_stage_config": {"target": f"ldm.models.autoencoder.{first_stage}",
                             "params": fs_params},
      "cond_stage_config": cond_cfg}}}


def _randomise(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  return model.eval()


def _ldm_state_dict(unet, first_stage, *, text=None, class_table=None):
  up_attn = {i for i, t in enumerate(UNET_KW["up_block_types"]) if t.startswith("CrossAttn")}
  sd = {unet_to_ldm(k, up_attn): v for k, v in unet.state_dict().items()}
  for k, v in first_stage.state_dict().items():
    ldm = vae_to_ldm(k, len(AE_KW["block_out_channels"]))
    sd[ldm] = v[:, :, None, None] if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", ldm) else v
  if text is not None:
    for k, v in text.state_dict().items():
      sd["cond_stage_model.transformer.text_model." + k.removeprefix("text_model.")] = v
  if class_table is not None:
    sd[convert.CLASS_KEY] = class_table
  # What a CompVis Lightning checkpoint also carries, which the converter must leave out.
  sd["first_stage_model.loss.logvar"] = torch.zeros(())
  return {k: v.clone().contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def sd_models():
  unet = _randomise(diffusers.UNet2DConditionModel(**UNET_KW), 0)
  vae = _randomise(diffusers.AutoencoderKL(**AE_KW, latent_channels=4), 1)
  vocab = json.loads((FIXTURES / "tiny-sd" / "tokenizer" / "vocab.json").read_text())
  text = _randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(vocab) + 2, hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
      intermediate_size=128, max_position_embeddings=77, hidden_act="quick_gelu")), 2)
  return unet, vae, text


def _write(tmp_path, sd, original, suffix):
  ckpt = tmp_path / f"model{suffix}"
  if suffix == ".ckpt":
    torch.save({"state_dict": sd, "global_step": 7}, ckpt)
  else:
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
    save_file(sd, str(ckpt))
  config = tmp_path / "original.yaml"
  config.write_text(yaml.safe_dump(original))
  return ckpt, config


def _assert_same_tensors(folder, model):
  got = {}
  for f in sorted(folder.glob("*.safetensors")):
    got.update(load_file(str(f)))
  want = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
  got = {k.removeprefix("text_model."): v for k, v in got.items()
         if not k.endswith("position_ids")}
  want = {k.removeprefix("text_model."): v for k, v in want.items()}
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_stable_diffusion_checkpoint_round_trips(tmp_path, sd_models, suffix):
  unet, vae, text = sd_models
  ckpt, config = _write(tmp_path, _ldm_state_dict(unet, vae, text=text),
                        original_yaml(first_stage="AutoencoderKL", cond="clip", latent_channels=4),
                        suffix)
  out = convert.convert(ckpt, config, tmp_path / "out",
                        tokenizer=FIXTURES / "tiny-sd" / "tokenizer")
  _assert_same_tensors(out / "unet", unet)
  _assert_same_tensors(out / "vae", vae)
  _assert_same_tensors(out / "text_encoder", text)
  assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215
  schedule = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
  assert schedule["prediction_type"] == "epsilon"
  # LDM's "linear" betas are linspace(√0.00085, √0.012, 1000)²: diffusers' scaled_linear.
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
  np.testing.assert_allclose(schedule_lib.DiscreteSchedule.from_config(schedule).alphas_cumprod,
                             np.cumprod(1 - betas), rtol=1e-12)

  models = load_pretrained(out)
  rng = np.random.default_rng(0)
  latents = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  ids = models.tokenizer(["a photo of a cat", "a cat"])
  context = np.asarray(models.encode_prompt(["a photo of a cat", "a cat"]))
  with torch.no_grad():
    want_ctx = text(torch.as_tensor(np.asarray(ids), dtype=torch.long)).last_hidden_state.numpy()
    want = unet(torch.from_numpy(latents.transpose(0, 3, 1, 2)), torch.tensor([10, 900]),
                encoder_hidden_states=torch.from_numpy(context.copy())).sample.numpy()
  with jax.default_matmul_precision("highest"):
    got = np.asarray(models.unet_apply(latents, np.array([10, 900]), context))
  np.testing.assert_allclose(context, want_ctx, atol=5e-5)
  np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), atol=5e-5)


def test_class_conditional_ldm_checkpoint_round_trips(tmp_path):
  unet = _randomise(diffusers.UNet2DConditionModel(**{**UNET_KW, "in_channels": 3,
                                                      "out_channels": 3}), 3)
  vq = _randomise(diffusers.VQModel(**AE_KW, latent_channels=3, num_vq_embeddings=16,
                                    vq_embed_dim=3), 4)
  table = torch.randn(11, 64, generator=torch.Generator().manual_seed(5))
  ckpt, config = _write(tmp_path, _ldm_state_dict(unet, vq, class_table=table),
                        original_yaml(first_stage="VQModelInterface", cond="class",
                                      latent_channels=3), ".ckpt")
  out = convert.convert(ckpt, config, tmp_path / "out")
  _assert_same_tensors(out / "unet", unet)
  _assert_same_tensors(out / "vqvae", vq)
  models = load_pretrained(out)
  np.testing.assert_array_equal(np.asarray(models.encode_class(np.array([3, 10])))[:, 0],
                                table.numpy()[[3, 10]])
  assert models.vqvae_params is not None and models.text_encoder is None


def test_converter_errors_leave_nothing_behind(tmp_path, sd_models):
  unet, vae, text = sd_models
  sd = _ldm_state_dict(unet, vae, text=text)
  good = original_yaml(first_stage="AutoencoderKL", cond="clip", latent_channels=4)
  ckpt, config = _write(tmp_path, sd, good, ".ckpt")
  tok = FIXTURES / "tiny-sd" / "tokenizer"
  with pytest.raises(convert.ConversionError, match="--tokenizer"):
    convert.convert(ckpt, config, tmp_path / "a")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("")
  with pytest.raises(convert.ConversionError, match="--output=.* not empty"):
    convert.convert(ckpt, config, tmp_path / "full", tokenizer=tok)
  config.write_text(yaml.safe_dump({"model": {"params": {
      **good["model"]["params"],
      "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"}}}}))
  with pytest.raises(convert.ConversionError, match="'FrozenOpenCLIPEmbedder' is not supported"):
    convert.convert(ckpt, config, tmp_path / "d", tokenizer=tok)
  config.write_text(yaml.safe_dump(good))
  with pytest.raises(convert.ConversionError, match="--checkpoint=.*no such file"):
    convert.convert(tmp_path / "nope.ckpt", config, tmp_path / "b", tokenizer=tok)
  # A YAML that does not describe the checkpoint (two resnets per level instead of one).
  config.write_text(yaml.safe_dump(original_yaml(first_stage="AutoencoderKL", cond="clip",
                                                 latent_channels=4, num_res_blocks=2)))
  with pytest.raises(convert.ConversionError, match="unet: the checkpoint does not fit"):
    convert.convert(ckpt, config, tmp_path / "c", tokenizer=tok)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "model.ckpt", "original.yaml"]
