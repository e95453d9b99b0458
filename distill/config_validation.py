"""Config checks that run before anything compiles: one line naming the field and the fix."""

from __future__ import annotations

from etils import epath

from distill import checkpoints, family, input_pipeline, layout, paths
from distill.losses import TEACHER_WEIGHTINGS, W_WEIGHTINGS
from distill.models.factory import check_model_config

STAGES = ("autoencoder", "clip", "teacher", "teacher_v", "stage_one", "stage_two", "encoder",
          "eval")
TRAINED = ("autoencoder", "clip", "teacher", "teacher_v", "stage_one", "stage_two", "encoder")


def stages_of(config) -> list[str]:
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  unknown = [s for s in stages if s not in STAGES]
  if unknown or not stages:
    raise ValueError(f"stages={config.stages!r} names unknown stage(s) {unknown}: use a "
                     f"comma-separated subset of {','.join(STAGES)}.")
  return stages


def _positive(section: str, cfg, field: str) -> None:
  value = cfg[field]
  if not value > 0:
    raise ValueError(f"{section}.{field}={value} must be > 0.")


def check_train_section(name: str, cfg, *, num_devices: int, process_count: int) -> None:
  steps_field = ("train_steps_per_halving" if name in ("stage_two", "encoder") else
                 "num_train_steps")
  for field in ("batch_size", steps_field, "lr", "log_every", "checkpoint_every",
                "max_to_keep", "max_consecutive_nonfinite"):
    _positive(name, cfg, field)
  if cfg.batch_size % num_devices:
    raise ValueError(f"{name}.batch_size={cfg.batch_size} is not divisible by the "
                     f"{num_devices} devices: use a multiple of {num_devices}.")
  if cfg.batch_size % process_count:
    raise ValueError(f"{name}.batch_size={cfg.batch_size} is not divisible by the "
                     f"{process_count} processes.")
  if cfg.warmup_steps < 0:
    raise ValueError(f"{name}.warmup_steps={cfg.warmup_steps} must be >= 0.")
  if cfg.sample_every < 0:
    raise ValueError(f"{name}.sample_every={cfg.sample_every} must be >= 0 (0 disables).")
  if not 0.0 <= cfg.ema_decay < 1.0:
    raise ValueError(f"{name}.ema_decay={cfg.ema_decay} must be in [0, 1).")
  if cfg.lr_decay not in ("constant", "cosine", "linear"):
    raise ValueError(f"{name}.lr_decay={cfg.lr_decay!r} is not one of 'constant', 'cosine', "
                     "'linear'.")
  if cfg.grad_clip < 0:
    raise ValueError(f"{name}.grad_clip={cfg.grad_clip} must be >= 0 (0 disables).")


