"""Published configs of the full-size latent teachers, for sizing without weights.

The diffusers ``config.json`` fields (docs/latent.md, "Sizes") of Stable Diffusion 1.5's U-Net,
VAE and CLIP ViT-L/14 text encoder, and the diffusers equivalent of the LDM ``cin256-v2``
U-Net and VQ-f4 first stage. ``jax.eval_shape`` of the modules built from them gives parameter counts and shapes
(tests/test_latent_models.py, bench/latent_memory.py) without allocating anything.
"""

SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4,
    "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
    "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": False,
}

SD15_VAE = {
    "_class_name": "AutoencoderKL", "sample_size": 512, "in_channels": 3, "out_channels": 3,
    "latent_channels": 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32, "scaling_factor": 0.18215,
}

SD15_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "vocab_size": 49408, "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}

# LDM cin256-v2 (CompVis configs/latent-diffusion/cin256-v2.yaml) in diffusers' terms: one
# full-width attention head, a class embedding (1001 × 512, index 1000 = null) as the context.
CIN256_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 3,
    "out_channels": 3, "block_out_channels": [192, 384, 576, 960], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
    "attention_head_dim": 1, "cross_attention_dim": 512, "norm_num_groups": 32,
    "use_linear_projection": False,
}

CIN256_VQ = {
    "_class_name": "VQModel", "in_channels": 3, "out_channels": 3, "latent_channels": 3,
    "block_out_channels": [128, 256, 512], "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "num_vq_embeddings": 8192, "vq_embed_dim": 3, "norm_num_groups": 32, "scaling_factor": 1.0,
}
CIN256_CLASS_EMBEDDER = {"_class_name": "ClassEmbedder", "num_classes": 1001, "embed_dim": 512}

SD15_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def write_sd15_layout(root, *, tokenizer) -> str:
  """A full-size SD 1.5 folder of config files only (no weights) at ``root``, with the
  tokenizer folder ``tokenizer`` copied in: what ``from_config(..., shapes_only=True)`` reads
  to build the family on abstract shapes. Returns ``root`` as a string."""
  import json  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(root)
  parts = {"unet": SD15_UNET, "vae": SD15_VAE, "text_encoder": SD15_TEXT_ENCODER}
  for name, cfg in parts.items():
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "config.json").write_text(json.dumps(cfg))
  (root / "scheduler").mkdir(exist_ok=True)
  (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
  shutil.copytree(tokenizer, root / "tokenizer", dirs_exist_ok=True)
  index = {name: ["diffusers", "x"] for name in (*parts, "scheduler", "tokenizer")}
  (root / "model_index.json").write_text(json.dumps(index))
  return str(root)
