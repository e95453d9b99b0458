"""Settings shared by every config: sections ``data``, ``model``, and the run-wide fields.

Each ``configs/<name>.py`` imports this module as a plain import,
``from distill import config_common as common``, starts from ``base_config()`` and overrides
what differs; its ``get_config(arg)`` accepts ``runlocal``
(``--config=configs/<name>.py:runlocal``) for a CPU smoke run of the same code path
(``parse_arg``, ``shrink_for_cpu``).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Stages to run, in order, comma-separated (the pipeline skips finished ones): any subset of
  # teacher, stage_one, stage_two, eval. A stage not listed is read from the workdir when a
  # later one needs it (it must be complete there).
  config.stages = "teacher,stage_one,stage_two,eval"
  # Devices in the ('data', 'fsdp') mesh; -1 = every device of every process.
  config.num_devices = -1
  # mesh.fsdp: the devices each parameter, EMA and optimiser moment (and the frozen teacher) is
  # split over (distill/sharding.py); data parallelism takes the rest. 1 = replicated state.
  config.mesh = ml_collections.ConfigDict(dict(fsdp=1))

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10
  config.data.data_dir = ""  # tfds data_dir ("" = tfds default); gs:// works on TPU VMs
  config.data.random_flip = False

  # U-Net (distill/models/unet.py). Output is v; time enters as the log-SNR.
  config.model = ml_collections.ConfigDict()
  config.model.ch = 64
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = ()
  config.model.head_dim = 64
  config.model.num_groups = 32
  config.model.dropout = 0.0
  config.model.w_fourier_scale = 250.0  # w-embedding: sinusoidal features of w * this scale
  config.model.dtype = "float32"  # activations; parameters and the loss stay float32
  config.model.remat = False
  # Attention implementation (distill/attention.py): "auto" picks cuDNN on GPU, the Pallas flash
  # kernel on TPU, XLA's or the chunked attention elsewhere; results agree to float32 rounding.
  config.model.attention = "auto"

  # Classifier-free-guided teacher [x_c, x_u]: one network, label dropout to the null label.
  config.teacher = train_section(
      batch_size=128, num_train_steps=10_000, lr=3e-4, warmup_steps=1000, ema_decay=0.9999)
  config.teacher.p_uncond = 0.1
  config.teacher.sample_w = (0.0, 1.0, 4.0)  # guidance weights of the progress grids
  config.teacher.sample_steps = 64  # guided DDIM steps of the progress grids (2 evals each)
  # A teacher trained elsewhere by distill: its stage directory, checkpoints/ directory or one
  # step directory. Set, it replaces training the teacher ("" = train it here).
  config.teacher.checkpoint = ""

  # Stage one (paper §3.1, Eq. 3, Algorithm 1): one w-conditioned student learns the guided
  # teacher (1+w) x_c - w x_u for w ~ U[w_min, w_max], t ~ U[0, 1]. Starts as the teacher's
  # conditional model (teacher EMA parameters + a zero-initialised w-embedding).
  config.stage_one = train_section(
      batch_size=128, num_train_steps=10_000, lr=1e-4, warmup_steps=0, ema_decay=0.0)
  config.stage_one.w_min = 0.0  # stage two distils over the same range
  config.stage_one.w_max = 4.0
  config.stage_one.dropout = 0.0
  # Per-example loss weight by w: "uniform" (Eq. 3) or "inverse_square", 1/(1+w)^2 (errors
  # relative to the guided target's scale; losses.w_loss_weight). Stage two has the same field.
  config.stage_one.w_loss_weight = "uniform"
  # Draw of w: w_min + (w_max - w_min) * u^w_sample_power, u ~ U[0, 1]; 1 = uniform (Eq. 3),
  # > 1 draws small w more often (guidance.sample_w). Stage two has the same field.
  config.stage_one.w_sample_power = 1.0
  config.stage_one.sample_w = (0.0, 1.0, 4.0)
  config.stage_one.sample_steps = 64  # DDIM steps of its grids (guidance distilled: 1 eval each)

  # Stage two (Algorithm 2): progressive distillation. The stage-one student, sampled with
  # start_num_steps DDIM steps, is the first teacher; each halving trains a student with half
  # the steps (one student step = two teacher steps), which then becomes the next teacher, down
  # to end_num_steps. Every halving has a fresh optimiser and keeps its final student in
  # workdir/stage_two/N=<steps>.
  config.stage_two = train_section(
      batch_size=128, num_train_steps=None, lr=1e-4, warmup_steps=0, ema_decay=0.0)
  config.stage_two.start_num_steps = 1024
  config.stage_two.end_num_steps = 1
  config.stage_two.train_steps_per_halving = 50_000
  # Students with at most long_halving_max_steps steps train for long_halving_train_steps
  # instead (the paper trains its last, hardest halvings longer); 0 disables.
  config.stage_two.long_halving_max_steps = 0
  config.stage_two.long_halving_train_steps = 0
  config.stage_two.w_loss_weight = "uniform"  # as stage_one.w_loss_weight
  config.stage_two.w_sample_power = 1.0  # as stage_one.w_sample_power
  # Also train on the teacher's finer grid t = i/(2N), so a student with N steps serves the
  # stochastic sampler (Eq. 4-7) with 2N evaluations (docs/pipeline.md, "Stage two in detail").
  config.stage_two.train_for_stochastic = True
  config.stage_two.dropout = 0.0
  config.stage_two.sample_w = (0.0, 1.0, 4.0)

  # The distilled encoder (paper §4.3, docs/editing.md): DDIM encoding, Eq. 2 run from the data
  # up to the noise, distilled progressively as stage two distils the sampler. The stage-one
  # student encoding with start_num_steps steps is the first teacher; each halving trains an
  # encoder with half the steps (one student step = two teacher steps), kept in
  # workdir/encoder/N=<steps>. Its links train when "encoder" is in stages; start_num_steps = 0:
  # the chain has no encoder. Fields as in stage_two.
  config.encoder = train_section(
      batch_size=128, num_train_steps=None, lr=1e-4, warmup_steps=0, ema_decay=0.0)
  config.encoder.start_num_steps = 0
  config.encoder.end_num_steps = 1
  config.encoder.train_steps_per_halving = 50_000
  config.encoder.long_halving_max_steps = 0
  config.encoder.long_halving_train_steps = 0
  config.encoder.w_loss_weight = "uniform"
  config.encoder.w_sample_power = 1.0
  config.encoder.dropout = 0.0
  config.encoder.sample_every = 0  # encoders draw no progress grids

  # Evaluation (paper Table 1, Fig. 2 and 6): FID / IS / class accuracy of the guided teacher
  # (DDIM at teacher_steps, 2 evaluations each), of DDIM and of DPM-Solver++ (2M) on the teacher
  # at ddim_steps and dpm_solver_steps, and of the students at student_steps (deterministic and
  # stochastic samplers), for every w and seed.
  config.eval = ml_collections.ConfigDict()
  config.eval.w_values = (0.0, 0.3, 1.0, 4.0)
  config.eval.num_samples = 1000  # per cell and seed, class-balanced
  config.eval.seeds = (0, 1, 2)
  config.eval.teacher_steps = 256
  config.eval.ddim_steps = (1, 2, 4, 8, 16)
  config.eval.dpm_solver_steps = (2, 4, 8, 16, 32)  # at 1-2 steps the solver is DDIM
  config.eval.student_steps = (1, 2, 4, 8, 16)
  config.eval.samplers = ("deterministic", "stochastic")
  # The project's digits classifier (digits-FID), "inception", or "clip" (eval.clip_model's image
  # embeddings).
  config.eval.features = "digits"
  # A CLIP folder (transformers or OpenCLIP layout, docs/evaluation.md): the CLIP score of
  # caption data's samples, and the features of eval.features="clip".
  config.eval.clip_model = ""
  # Caption data: the prompts of every cell, one per line (e.g. the COCO-2017 protocol's 5000
  # validation captions); empty: the held-out split's captions.
  config.eval.captions_file = ""
  config.eval.inception_weights = ""  # converted FID Inception-v3 file (docs/evaluation.md)
  config.eval.reference_samples = 50_000  # real images for the reference statistics (per split)
  config.eval.classifier_seed = 0
  config.eval.classifier_steps = 2000
  config.eval.batch_size = 500
  config.eval.pr_samples = 10_000  # samples per set for precision / recall
  return config


def train_section(*, batch_size: int, num_train_steps: int | None, lr: float, warmup_steps: int,
                  ema_decay: float, lr_decay: str = "constant", grad_clip: float = 1.0):
  """Optimiser, EMA, logging and checkpoint settings shared by every training stage."""
  s = ml_collections.ConfigDict()
  s.batch_size = batch_size  # global, over all devices and hosts
  if num_train_steps is not None:
    s.num_train_steps = num_train_steps
  s.lr = lr
  s.warmup_steps = warmup_steps
  s.lr_decay = lr_decay  # "constant", "cosine" or "linear" (after warm-up, to 0)
  s.grad_clip = grad_clip  # global-norm clipping; 0 disables
  s.adam_b1 = 0.9
  s.adam_b2 = 0.999
  s.adam_eps = 1e-8
  s.ema_decay = ema_decay  # 0 = no EMA (EMA params equal params)
  s.log_every = 100
  s.checkpoint_every = 1000
  s.sample_every = 1000  # PNG + TensorBoard grid of samples; 0 disables
  s.max_to_keep = 3
  s.max_consecutive_nonfinite = 20  # stop after this many skipped (non-finite) steps in a row
  return s


def paper_distillation(config, *, batch_size: int, lr: float, steps_per_halving: int) -> None:
  """Distillation as in the paper (§3) and PD: w in [0, 4]; the stage-one student sampled with
  1024 DDIM steps is the first teacher, halved down to 1 step; Adam, gradient clip 1.0, no EMA
  and no dropout while distilling; stage one trains as long as one halving."""
  for section in (config.stage_one, config.stage_two):
    section.batch_size = batch_size
    section.lr = lr
    section.warmup_steps = 0
    section.ema_decay = 0.0
    section.dropout = 0.0
    section.grad_clip = 1.0
    section.checkpoint_every = 5000
    section.sample_every = 10_000
  config.stage_one.w_min = 0.0
  config.stage_one.w_max = 4.0
  config.stage_one.num_train_steps = steps_per_halving
  config.stage_two.start_num_steps = 1024
  config.stage_two.end_num_steps = 1
  config.stage_two.train_steps_per_halving = steps_per_halving


def shrink_for_cpu(config, *, steps: int = 6) -> None:
  """The ``runlocal`` variant: a few steps of every stage, halvings from 8 steps down to 1."""
  for name in ("teacher", "stage_one", "stage_two"):
    section = config[name]
    section.batch_size = 16
    section.warmup_steps = 2
    section.log_every = 2
    section.checkpoint_every = 3
    section.sample_every = steps
  config.teacher.num_train_steps = steps
  config.stage_one.num_train_steps = steps
  config.stage_two.train_steps_per_halving = steps
  config.stage_two.long_halving_max_steps = 0
  config.stage_two.start_num_steps = 8
  config.stage_two.end_num_steps = 1
  shrink_encoder_for_cpu(config)
  config.teacher.sample_steps = 4
  config.stage_one.sample_steps = 4
  config.eval.w_values = (0.0, 1.0)
  config.eval.num_samples = 20
  config.eval.seeds = (0, 1)
  config.eval.teacher_steps = 4
  config.eval.ddim_steps = (1, 2)
  config.eval.dpm_solver_steps = (3,)  # one second-order step between two first-order ones
  config.eval.student_steps = (1, 2)
  config.eval.classifier_steps = 200
  config.eval.batch_size = 20


# The fields an encoder trains with, as stage two's halvings (``encoder_as_halvings``).
HALVING_TRAINING_FIELDS = (
    "batch_size", "lr", "warmup_steps", "lr_decay", "grad_clip", "adam_b1", "adam_b2", "adam_eps",
    "ema_decay", "log_every", "checkpoint_every", "max_to_keep", "max_consecutive_nonfinite",
    "train_steps_per_halving", "long_halving_max_steps", "long_halving_train_steps",
    "w_loss_weight", "w_sample_power", "dropout")


def encoder_as_halvings(config, *, start_num_steps: int, end_num_steps: int = 1) -> None:
  """The distilled encoder trained as stage two's halvings are (its optimiser, schedule, steps per
  halving, w weighting), copied from ``config.stage_two`` as it stands; encoders of
  ``start_num_steps/2`` down to ``end_num_steps`` steps (0: no encoder)."""
  for field in HALVING_TRAINING_FIELDS:
    config.encoder[field] = config.stage_two[field]
  config.encoder.start_num_steps = start_num_steps
  config.encoder.end_num_steps = end_num_steps


def shrink_encoder_for_cpu(config) -> None:
  """The encoder of a ``runlocal`` variant, after its stage two is shrunk: encoders of 2 and 1
  steps where the full config has an encoder, none otherwise."""
  encoder_as_halvings(config, start_num_steps=4 if config.encoder.start_num_steps else 0)


def parse_arg(arg: str | None, variants: tuple[str, ...] = ("runlocal",)) -> dict:
  """``"runlocal"`` or ``"runlocal,key=value"`` → ``{"runlocal": True, "key": "value"}``;
  ``variants`` are the names the config knows."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip() if value else True
  unknown = set(out) - set(variants)
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}: this config's variants are "
                     f"{list(variants)} (e.g. --config=configs/digits.py:runlocal).")
  return out


