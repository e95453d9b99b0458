"""ε→v fine-tuning of a latent teacher (paper §4.2), a stage of the shared training loop.

    python -m distill.latent.finetune --config=configs/latent_v.py \
        --config.pretrained=path/to/ldm-cin256 --workdir=runs/cin256_v

The paper distils v-prediction teachers; the public SD and LDM teachers predict ε, so they are
first fine-tuned with the v-objective (``teacher.v_finetune_objective``). This stage reads the
diffusers-layout folder ``config.pretrained``, trains its U-Net with ``distill.train.train``
(checkpoints, exact resume, EMA, non-finite skipping, multi-device sharding: all as for the pixel
stages) on latents of ``config.data``, and writes ``workdir/teacher_v/``: the same folder with the
fine-tuned U-Net (same keys and layout as the source file, float32) and
``prediction_type = "v_prediction"`` in its scheduler. ``load_pretrained`` reads it back, and
``LatentModels.denoise_fn`` then wraps it as a v-teacher.

Per step: images are resized to the first stage's ``sample_size`` (channels repeated to its
``in_channels``) and encoded (a posterior draw for a KL VAE, pre-quantisation latents for VQ);
each example's context is its class's row of a table made once on the host — the class
embedder's rows for a class-conditional LDM, or the text encoder's context of
``prompt_template.format(label=<class name>)`` for a text model — or, with probability
``p_uncond``, the null row (class ``num_classes``, or the empty prompt), so the fine-tuned
teacher keeps the unconditional branch that guidance needs.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from distill import cli, config_validation, input_pipeline, manifest, paths, pipeline, train
from distill.latent import pretrained as pretrained_lib
from distill.latent import teacher as teacher_lib
from distill.latent import vae as vae_lib
from distill.latent import weights

STAGE = "v_finetune"
OUTPUT = "teacher_v"


def check_config(config, num_devices: int, process_count: int = 1) -> None:
  """One-line errors naming the field, before anything loads or compiles."""
  if not config.get("pretrained"):
    raise ValueError("pretrained is empty: set --config.pretrained=FOLDER, a diffusers-layout "
                     "folder (python -m distill.latent.convert makes one from a CompVis file).")
  folder = epath.Path(config.pretrained)
  if not (folder / "model_index.json").exists():
    raise ValueError(f"pretrained={folder}: no model_index.json; expected a diffusers-layout "
                     "pipeline folder with unet/, scheduler/ and a first stage.")
  sched = folder / "scheduler" / "scheduler_config.json"
  if not sched.exists():
    raise ValueError(f"pretrained={folder}: no scheduler/scheduler_config.json.")
  kind = json.loads(sched.read_text()).get("prediction_type", "epsilon")
  if kind != "epsilon":
    raise ValueError(f"pretrained={folder}: prediction_type is {kind!r}; this stage turns an "
                     "'epsilon' teacher into a v-prediction one. Use the folder as it is.")
  if config.conditioning not in ("class", "text"):
    raise ValueError(f"conditioning={config.conditioning!r}: use 'class' (class embedder) or "
                     "'text' (text encoder with prompt_template).")
  if config.conditioning == "text" and "{label}" not in config.prompt_template:
    raise ValueError(f"prompt_template={config.prompt_template!r} must contain {{label}}.")
  if config.weighting not in teacher_lib.V_WEIGHTINGS:
    raise ValueError(f"weighting={config.weighting!r}: use one of {teacher_lib.V_WEIGHTINGS}.")
  if not 0.0 <= config.p_uncond < 1.0:
    raise ValueError(f"p_uncond={config.p_uncond} must be in [0, 1).")
  config_validation.check_train_section(STAGE, config[STAGE], num_devices=num_devices,
                                        process_count=process_count)


def context_table(models: pretrained_lib.LatentModels, config) -> np.ndarray:
  """``[num_classes + 1, L, D]``: each class's context, the null context last."""
  n = int(config.data.num_classes)
  if config.conditioning == "class":
    if models.class_embedder is None:
      raise ValueError(f"conditioning='class' but {config.pretrained} has no class_embedder/; "
                       "use conditioning='text' for a text-conditioned model.")
    rows = models.class_embedder.num_classes
    if rows != n + 1:
      raise ValueError(f"data.num_classes={n}, but the class embedder has {rows} rows; it "
                       f"needs num_classes + 1 (the last row is the null class).")
    return np.asarray(models.encode_class(np.arange(n + 1)), np.float32)
  if models.text_encoder is None or models.tokenizer is None:
    raise ValueError(f"conditioning='text' but {config.pretrained} has no text_encoder/ and "
                     "tokenizer/.")
  names = list(config.get("class_names") or ()) or [str(i) for i in range(n)]
  if len(names) != n:
    raise ValueError(f"class_names has {len(names)} entries, data.num_classes={n}.")
  prompts = [config.prompt_template.format(label=name) for name in names] + [""]
  return np.asarray(models.encode_prompt(prompts), np.float32)


