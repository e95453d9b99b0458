"""CompVis LDM / Stable Diffusion checkpoint → diffusers-layout folder (the one place torch is used).

    python -m distill.latent.convert --checkpoint=model.ckpt \
        --original_config=v1-inference.yaml --output=/path/to/folder [--tokenizer=DIR]

The checkpoint is a CompVis ``.ckpt`` (read with ``torch.load(weights_only=True)``, which refuses
arbitrary pickled code) or a ``.safetensors`` file of the same keys; ``--original_config`` is the
model's CompVis YAML (``configs/stable-diffusion/v1-inference.yaml``,
``configs/latent-diffusion/cin256-v2.yaml``). The key renaming is diffusers' own single-file
conversion (``diffusers.loaders.single_file_utils``); every part is then loaded strictly into its
diffusers / transformers model and saved with ``save_pretrained(safe_serialization=True)``, so the
output is exactly what ``distill.latent.load_pretrained`` reads. Supported:

* U-Net: ``model.diffusion_model.*`` (EMA weights ``model_ema.*`` when present, unless
  ``--noextract_ema``);
* first stage: ``AutoencoderKL`` → ``vae/``, or ``VQModelInterface`` (LDM cin256-v2) → ``vqvae/``;
* conditioning: ``FrozenCLIPEmbedder`` (SD 1.x) → ``text_encoder/`` (+ ``tokenizer/`` copied from
  ``--tokenizer``, since a checkpoint holds no vocabulary), or ``ClassEmbedder`` →
  ``class_embedder/``;
* ``scheduler/``: LDM's "linear" betas (diffusers' ``scaled_linear``), ``parameterization``
  ``eps`` → ``epsilon``, ``v`` → ``v_prediction``.

Weights are written in float32. The folder is assembled next to ``--output`` and renamed into
place only when complete, so a failed conversion leaves nothing a later run would trust.
Needs the ``convert`` extra: ``pip install -e '.[convert]'``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Any, Mapping

from absl import app, flags
from etils import epath

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "CompVis .ckpt or .safetensors file.")
_ORIGINAL_CONFIG = flags.DEFINE_string("original_config", None, "The model's CompVis YAML.")
_OUTPUT = flags.DEFINE_string("output", None, "Folder to write (must not exist, or be empty).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Folder with the CLIP tokenizer files (vocab.json + merges.txt or "
    "tokenizer.json), copied to output/tokenizer for a text-conditioned model.")
_EXTRACT_EMA = flags.DEFINE_bool("extract_ema", True,
                                 "Use the EMA weights (model_ema.*) when the checkpoint has them.")
_TEXT_HEADS = flags.DEFINE_integer(
    "text_encoder_heads", None, "Attention heads of the CLIP text encoder (default: width / 64, "
    "as OpenAI CLIP: 12 for SD 1.x).")

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
CLASS_KEY = "cond_stage_model.embedding.weight"


class ConversionError(ValueError):
  pass


def _target(section: Mapping[str, Any]) -> str:
  return str(section.get("target", "")).rsplit(".", 1)[-1]


def _require_torch():
  try:
    import diffusers  # pylint: disable=import-outside-toplevel,unused-import
    import torch  # pylint: disable=import-outside-toplevel,unused-import
    import transformers  # pylint: disable=import-outside-toplevel,unused-import
    import yaml  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ConversionError(f"the converter needs torch, diffusers, transformers and pyyaml "
                          f"({e}); install them with pip install -e '.[convert]'.") from e


def check_inputs(checkpoint, original_config, output, tokenizer=None) -> None:
  """One-line errors for bad arguments, before anything is read."""
  for flag, value in (("--checkpoint", checkpoint), ("--original_config", original_config),
                      ("--output", output)):
    if not value:
      raise ConversionError(f"{flag} is required.")
  checkpoint, output = epath.Path(checkpoint), epath.Path(output)
  if not checkpoint.is_file():
    raise ConversionError(f"--checkpoint={checkpoint}: no such file.")
  if checkpoint.suffix not in (".ckpt", ".safetensors", ".pt", ".pth"):
    raise ConversionError(f"--checkpoint={checkpoint}: expected a .ckpt or .safetensors file.")
  if not epath.Path(original_config).is_file():
    raise ConversionError(f"--original_config={original_config}: no such file; pass the "
                          "model's CompVis YAML (e.g. configs/stable-diffusion/v1-inference.yaml).")
  if output.exists() and any(output.iterdir()):
    raise ConversionError(f"--output={output} exists and is not empty; choose a new folder.")
  if tokenizer is not None and not epath.Path(tokenizer).is_dir():
    raise ConversionError(f"--tokenizer={tokenizer}: no such folder.")


def read_state_dict(path) -> dict:
  """The checkpoint's tensors (torch), without unpickling code."""
  import torch  # pylint: disable=import-outside-toplevel
  path = epath.Path(path)
  if path.suffix == ".safetensors":
    from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
    return load_file(str(path))
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"--checkpoint={path}: torch.load(weights_only=True) failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0]}).") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"--checkpoint={path}: holds a {type(obj).__name__}, not a state dict.")
  return dict(obj)


