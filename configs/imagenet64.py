r"""ImageNet 64×64 (tfds ``imagenet_resized/64x64``), 1000 classes; U-Net as in the paper / PD.

COMMAND: python -m distill.main --config=configs/imagenet64.py --workdir=gs://BUCKET/imagenet64
SMOKE:   python -m distill.main --config=configs/imagenet64.py:runlocal --workdir=/tmp/in64
"""

from distill import config_common as common


def get_config(arg=None):
  args = common.parse_arg(arg)
  config = common.base_config()
  config.data.name = "imagenet64"
  config.data.image_size = 64
  config.data.channels = 3
  config.data.num_classes = 1000

  # PD's ImageNet 64 U-Net: ch 192, mults 1,2,3,4, 3 res blocks, attention at 32,16,8, head dim 64.
  config.model.ch = 192
  config.model.ch_mult = (1, 2, 3, 4)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (32, 16, 8)
  config.model.head_dim = 64
  config.model.num_groups = 32
  config.model.dropout = 0.1
  config.model.dtype = "bfloat16"
  config.model.remat = True
  config.data.random_flip = True

  # Paper / PD teacher: batch 2048, lr 3e-4 with 1k warm-up, EMA 0.9999, p_uncond 0.1.
  config.teacher.batch_size = 2048
  config.teacher.num_train_steps = 400_000
  config.teacher.lr = 3e-4
  config.teacher.warmup_steps = 1000
  config.teacher.ema_decay = 0.9999
  config.teacher.p_uncond = 0.1
  config.teacher.checkpoint_every = 5000
  config.teacher.sample_every = 10_000

  common.paper_distillation(config, batch_size=2048, lr=1e-4, steps_per_halving=50_000)
  # Evaluation with FID Inception-v3 (paper Table 1: 50k samples, guided DDIM 2×1024). It needs
  # the converted weights file, so it is not a default stage: add it with
  # --config.stages=teacher,stage_one,stage_two,eval --config.eval.inception_weights=PATH.
  config.stages = "teacher,stage_one,stage_two"
  config.eval.features = "inception"
  config.eval.teacher_steps = 1024
  config.eval.num_samples = 50_000
  config.eval.seeds = (0,)
  if args.get("runlocal"):
    common.shrink_for_cpu(config)
    config.data.image_size = 8
    config.model.ch = 16
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.head_dim = 16
    config.model.num_groups = 8
    config.model.dtype = "float32"
    config.model.remat = False
  return config
