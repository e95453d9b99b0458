r"""Embedded default: scikit-learn's 8×8 digits, 10 classes.

COMMAND: python -m distill.main --config=configs/digits.py --workdir=runs/digits
SMOKE:   python -m distill.main --config=configs/digits.py:runlocal --workdir=/tmp/digits
"""

import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location(
    "distill_configs_common", pathlib.Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
  args = common.parse_arg(arg)
  config = common.base_config()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10

  config.model.ch = 32
  config.model.ch_mult = (1, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (4,)
  config.model.head_dim = 32
  config.model.num_groups = 8
  config.model.dropout = 0.1

  config.teacher.batch_size = 128
  config.teacher.num_train_steps = 6000
  config.teacher.lr = 1e-3
  config.teacher.warmup_steps = 200
  config.teacher.ema_decay = 0.999
  config.teacher.checkpoint_every = 1000
  config.teacher.sample_every = 1000
  if args.get("runlocal"):
    common.shrink_for_cpu(config)
    config.model.ch = 16
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.head_dim = 16
  return config
