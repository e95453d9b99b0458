r"""ε→v fine-tuning of a latent teacher (paper §4.2): ``python -m distill.latent.finetune``.

COMMAND: python -m distill.latent.finetune --config=configs/latent_v.py \
             --config.pretrained=ldm-cin256 --workdir=gs://BUCKET/cin256_v
SMOKE:   python -m distill.latent.finetune --config=configs/latent_v.py:runlocal --workdir=/tmp/v

The default is the class-conditional LDM (cin256-v2, converted with
``python -m distill.latent.convert``) on ImageNet; its images are resized to the first stage's
``sample_size``. ``runlocal`` fine-tunes the tiny class-conditional test model
(``tests/fixtures/latent/tiny-cin``, 10 classes + null) on the embedded digits.
"""

import pathlib

from distill import config_common as common

REPO = pathlib.Path(__file__).resolve().parent.parent


def get_config(arg=None):
  args = common.parse_arg(arg)
  base = common.base_config()
  config = base.copy_and_resolve_references()
  for name in ("teacher", "stage_one", "stage_two", "eval", "model", "stages"):
    del config[name]
  # A diffusers-layout folder with model_index.json, unet/, scheduler/, a first stage (vae/ or
  # vqvae/) and class_embedder/ or text_encoder/ + tokenizer/.
  config.pretrained = ""
  # "class": the class embedder's rows (null class = its last row, num_classes);
  # "text": the text encoder's context of prompt_template per class name, "" as the null prompt.
  config.conditioning = "class"
  config.prompt_template = "a photo of a {label}"
  config.class_names = ()  # for "text"; empty = the label numbers
  config.p_uncond = 0.1  # label dropout keeps the unconditional branch guidance needs
  # "snr_plus_one": ‖v̂ − v‖² (SD 2's v-objective); "snr_trunc": x-error · max(SNR, 1).
  config.weighting = "snr_plus_one"

  config.data.name = "imagenet64"
  config.data.image_size = 64
  config.data.channels = 3
  config.data.num_classes = 1000
  config.data.random_flip = True

  config.v_finetune = common.train_section(batch_size=256, num_train_steps=50_000, lr=1e-5,
                                           warmup_steps=1000, ema_decay=0.9999)
  config.v_finetune.sample_every = 0
  config.v_finetune.checkpoint_every = 5000
  if args.get("runlocal"):
    config.pretrained = str(REPO / "tests" / "fixtures" / "latent" / "tiny-cin")
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.num_classes = 10
    config.data.random_flip = False
    config.v_finetune.batch_size = 16
    config.v_finetune.num_train_steps = 40
    config.v_finetune.lr = 1e-3
    config.v_finetune.warmup_steps = 0
    config.v_finetune.ema_decay = 0.0
    config.v_finetune.log_every = 10
    config.v_finetune.checkpoint_every = 20
  return config