def latent_base_config(*, pretrained: str, conditioning: str) -> ml_collections.ConfigDict:
  """A latent-family chain (paper §4.2): the teacher imported from the diffusers-layout folder
  ``pretrained``, its ε→v fine-tuning (``teacher_v``), stage one and the halvings.

  ``conditioning``: ``"class"`` (a class embedder; the null class is its last row) or
  ``"text"`` (the text encoder's context of ``latent.prompt_template`` per class name for
  labelled data; the null condition is the empty prompt). The pixel ``model`` section does not
  apply. The eval stage is not in ``stages`` by default: it needs the FID Inception weights
  (``eval.inception_weights``) or a CLIP (``eval.features = "clip"``, ``eval.clip_model``), and a
  CLIP for the CLIP score of caption data (docs/evaluation.md).
  """
  config = base_config()
  del config["model"]
  config.family = "latent"
  config.stages = "teacher,teacher_v,stage_one,stage_two"
  config.teacher = ml_collections.ConfigDict()
  config.teacher.pretrained = pretrained  # a diffusers-layout folder: unet/, scheduler/, vae/ ...
  config.teacher.checkpoint = ""  # (pixel teachers only)
  config.latent = ml_collections.ConfigDict()
  config.latent.conditioning = conditioning
  config.latent.prompt_template = "a photo of a {label}"  # text: the prompt of a class
  config.latent.class_names = ()  # text: one name per class; empty = the label numbers
  # Prompts of the progress grids when the data are image–caption pairs (data.num_classes = 0).
  config.latent.sample_prompts = ("a photo of a cat", "a photo of a dog", "a red car",
                                  "a bowl of fruit")
  config.latent.w_embedding_dim = 256  # diffusers' time_cond_proj_dim (LCM's default)
  # The networks' activations ("float32" or "bfloat16"; parameters and losses stay float32),
  # remat (each resnet and transformer recomputed in the backward pass) and the attention
  # implementation (distill/attention.py) of every module read from teacher.pretrained.
  # A teacher trained here (configs/emoji.py) as an inpainting U-Net: latents, mask and masked
  # image's latents in (distill/latent/inpainting.py). An imported teacher is one if its U-Net
  # has 2·C + 1 input channels, whatever this says.
  config.latent.inpainting = False
  # An inpainting U-Net's loss weight on the latent cells its mask keeps, in every link's loss
  # (distill/latent/inpainting.py, loss_weights); 1: the plain loss of SD-inpainting.
  config.latent.kept_loss_weight = 1.0
  config.latent.dtype = "float32"
  config.latent.remat = False
  config.latent.attention = "auto"
  # Encode the training split once into workdir/latent_cache/ and train every link on it
  # (distill/latent/cache.py); for long runs at high resolution.
  config.latent.cache = False
  # ε→v fine-tuning (paper §4.2): the teacher's network read as v-prediction, trained with the
  # teacher's objective and condition dropout; 0 steps removes the link (the ε-teacher is then
  # distilled as it is). Starts from the imported teacher.
  config.teacher_v = train_section(batch_size=256, num_train_steps=50_000, lr=1e-5,
                                   warmup_steps=1000, ema_decay=0.9999)
  config.teacher_v.p_uncond = 0.1
  config.teacher_v.weighting = "snr_trunc"  # or "snr_plus_one": ‖v̂ − v‖², SD 2's v-objective
  config.teacher_v.sample_w = (0.0, 4.0)
  config.teacher_v.sample_steps = 64
  config.teacher_v.sample_every = 0
  config.teacher_v.checkpoint_every = 5000
  for section in (config.stage_one, config.stage_two):
    section.sample_every = 0
    section.checkpoint_every = 1000
  config.eval.features = "inception"
  config.eval.seeds = (0,)
  config.eval.classifier_steps = 0  # (the digits classifier: pixel space only)
  return config


