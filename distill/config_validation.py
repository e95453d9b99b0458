"""Config checks that run before anything compiles: one line naming the field and the fix."""

from __future__ import annotations

from distill import input_pipeline
from distill.models.factory import check_model_config

STAGES = ("teacher",)
TRAIN_SECTIONS = ("teacher",)


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
  for field in ("batch_size", "num_train_steps", "lr", "log_every", "checkpoint_every",
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
    raise ValueError("--workdir is missing: pass --workdir=DIR (a local path or gs://...).")
  if config.data.name not in input_pipeline.DATASETS:
    raise ValueError(f"data.name={config.data.name!r} is unknown: use one of "
                     f"{list(input_pipeline.DATASETS)}.")
  spec = input_pipeline.TFDS_DATASETS.get(config.data.name)
  if spec is not None and spec.native_size % config.data.image_size:
    raise ValueError(f"data.image_size={config.data.image_size} does not divide the native size "
                     f"{spec.native_size} of {config.data.name}: use a divisor of it.")
  check_model_config(config)
  stages = stages_of(config)
  if config.num_devices != -1 and config.num_devices < 1:
    raise ValueError(f"num_devices={config.num_devices} must be >= 1, or -1 for all devices.")
  for name in TRAIN_SECTIONS:
    if name in stages:
      check_train_section(name, config[name], num_devices=num_devices,
                          process_count=process_count)
  if "teacher" in stages and not 0.0 <= config.teacher.p_uncond <= 1.0:
    raise ValueError(f"teacher.p_uncond={config.teacher.p_uncond} must be in [0, 1] (the "
                     "probability of replacing a label by the null label).")
