r"""Stable Diffusion 1.5 distilled for every guidance weight (paper §4.2, text-to-image).

COMMAND: python -m distill.main --config=configs/sd15.py \
             --config.teacher.pretrained=stable-diffusion-v1-5 \
             --config.data.data_dir=gs://BUCKET/laion-shards --workdir=gs://BUCKET/sd15
SMOKE:   python -m distill.main --config=configs/sd15.py:runlocal --workdir=runs/sd15_local

The teacher is a diffusers-layout SD 1.x folder (``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``); it is fine-tuned to v-prediction (``teacher_v``), then distilled:
stage one for w ∈ [2, 14] (diffusers' guidance_scale ∈ [3, 15]: our w is guidance_scale − 1),
batch 512, 3000 steps; then the halvings from 512 steps, 2000 steps each and 20 000 for
students with 4 steps or fewer, no EMA. The paper evaluates at w = 8. The data are
image–caption pairs at 512² (``data.name = "image_text"``: webdataset ``.tar`` shards as
img2dataset writes them, or a folder with ``captions.jsonl``; ``distill/image_text.py``).
Mesh: ``mesh.fsdp = 8`` splits the train state and the frozen teacher over groups of 8 chips
(2.0 GiB per chip instead of 17.6 GiB replicated). By the compiled plan (BENCHMARKS.md, "The
compiled memory plan on fsdp meshes"), a step peaks at 11.9 GiB (stage one) and 12.3 GiB (stage
two) per chip at per-chip batch 1 and at 18.8 / 22.9 GiB at 4: a v5e-64 slice trains at
``--config.stage_one.batch_size=64 --config.stage_two.batch_size=64``, a v4-32 slice (16 chips,
per-chip batch 4) at 64 too, in float32. The paper's 512 needs 8× the chips, or the savings
the plan did not count: ``--config.latent.dtype=bfloat16`` (activations) and
``--config.latent.remat=True`` (not measurable on a CPU).
``runlocal`` runs the whole chain on CPU over the tiny SD-like fixture
(``tests/fixtures/latent/tiny-sd``, random weights) and the digits, each with the prompt
``latent.prompt_template`` of its class name.
"""

import pathlib

from distill import config_common as common

REPO = pathlib.Path(__file__).resolve().parent.parent


def get_config(arg=None):
  args = common.parse_arg(arg)
  config = common.latent_base_config(pretrained="", conditioning="text")
  config.data.name = "image_text"
  config.data.data_dir = ""  # shards or a captions.jsonl folder: --config.data.data_dir=...
  config.data.held_out = 0  # local files: the first held_out pairs are the held-out split
  # Or a prepared tfds data set with an "image" and a text feature (its tfds data_dir in
  # data.data_dir), e.g. --config.data.tfds_name=coco_captions; the first caption of a sequence.
  config.data.tfds_name = ""
  config.data.tfds_caption = "captions/text"  # the text feature, "/" into nested features
  config.data.tfds_train_split = "train"
  config.data.tfds_held_out_split = "val"
  config.data.image_size = 512
  config.data.channels = 3
  config.data.num_classes = 0  # captions, no labels
  config.data.random_flip = True

  common.paper_latent_distillation(config, w_min=2.0, w_max=14.0, sample_w=(2.0, 8.0))
  # The paper's evaluation (add eval to --config.stages): w = 8, 5000 samples of the 5000 COCO-2017
  # validation captions (--config.eval.captions_file=FILE, one per line), FID on the FID
  # Inception (--config.eval.inception_weights) and the CLIP score with OpenCLIP ViT-g/14
  # (--config.eval.clip_model=FOLDER). More w (e.g. --config.eval.w_values=2,4,8,14) trace the
  # FID / CLIP score trade-off of the paper's Fig. 10.
  config.eval.w_values = (8.0,)
  config.eval.num_samples = 5000
  config.mesh.fsdp = 8  # the state split over groups of 8 chips (the docstring's plan)
  if args.get("runlocal"):
    config.mesh.fsdp = 1
    common.shrink_latent_for_cpu(
        config, pretrained=str(REPO / "tests" / "fixtures" / "latent" / "tiny-sd"))
    config.latent.prompt_template = "a handwritten digit {label}"
  return config