def paper_latent_distillation(config, *, w_min: float, w_max: float, sample_w: tuple) -> None:
  """The paper's latent distillation (§4.2): batch 512, lr 1e-4, stage one 3000 steps, the
  halvings from 512 steps to 1 with 2000 steps each and 20 000 for students of 4 steps or
  fewer, no EMA."""
  for section in (config.stage_one, config.stage_two):
    section.batch_size = 512
    section.lr = 1e-4
    section.ema_decay = 0.0
    section.sample_w = tuple(sample_w)
  config.stage_one.num_train_steps = 3000
  config.stage_one.w_min = w_min
  config.stage_one.w_max = w_max
  config.stage_two.start_num_steps = 512
  config.stage_two.end_num_steps = 1
  config.stage_two.train_steps_per_halving = 2000
  config.stage_two.long_halving_max_steps = 4
  config.stage_two.long_halving_train_steps = 20_000


def shrink_latent_for_cpu(config, *, pretrained: str, steps: int = 6) -> None:
  """The ``runlocal`` variant of a latent config: a tiny fixture teacher on the embedded digits,
  a few steps of every link, halvings 8 → 1."""
  config.teacher.pretrained = pretrained
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10
  config.data.random_flip = False
  config.latent.class_names = ("zero", "one", "two", "three", "four", "five", "six", "seven",
                               "eight", "nine")
  config.latent.w_embedding_dim = 32
  for name in ("teacher_v", "stage_one", "stage_two"):
    section = config[name]
    section.batch_size = 16
    section.lr = 1e-3
    section.warmup_steps = 2
    section.ema_decay = 0.0
    section.log_every = 2
    section.checkpoint_every = 3
    section.sample_every = steps
  config.teacher_v.num_train_steps = steps
  config.teacher_v.sample_steps = 4
  config.stage_one.num_train_steps = steps
  config.stage_one.sample_steps = 4
  config.stage_two.train_steps_per_halving = steps
  config.stage_two.long_halving_max_steps = 0
  config.stage_two.start_num_steps = 8
  config.stage_two.end_num_steps = 1
  shrink_encoder_for_cpu(config)