def make_objective(models: pretrained_lib.LatentModels, config):
  """The v-objective on latents encoded in the step; ``frozen`` holds the first stage's
  parameters and the context table."""
  first = models.vae if models.vae is not None else models.vqvae
  fs_cfg = first.config if models.vae is not None else first.config.autoencoder
  size, channels, scale = fs_cfg.sample_size, fs_cfg.in_channels, fs_cfg.scaling_factor
  null = int(config.data.num_classes)
  unet = models.unet
  data_channels = int(config.data.channels)
  if channels % data_channels:
    raise ValueError(f"data.channels={data_channels} cannot fill the first stage's "
                     f"in_channels={channels} (it must divide it).")

  def encode(fs_params, images, key):
    b, _, _, c = images.shape
    images = jax.image.resize(images, (b, size, size, c), method="bilinear")
    if c != channels:  # e.g. grayscale digits for an RGB autoencoder
      images = jnp.repeat(images, channels // c, axis=-1)
    if models.vae is not None:
      mean, logvar = first.apply({"params": fs_params}, images, method=vae_lib.AutoencoderKL.encode)
      return scale * vae_lib.sample_latents(mean, logvar, key)
    return scale * first.apply({"params": fs_params}, images, method=vae_lib.VQModel.encode)

  def net_fn(params, z, timesteps, batch):
    return unet.apply({"params": params}, z, timesteps, batch["context"])

  v_objective = teacher_lib.v_finetune_objective(net_fn, models.schedule,
                                                 weighting=config.weighting)

  def objective(params, frozen, batch, key):
    k_enc, k_drop, k_v = jax.random.split(key, 3)
    latents = jax.lax.stop_gradient(encode(frozen["first_stage"], batch["image"], k_enc))
    drop = jax.random.bernoulli(k_drop, config.p_uncond, batch["label"].shape)
    labels = jnp.where(drop, null, batch["label"])
    context = frozen["contexts"][labels]
    return v_objective(params, None, {"latents": latents, "context": context}, k_v)
  return objective


def export(models: pretrained_lib.LatentModels, unet_params, out: epath.Path) -> epath.Path:
  """Writes the fine-tuned teacher folder: the source folder with the new U-Net and
  ``prediction_type = "v_prediction"``; assembled beside ``out`` and renamed into place."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  src = epath.Path(models.path)
  staging = out.parent / (out.name + ".tmp")
  if staging.exists():
    shutil.rmtree(str(staging))
  shutil.copytree(str(src), str(staging), ignore=shutil.ignore_patterns("unet"))
  (staging / "unet").mkdir()
  shutil.copy2(str(src / "unet" / "config.json"), str(staging / "unet" / "config.json"))
  source_files = weights.safetensors_files(src / "unet")
  tensors = weights.export_like(jax.device_get(unet_params), source_files, what="unet")
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            str(staging / "unet" / "diffusion_pytorch_model.safetensors"))
  sched_path = staging / "scheduler" / "scheduler_config.json"
  sched = json.loads(sched_path.read_text())
  sched["prediction_type"] = "v_prediction"
  sched_path.write_text(json.dumps(sched, indent=2))
  if out.exists():
    shutil.rmtree(str(out))
  staging.rename(out)
  return out


def run(config, workdir) -> epath.Path:
  """Fine-tunes ``config.pretrained`` into a v-teacher; reruns resume, and return at once when
  ``workdir/teacher_v`` is complete. Local paths (``workdir``, ``config.pretrained``,
  ``data.data_dir``) are made absolute against the current directory."""
  if not workdir:
    raise ValueError("--workdir is missing: pass --workdir=DIR (a local path or gs://...).")
  workdir = epath.Path(paths.resolve(workdir))
  config = paths.resolve_config(config)
  mesh = pipeline.make_mesh(config)
  check_config(config, num_devices=mesh.size, process_count=jax.process_count())
  if jax.process_index() == 0:
    paths.check_writable(workdir)
  record = manifest.Manifest(workdir)
  record.check_config(config)
  out = workdir / OUTPUT
  if record.is_complete(OUTPUT) and (out / "model_index.json").exists():
    logging.info("%s: complete in %s", STAGE, out)
    return out
  models = pretrained_lib.load_pretrained(config.pretrained)
  section = config[STAGE]
  frozen = {"first_stage": models.vae_params if models.vae is not None else models.vqvae_params,
            "contexts": jnp.asarray(context_table(models, config))}
  batches = input_pipeline.train_batches(config.data, global_batch_size=section.batch_size,
                                         seed=config.seed)
  key = pipeline.stage_key(config, STAGE)
  start = time.time()
  was_complete = record.is_complete(STAGE)
  state = train.train(name=STAGE, stage_cfg=section, objective=make_objective(models, config),
                      init_params=lambda: models.unet_params, frozen=frozen, batches=batches,
                      mesh=mesh, workdir=workdir / STAGE, config=config, base_key=key)
  if not was_complete:
    record.complete(STAGE, step=int(state.step), seconds=time.time() - start)
  if jax.process_index() == 0:
    export(models, state.ema_params, out)
    record.complete(OUTPUT, step=int(state.step), seconds=0.0)
    logging.info("%s: v-prediction teacher written to %s", STAGE, out)
  return out


def main() -> None:
  """``python -m distill.latent.finetune --config=… --workdir=…``."""
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config = config_flags.DEFINE_config_file("config", None, "configs/latent_v.py[:runlocal]")
  workdir = flags.DEFINE_string("workdir", None, "Where checkpoints and teacher_v/ go.")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.run_cli(run, config.value, workdir.value)
  app.run(_main)


if __name__ == "__main__":
  main()