def validate(config, workdir, *, num_devices: int, process_count: int = 1) -> None:
  """Raises ``ValueError`` with a one-line message for the first problem found."""
  if not workdir:
    raise ValueError(paths.MISSING_WORKDIR)
  if config.data.name not in input_pipeline.DATASETS:
    raise ValueError(f"data.name={config.data.name!r} is unknown: use one of "
                     f"{list(input_pipeline.DATASETS)}.")
  spec = input_pipeline.TFDS_DATASETS.get(config.data.name)
  if spec is not None and spec.native_size % config.data.image_size:
    raise ValueError(f"data.image_size={config.data.image_size} does not divide the native size "
                     f"{spec.native_size} of {config.data.name}: use a divisor of it.")
  stages = stages_of(config)
  latent = family.name_of(config) == "latent"
  if latent:
    check_latent(config, stages)
  else:
    check_model_config(config)
    if input_pipeline.captioned(config.data):
      raise ValueError(f"data.name={config.data.name!r} holds captions, not labels: it serves a "
                       "text-conditioned latent teacher (see configs/sd15.py).")
    if config.teacher.get("pretrained"):
      raise ValueError("teacher.pretrained is set but family='pixel': a diffusers-layout teacher "
                       "needs --config.family=latent (and a latent section; see configs/sd15.py).")
  if config.num_devices != -1 and config.num_devices < 1:
    raise ValueError(f"num_devices={config.num_devices} must be >= 1, or -1 for all devices.")
  fsdp = config.get("mesh", {}).get("fsdp", 1)
  if not isinstance(fsdp, int) or fsdp < 1 or num_devices % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must divide the mesh's {num_devices} devices: use one of "
                     f"{[n for n in range(1, num_devices + 1) if num_devices % n == 0]}.")
  if "teacher_v" in stages and not layout.has_teacher_v(config):
    raise ValueError("stages names teacher_v, but the config has no teacher_v section with "
                     "num_train_steps > 0: drop it from --config.stages.")
  for name in ("autoencoder", "clip"):
    if name in stages and not layout.trains_parts(config):
      raise ValueError(f"stages names {name}, but the config trains no parts (no autoencoder "
                       "section with num_train_steps > 0, as in configs/emoji.py): drop it from "
                       "--config.stages.")
  for name in (s for s in stages if s in TRAINED):
    if name == "teacher" and (config.teacher.checkpoint or latent) and \
        not layout.trains_parts(config):
      continue  # read, not trained
    check_train_section(name, config[name], num_devices=num_devices,
                        process_count=process_count)
  if "teacher_v" in stages and not 0.0 <= config.teacher_v.p_uncond < 1.0:
    raise ValueError(f"teacher_v.p_uncond={config.teacher_v.p_uncond} must be in [0, 1) (the "
                     "probability of the null condition while fine-tuning to v).")
  if "teacher_v" in stages and config.teacher_v.get("weighting", "snr_trunc") not in \
      TEACHER_WEIGHTINGS:
    raise ValueError(f"teacher_v.weighting={config.teacher_v.weighting!r}: use one of "
                     f"{list(TEACHER_WEIGHTINGS)}.")
  if "teacher" in stages and not latent and not 0.0 <= config.teacher.p_uncond <= 1.0:
    raise ValueError(f"teacher.p_uncond={config.teacher.p_uncond} must be in [0, 1] (the "
                     "probability of replacing a label by the null label).")
  if config.teacher.checkpoint:
    if not epath.Path(config.teacher.checkpoint).exists():
      raise ValueError(f"teacher.checkpoint={config.teacher.checkpoint!r} does not exist: pass "
                       "a teacher stage directory, its checkpoints/ directory or a step "
                       "directory.")
    try:
      checkpoints.state_dir(config.teacher.checkpoint)
    except ValueError as e:
      raise ValueError(f"teacher.checkpoint: {e}") from None
  one, two = config.stage_one, config.stage_two
  if not one.w_min <= one.w_max:
    raise ValueError(f"stage_one.w_min={one.w_min} must be <= stage_one.w_max={one.w_max}.")
  # w = -1 is the unconditional model, and in (-1, 0) guidance interpolates towards it; below
  # -1 the conditional branch would get a negative weight, which no sampler wants.
  if one.w_min < -1:
    raise ValueError(f"stage_one.w_min={one.w_min} must be >= -1 (w = -1 is the unconditional "
                     "model; the paper distils w in [0, 4]).")
  for name, section in (("stage_one", one), ("stage_two", two), ("encoder", config.encoder)):
    if section.w_loss_weight not in W_WEIGHTINGS:
      raise ValueError(f"{name}.w_loss_weight={section.w_loss_weight!r} is not one of "
                       f"{list(W_WEIGHTINGS)}.")
    if not section.w_sample_power > 0:
      raise ValueError(f"{name}.w_sample_power={section.w_sample_power} must be > 0 (1 = w "
                       "uniform in [w_min, w_max] as in Eq. 3; 2 draws small w more often).")
  if "stage_two" in stages:
    check_halvings(two)
  if "encoder" in stages:
    if not layout.has_encoder(config):
      raise ValueError("stages names encoder, but encoder.start_num_steps=0 (no encoder in the "
                       "chain): set e.g. --config.encoder.start_num_steps=32.")
    check_halvings(config.encoder, "encoder")
    if config.encoder.sample_every:
      raise ValueError(f"encoder.sample_every={config.encoder.sample_every}: encoders draw no "
                       "progress grids; set it to 0.")
  if "eval" in stages:
    check_eval(config)


