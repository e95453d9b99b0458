r"""CIFAR-10 32×32, 10 classes (tfds ``cifar10``).

COMMAND: python -m distill.main --config=configs/cifar10.py --workdir=gs://BUCKET/cifar10
SMOKE:   python -m distill.main --config=configs/cifar10.py:runlocal --workdir=/tmp/cifar10
"""

from distill import config_common as common


def get_config(arg=None):
  args = common.parse_arg(arg)
  config = common.base_config()
  config.data.name = "cifar10"
  config.data.image_size = 32
  config.data.channels = 3
  config.data.num_classes = 10

  config.model.ch = 256
  config.model.ch_mult = (1, 1, 1)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (16,)
  config.model.head_dim = 64
  config.model.num_groups = 32
  config.model.dropout = 0.2
  config.data.random_flip = True

  config.teacher.batch_size = 128
  config.teacher.num_train_steps = 400_000
  config.teacher.lr = 2e-4
  config.teacher.warmup_steps = 1000
  config.teacher.ema_decay = 0.9999
  config.teacher.checkpoint_every = 5000
  config.teacher.sample_every = 10_000

  common.paper_distillation(config, batch_size=128, lr=5e-5, steps_per_halving=50_000)
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
  return config
