"""Settings shared by every config: sections ``data``, ``model``, and the run-wide fields.

Each ``configs/<name>.py`` starts from ``base_config()`` and overrides what differs; its
``get_config(arg)`` accepts ``runlocal`` (``--config=configs/<name>.py:runlocal``) for a CPU
smoke run of the same code path.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.image_size = 8
  config.data.channels = 1
  config.data.num_classes = 10

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
  return config


def parse_arg(arg: str | None) -> dict:
  """``"runlocal"`` or ``"runlocal,key=value"`` → ``{"runlocal": True, "key": "value"}``."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    out[key.strip()] = value.strip() if value else True
  unknown = set(out) - {"runlocal"}
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}: the only variant is "
                     "'runlocal' (e.g. --config=configs/digits.py:runlocal).")
  return out