def check_latent(config, stages) -> None:
  """The latent family: an imported teacher folder, no dropout, eval on Inception or CLIP."""
  from distill.latent import family as latent_family  # pylint: disable=import-outside-toplevel
  from distill.latent import parts  # pylint: disable=import-outside-toplevel
  if config.teacher.checkpoint:
    raise ValueError("teacher.checkpoint is a distill checkpoint of a pixel teacher; a latent "
                     "teacher is imported with --config.teacher.pretrained=FOLDER.")
  if layout.trains_parts(config):
    check_parts(config)
    kind = parts.teacher_prediction_type(config)
    inpainting = bool(config.latent.get("inpainting"))
  else:
    latent_family.check_folder(config.teacher.get("pretrained"), config.latent.conditioning)
    kind = latent_family.folder_prediction_type(config.teacher.pretrained)
    inpainting = latent_family.folder_is_inpainting(config.teacher.pretrained)
  latent_family.check_kept_loss_weight(
      float(config.latent.get("kept_loss_weight", 1.0)), inpainting=inpainting,
      where=config.teacher.pretrained or "the teacher (latent.inpainting=False)")
  if inpainting and config.latent.get("cache"):
    where = config.teacher.pretrained or "latent.inpainting=True"
    raise ValueError(f"latent.cache=True: the inpainting teacher ({where}) is trained on a mask "
                     "drawn per example and step, whose masked images the cache does not hold; "
                     "set --config.latent.cache=False.")
  if kind != "v_prediction" and not layout.has_teacher_v(config):
    where = (f"teacher.pretrained={config.teacher.pretrained}" if config.teacher.pretrained
             else "the teacher (latent.scheduler.prediction_type)")
    raise ValueError(f"{where} predicts {kind!r}, and the "
                     "student predicts v, starting from its teacher: keep the ε→v fine-tuning "
                     "(teacher_v.num_train_steps > 0, paper §4.2).")
  if input_pipeline.captioned(config.data):
    if config.latent.conditioning != "text":
      raise ValueError(f"data.name={config.data.name!r} (captions) needs "
                       "latent.conditioning='text'.")
    if config.data.num_classes:
      raise ValueError(f"data.num_classes={config.data.num_classes}: image–caption data have no "
                       "labels; set --config.data.num_classes=0.")
    if not config.latent.sample_prompts:
      raise ValueError("latent.sample_prompts is empty: the progress grids of caption data need "
                       "at least one prompt.")
    input_pipeline.source(config.data, "train")  # or a one-line error
  elif not config.data.num_classes > 0:
    raise ValueError(f"data.num_classes={config.data.num_classes} must be > 0 for data.name="
                     f"{config.data.name!r} (only captioned data come without labels: "
                     f"{', '.join(input_pipeline.CAPTIONED)}).")
  for name in ("teacher_v", "stage_one", "stage_two", "encoder"):
    if name in config and config[name].get("dropout", 0.0):
      raise ValueError(f"{name}.dropout={config[name].dropout}: the latent U-Net has no dropout; "
                       "set it to 0.")
  if "eval" in stages and config.eval.features == "digits":
    raise ValueError("eval.features='digits' measures digits in pixel space: a latent family's "
                     "samples take eval.features='inception' or 'clip'.")


def check_parts(config) -> None:
  """A chain that trains its teacher's parts (``distill/latent/parts.py``)."""
  from distill.latent import parts  # pylint: disable=import-outside-toplevel
  if config.teacher.get("pretrained"):
    raise ValueError("teacher.pretrained is set, but the config trains the teacher's parts "
                     "(autoencoder.num_train_steps > 0): drop one of them.")
  if not input_pipeline.captioned(config.data) or config.latent.conditioning != "text":
    raise ValueError(f"the autoencoder and clip links train on image–caption data: data.name="
                     f"{config.data.name!r} must hold captions and latent.conditioning be "
                     "'text'.")
  from distill.latent import teacher  # pylint: disable=import-outside-toplevel
  kind = parts.teacher_prediction_type(config)
  if kind not in teacher.PREDICTION_TYPES:
    raise ValueError(f"latent.scheduler.prediction_type={kind!r}: the teacher trained here "
                     f"predicts one of {list(teacher.PREDICTION_TYPES)}.")
  if config.teacher.get("weighting", "eps") not in TEACHER_WEIGHTINGS:
    raise ValueError(f"teacher.weighting={config.teacher.weighting!r}: use one of "
                     f"{list(TEACHER_WEIGHTINGS)}.")
  size = int(config.data.image_size)
  factor = 2 ** (len(config.autoencoder.model.block_out_channels) - 1)
  if size % factor or size % int(config.clip.vision.patch_size):
    raise ValueError(f"data.image_size={size} must be a multiple of the autoencoder's "
                     f"downsampling {factor} and of clip.vision.patch_size="
                     f"{config.clip.vision.patch_size}.")
  if config.autoencoder.kl_weight < 0:
    raise ValueError(f"autoencoder.kl_weight={config.autoencoder.kl_weight} must be >= 0.")
  try:
    parts.unet_config(config)
  except ValueError as e:
    raise ValueError(f"latent.unet: {e}") from None
  if not 1 <= int(config.clip.max_length) <= 77:
    raise ValueError(f"clip.max_length={config.clip.max_length} must be in [1, 77].")