def _load_strict(model, state_dict: Mapping, what: str, ignore=("position_ids",)):
  try:
    missing, unexpected = model.load_state_dict(dict(state_dict), strict=False)
  except RuntimeError as e:  # shape mismatches
    first = [line.strip() for line in str(e).splitlines() if "size mismatch" in line][:1]
    raise ConversionError(f"{what}: the checkpoint does not fit the model built from the YAML "
                          f"({first[0] if first else str(e).splitlines()[0]}).") from None
  missing = [k for k in missing if not k.endswith(ignore)]
  unexpected = [k for k in unexpected if not k.endswith(ignore)]
  if missing or unexpected:
    raise ConversionError(f"{what}: the checkpoint does not fit the model built from the YAML "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
  return model


def _check_no_leftovers(state_dict: Mapping, prefix: str, used: int, what: str):
  have = sum(1 for k in state_dict if k.startswith(prefix))
  if have != used:
    raise ConversionError(f"{what}: {have} checkpoint tensors under {prefix!r} but {used} were "
                          "converted; the YAML does not describe this checkpoint.")


def convert_unet(sd: Mapping, original: Mapping, *, latent_size: int, extract_ema: bool):
  from diffusers import UNet2DConditionModel  # pylint: disable=import-outside-toplevel
  from diffusers.loaders import single_file_utils as sfu  # pylint: disable=import-outside-toplevel
  if not any(k.startswith(UNET_PREFIX) for k in sd):
    raise ConversionError(f"--checkpoint: no {UNET_PREFIX}* tensors; not an LDM checkpoint.")
  config = sfu.create_unet_diffusers_config_from_ldm(original, sd)
  config["sample_size"] = latent_size
  converted = sfu.convert_ldm_unet_checkpoint(sd, config, extract_ema=extract_ema)
  _check_no_leftovers({k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}, UNET_PREFIX,
                      len(converted), "unet")
  return _load_strict(UNet2DConditionModel(**config), converted, "unet")


def convert_first_stage(sd: Mapping, original: Mapping, *, latent_size: int):
  from diffusers import AutoencoderKL, VQModel  # pylint: disable=import-outside-toplevel
  from diffusers.loaders import single_file_utils as sfu  # pylint: disable=import-outside-toplevel
  section = original["model"]["params"]["first_stage_config"]
  kind, params = _target(section), section.get("params", {})
  dd = params["ddconfig"]
  blocks = [int(dd["ch"]) * int(m) for m in dd["ch_mult"]]
  image_size = latent_size * 2 ** (len(blocks) - 1)
  scale = float(original["model"]["params"].get("scale_factor", 1.0))
  common = dict(in_channels=int(dd["in_channels"]), out_channels=int(dd["out_ch"]),
                down_block_types=["DownEncoderBlock2D"] * len(blocks),
                up_block_types=["UpDecoderBlock2D"] * len(blocks), block_out_channels=blocks,
                layers_per_block=int(dd["num_res_blocks"]), latent_channels=int(dd["z_channels"]),
                sample_size=image_size, scaling_factor=scale)
  converted = sfu.convert_ldm_vae_checkpoint(sd, common)
  n_used = len(converted)
  if kind == "AutoencoderKL":
    if int(params.get("embed_dim", dd["z_channels"])) != int(dd["z_channels"]):
      raise ConversionError("first_stage_config: embed_dim != z_channels is not supported.")
    model = _load_strict(AutoencoderKL(**common), converted, "vae")
    name = "vae"
  elif kind in ("VQModelInterface", "VQModel"):
    key = "first_stage_model.quantize.embedding.weight"
    if key not in sd:
      raise ConversionError(f"first stage VQModel: the checkpoint has no {key}.")
    converted["quantize.embedding.weight"] = sd[key]
    n_used += 1
    model = _load_strict(VQModel(**common, num_vq_embeddings=int(params["n_embed"]),
                                 vq_embed_dim=int(params["embed_dim"])), converted, "vqvae")
    name = "vqvae"
  else:
    raise ConversionError(f"first_stage_config.target {section.get('target')!r} is not "
                          "supported (AutoencoderKL or VQModelInterface).")
  # The autoencoder's training losses (discriminator, LPIPS) are not part of the model.
  _check_no_leftovers({k: v for k, v in sd.items() if not k.startswith("first_stage_model.loss.")},
                      "first_stage_model.", n_used, name)
  return name, model


def convert_text_encoder(sd: Mapping, *, heads: int | None):
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=import-outside-toplevel
  tensors = {}
  for key, value in sd.items():
    if key.startswith(CLIP_PREFIX):
      key = key[len(CLIP_PREFIX):]
      tensors[key[len("text_model."):] if key.startswith("text_model.") else key] = value
  if not tensors:
    raise ConversionError(f"cond_stage_config FrozenCLIPEmbedder: no {CLIP_PREFIX}* tensors.")
  vocab, width = tensors["embeddings.token_embedding.weight"].shape
  layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("encoder.layers."))
  heads = heads or width // 64
  if not heads or width % heads:
    raise ConversionError(f"text encoder width {width}: pass --text_encoder_heads (a divisor).")
  config = CLIPTextConfig(
      vocab_size=int(vocab), hidden_size=int(width), num_hidden_layers=layers,
      num_attention_heads=int(heads),
      intermediate_size=int(tensors["encoder.layers.0.mlp.fc1.weight"].shape[0]),
      max_position_embeddings=int(tensors["embeddings.position_embedding.weight"].shape[0]),
      hidden_act="quick_gelu", layer_norm_eps=1e-5,
      # The values of SD 1.x's text_encoder/config.json.
      bos_token_id=0, eos_token_id=2, pad_token_id=1)
  model = CLIPTextModel(config)
  prefixed = any(k.startswith("text_model.") for k in model.state_dict())
  return _load_strict(model, {("text_model." + k if prefixed else k): v
                              for k, v in tensors.items()}, "text_encoder")


