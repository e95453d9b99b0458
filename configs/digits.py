r"""Embedded default: scikit-learn's 8×8 digits, 10 classes.

COMMAND: python -m distill.main --config=configs/digits.py --workdir=runs/digits
SMOKE:   python -m distill.main --config=configs/digits.py:runlocal --workdir=/tmp/digits
"""

from distill import config_common as common


def get_config(arg=None):
  args = common.parse_arg(arg)
  config = common.base_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10

  # Sized for 2 CPU cores: the whole pipeline (teacher, stage one, seven halvings 128 -> 1) and
  # its eval stage took 26 minutes on the Intel Xeon of BENCHMARKS.md, "One XLA device per core"
  # (distill.main splits the CPU into one device per core).
  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (4,)
  config.model.head_dim = 32
  config.model.num_groups = 8
  config.model.dropout = 0.1

  config.teacher.batch_size = 64
  config.teacher.num_train_steps = 6000
  config.teacher.lr = 1e-3
  config.teacher.warmup_steps = 200
  config.teacher.ema_decay = 0.999
  config.teacher.checkpoint_every = 1000
  config.teacher.sample_every = 2000

  # Errors relative to the guided target's scale (1/(1+w)^2): with the uniform weight of Eq. 3
  # the large-w errors dominate and this small student drifts from the teacher at small w
  # (BENCHMARKS.md, "Stage one at small w").
  config.stage_one.w_loss_weight = "inverse_square"
  config.stage_two.w_loss_weight = "inverse_square"
  # w = 4·u², u ~ U[0, 1]: half the draws below w = 1 instead of a quarter; brings stage one at
  # w = 0 from 1.10× to 1.03× the teacher's FID (BENCHMARKS.md, "Stage one at small w").
  config.stage_one.w_sample_power = 2.0
  config.stage_one.batch_size = 64
  config.stage_one.num_train_steps = 3000
  config.stage_one.lr = 1e-3
  config.stage_one.warmup_steps = 100
  config.stage_one.lr_decay = "linear"
  config.stage_one.ema_decay = 0.99
  config.stage_one.checkpoint_every = 1000
  config.stage_one.sample_every = 3000

  config.stage_two.batch_size = 64
  config.stage_two.start_num_steps = 128
  config.stage_two.end_num_steps = 1
  # The students with 64 to 8 steps learn their teacher's two steps to a loss below 1e-4 within
  # 200 steps; those with 4, 2 and 1 steps train longer (BENCHMARKS.md, "The default run with
  # 200-step halvings").
  config.stage_two.train_steps_per_halving = 200
  config.stage_two.long_halving_max_steps = 4
  config.stage_two.long_halving_train_steps = 800
  config.stage_two.lr = 2e-4
  config.stage_two.warmup_steps = 20
  config.stage_two.lr_decay = "linear"
  config.stage_two.ema_decay = 0.0
  config.stage_two.checkpoint_every = 200
  config.stage_two.sample_every = 800

  # The distilled encoder (paper §4.3), for style transfer: --config.stages=encoder on a finished
  # run. The stage-one student encoding with 32 DDIM steps is the first teacher; encoders of 16 to
  # 1 steps train as the halvings above do (docs/editing.md, "Style transfer").
  common.encoder_as_halvings(config, start_num_steps=32)

  # Every method, step count and w of the Table-1 comparison, with one seed of 1000 samples per
  # cell: a third of the eval time of three seeds. --config.eval.seeds=0,1,2 gives the
  # mean ± std over three (docs/evaluation.md).
  config.eval.seeds = (0,)
  # The reference: the guided teacher at 2×128 steps, within 1.1 % of its FID at 2×256 at every w
  # and half the time (BENCHMARKS.md, "A cheaper reference?"); --config.eval.teacher_steps=256
  # for the longer one.
  config.eval.teacher_steps = 128
  if args.get("runlocal"):
    common.shrink_for_cpu(config)
    config.model.ch = 16
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.head_dim = 16
  return config