def check_eval(config) -> None:
  from distill.evaluation import features  # pylint: disable=import-outside-toplevel
  e = config.eval
  if e.features not in features.FEATURES:
    raise ValueError(f"eval.features={e.features!r} is not one of {list(features.FEATURES)}.")
  for field in ("clip_model", "captions_file"):
    if e.get(field) and not epath.Path(e[field]).exists():
      raise ValueError(f"eval.{field}={e[field]!r} does not exist.")
  if e.features == "clip" and not e.get("clip_model") and not layout.trains_parts(config):
    raise ValueError("eval.features='clip' needs --config.eval.clip_model=FOLDER (a CLIP folder, "
                     "docs/evaluation.md).")
  if input_pipeline.captioned(config.data) and not e.get("clip_model") and \
      not layout.trains_parts(config):  # else the chain's clip_eval
    raise ValueError(f"the eval stage on caption data ({config.data.name}) reports CLIP scores: "
                     "pass --config.eval.clip_model=FOLDER (a CLIP folder, docs/evaluation.md).")
  if e.features == "digits" and config.data.name != "digits":
    raise ValueError(f"eval.features='digits' needs data.name='digits' (got "
                     f"{config.data.name!r}): use eval.features='inception'.")
  if e.features == "inception" and not epath.Path(e.inception_weights or "/nonexistent").exists():
    raise ValueError(f"eval.inception_weights={e.inception_weights!r} is not a file: convert the "
                     "FID Inception weights (python -m distill.evaluation.inception --convert) "
                     "and pass --config.eval.inception_weights=PATH.")
  if e.num_samples < 10 or not e.seeds or not e.w_values or e.batch_size < 1:
    raise ValueError(f"eval.num_samples={e.num_samples} must be >= 10, and eval.seeds, "
                     "eval.w_values non-empty, eval.batch_size >= 1.")
  bad = [s for s in (e.teacher_steps, *e.ddim_steps, *e.dpm_solver_steps)
         if not isinstance(s, int) or s < 1]
  if bad or set(e.samplers) - {"deterministic", "stochastic"}:
    raise ValueError(f"eval.teacher_steps/ddim_steps/dpm_solver_steps {bad} must be integers "
                     f">= 1 and eval.samplers={tuple(e.samplers)} a subset of (deterministic, "
                     "stochastic).")


def check_halvings(two, name: str = "stage_two") -> None:
  start, end = two.start_num_steps, two.end_num_steps
  if not (isinstance(start, int) and isinstance(end, int) and 1 <= end < start):
    raise ValueError(f"{name}.start_num_steps={start} and end_num_steps={end} must be "
                     "integers with 1 <= end_num_steps < start_num_steps.")
  ratio = start // end
  if start % end or ratio & (ratio - 1):
    suggestion = end * 2 ** max(ratio.bit_length() - 1, 1)
    raise ValueError(f"{name}.start_num_steps={start} is not end_num_steps={end} times a "
                     f"power of two: use e.g. start_num_steps={suggestion}.")
  if two.long_halving_max_steps < 0 or (two.long_halving_max_steps > 0 and
                                         not two.long_halving_train_steps > 0):
    raise ValueError(f"{name}.long_halving_train_steps={two.long_halving_train_steps} must be "
                     f"> 0 when long_halving_max_steps={two.long_halving_max_steps} > 0 (0 "
                     "disables longer final halvings).")