def scheduler_config(original: Mapping) -> dict:
  params = original["model"]["params"]
  schedule = params.get("beta_schedule", "linear")
  if schedule != "linear":
    raise ConversionError(f"model.params.beta_schedule={schedule!r} is not supported (LDM's "
                          "'linear', i.e. diffusers' scaled_linear).")
  parameterization = params.get("parameterization", "eps")
  kinds = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
  if parameterization not in kinds:
    raise ConversionError(f"model.params.parameterization={parameterization!r} is not one of "
                          f"{sorted(kinds)}.")
  return {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
          "beta_start": float(params.get("linear_start", 0.00085)),
          "beta_end": float(params.get("linear_end", 0.012)),
          "num_train_timesteps": int(params.get("timesteps", 1000)),
          "prediction_type": kinds[parameterization], "clip_sample": False,
          "set_alpha_to_one": False, "steps_offset": 1}


def convert(checkpoint, original_config, output, *, tokenizer=None, extract_ema: bool = True,
            text_encoder_heads: int | None = None) -> epath.Path:
  """Converts a CompVis checkpoint (see module docstring); returns the output folder."""
  check_inputs(checkpoint, original_config, output, tokenizer)
  _require_torch()
  import yaml  # pylint: disable=import-outside-toplevel
  original = yaml.safe_load(epath.Path(original_config).read_text())
  try:
    params = original["model"]["params"]
    cond = _target(params["cond_stage_config"])
    latent_size = int(params["image_size"])
  except (KeyError, TypeError) as e:
    raise ConversionError(f"--original_config: no model.params.{e} ; expected a CompVis "
                          "LatentDiffusion YAML.") from e
  if cond not in ("FrozenCLIPEmbedder", "ClassEmbedder"):
    raise ConversionError(f"cond_stage_config.target {cond!r} is not supported "
                          "(FrozenCLIPEmbedder or ClassEmbedder).")
  if cond == "FrozenCLIPEmbedder" and tokenizer is None:
    raise ConversionError("a text-conditioned checkpoint holds no vocabulary: pass --tokenizer="
                          "DIR with the CLIP tokenizer files (e.g. the tokenizer/ folder of a "
                          "diffusers Stable Diffusion 1.x repository).")
  scheduler = scheduler_config(original)
  sd = read_state_dict(checkpoint)
  parts = {"unet": convert_unet(sd, original, latent_size=latent_size, extract_ema=extract_ema)}
  name, parts[name] = convert_first_stage(sd, original, latent_size=latent_size)
  index = {"unet": ["diffusers", "UNet2DConditionModel"],
           name: ["diffusers", type(parts[name]).__name__]}
  if cond == "FrozenCLIPEmbedder":
    parts["text_encoder"] = convert_text_encoder(sd, heads=text_encoder_heads)
    index.update(text_encoder=["transformers", "CLIPTextModel"],
                 tokenizer=["transformers", "CLIPTokenizer"])
    class_name = "StableDiffusionPipeline"
  else:
    if CLASS_KEY not in sd:
      raise ConversionError(f"cond_stage_config ClassEmbedder: the checkpoint has no {CLASS_KEY}.")
    index["class_embedder"] = ["distill", "ClassEmbedder"]
    class_name = "ClassConditionalLDM"
  index["scheduler"] = ["diffusers", "DDIMScheduler"]

  output = epath.Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  staging = epath.Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=str(output.parent)))
  try:
    for part, model in parts.items():
      model.save_pretrained(str(staging / part), safe_serialization=True)
    if cond == "ClassEmbedder":
      from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
      table = sd[CLASS_KEY].float().contiguous()
      (staging / "class_embedder").mkdir()
      save_file({"embedding.weight": table}, str(staging / "class_embedder" / "model.safetensors"))
      (staging / "class_embedder" / "config.json").write_text(json.dumps(
          {"_class_name": "ClassEmbedder", "num_classes": int(table.shape[0]),
           "embed_dim": int(table.shape[1])}, indent=2))
    if tokenizer is not None:
      shutil.copytree(str(tokenizer), str(staging / "tokenizer"))
    (staging / "scheduler").mkdir()
    (staging / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler, indent=2))
    (staging / "model_index.json").write_text(
        json.dumps({"_class_name": class_name, **index}, indent=2))
    if output.exists():
      output.rmdir()  # empty (checked above)
    staging.rename(output)
  except BaseException:
    shutil.rmtree(str(staging), ignore_errors=True)
    raise
  return output


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from distill import cli, paths  # pylint: disable=import-outside-toplevel
  local = lambda flag: paths.resolve(flag.value) if flag.value else flag.value
  out = cli.run_cli(convert, local(_CHECKPOINT), local(_ORIGINAL_CONFIG), local(_OUTPUT),
                    tokenizer=local(_TOKENIZER), extract_ema=_EXTRACT_EMA.value,
                    text_encoder_heads=_TEXT_HEADS.value)  # ConversionError: one line
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
