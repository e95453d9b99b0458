r"""The class-conditional LDM on ImageNet (cin256), distilled for every guidance weight (§4.2).

COMMAND: python -m distill.main --config=configs/ldm_cin256.py \
             --config.teacher.pretrained=ldm-cin256 --workdir=gs://BUCKET/cin256
SMOKE:   python -m distill.main --config=configs/ldm_cin256.py:runlocal --workdir=runs/cin_local

The teacher is the CompVis cin256-v2 model converted to a diffusers-layout folder
(``python -m distill.latent.convert``: ``unet/``, ``vqvae/``, ``class_embedder/`` with the null
class as its last row, ``scheduler/``); it is fine-tuned to v-prediction (``teacher_v``), then
distilled: stage one for w ∈ [0, 14], batch 512, then the halvings from 512 steps (the paper's
cin256 teacher), no EMA; the step counts are the paper's SD ones (the paper gives none for
cin256). Images are resized to the first stage's ``sample_size``.
``runlocal`` runs the whole chain on CPU over the tiny class-conditional fixture
(``tests/fixtures/latent/tiny-cin``, random weights, 10 classes + null) and the digits.
"""

import pathlib

from distill import config_common as common

REPO = pathlib.Path(__file__).resolve().parent.parent


def get_config(arg=None):
  args = common.parse_arg(arg)
  config = common.latent_base_config(pretrained="", conditioning="class")
  config.data.name = "imagenet64"
  config.data.image_size = 64
  config.data.channels = 3
  config.data.num_classes = 1000
  config.data.random_flip = True

  common.paper_latent_distillation(config, w_min=0.0, w_max=14.0, sample_w=(0.0, 4.0))
  if args.get("runlocal"):
    common.shrink_latent_for_cpu(
        config, pretrained=str(REPO / "tests" / "fixtures" / "latent" / "tiny-cin"))
  return config
