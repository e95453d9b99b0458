"""FID of stage-one checkpoints: how well the w-conditioned student learned each w.

    python bench/stage_one_fid.py --workdir=DIR [--steps=1000,2000,3000] [--w=0,1]
        [--sampling_steps=64] [--reference=DIR_WITH_REPORT] [--config=configs/digits.py]
        [--set stage_one.lr=1e-3 ...] [--teacher] [--teacher_checkpoints=4000,6000]

For every checkpoint step given (default: all in ``DIR/stage_one/checkpoints``), samples
``eval.num_samples`` class-balanced digits with the deterministic DDIM sampler at
``--sampling_steps`` steps (one evaluation each: guidance is distilled) for each w, seed 0, and
prints digits-FID against the training split. On caption data (``--config=configs/emoji.py``)
the samples are of the eval stage's prompts (``evaluate.eval_prompts``), the FID is on the
evaluator CLIP's image features, and the CLIP score is printed beside it, as in the eval stage's
report. ``--set`` applies config overrides the run was trained with that change the model
(e.g. ``model.w_fourier_scale``). The classifier and the reference statistics are read from (or
cached in) ``--reference``/report. ``--teacher`` adds the workdir's teacher with guided DDIM at
the same step count (two evaluations per step) as the yardstick: at w = 0 a perfect stage-one
student matches its conditional branch. ``--teacher_checkpoints`` adds the teacher's EMA
parameters at those steps of ``DIR/teacher/checkpoints`` (guided DDIM at the same step count):
does the teacher still improve?
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

from distill import (checkpoints, family, input_pipeline, layout, sample,  # noqa: E402
                     sharding)
from distill.config_utils import load_config  # noqa: E402
from distill.evaluation import clip_score, evaluate, features  # noqa: E402
from distill.latent import clip_loader  # noqa: E402


def main(argv=None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--steps", default="", help="checkpoint steps (default: all)")
  parser.add_argument("--w", default="0,1")
  parser.add_argument("--sampling_steps", type=int, default=64)
  parser.add_argument("--reference", default="", help="workdir whose report/ caches the "
                      "classifier and statistics (default: --workdir)")
  parser.add_argument("--set", nargs="*", default=[], help="section.field=value overrides")
  parser.add_argument("--teacher", action="store_true",
                      help="also the teacher, guided DDIM at --sampling_steps")
  parser.add_argument("--teacher_checkpoints", default="",
                      help="also these teacher checkpoint steps, guided DDIM at --sampling_steps")
  args = parser.parse_args(argv)
  config = load_config(args.config)
  for item in args.set:
    key, value = item.split("=", 1)
    section, field = key.split(".")
    config[section][field] = type(config[section][field])(value)
  # A chain that trains its parts (the emoji default) reads them, and its evaluator CLIP, here.
  config = layout.fill_trained_parts(config, args.workdir)
  reference = args.reference or args.workdir
  extract, _ = features.make_extractor(config, reference)
  ref = features.real_reference(config, extract, pathlib.Path(reference) / "report")
  fam = family.of(config)
  abstract = layout.abstract_params(fam, "stage_one", sharding.make_mesh(1))
  directory = pathlib.Path(args.workdir) / "stage_one" / "checkpoints"
  steps = ([int(s) for s in args.steps.split(",")] if args.steps else
           sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()))
  n = int(config.eval.num_samples)
  captioned = input_pipeline.captioned(config.data)
  prompts = evaluate.eval_prompts(config) if captioned else None
  labels = None if captioned else np.arange(n) % config.data.num_classes
  clip = clip_loader.load(config.eval.clip_model) if captioned else None
  text = clip_score.text_embeddings(clip, prompts) if captioned else None  # once, for every row
  rows = []
  models = [(step, None) for step in steps]
  if args.teacher:
    models.append(("teacher", sample.load_model(args.workdir, "teacher", config=config)))
  if args.teacher_checkpoints:
    teacher_abstract = layout.abstract_params(fam, "teacher", sharding.make_mesh(1))
    for step in (int(s) for s in args.teacher_checkpoints.split(",")):
      _, params = checkpoints.read_params(
          pathlib.Path(args.workdir) / "teacher" / "checkpoints" / str(step), teacher_abstract)
      models.append((f"teacher {step}", sample.LoadedModel(
          "teacher", family.of_link(config, "teacher"), params, config)))
  for step, loaded in models:
    if loaded is None:
      _, params = checkpoints.read_params(directory / str(step), abstract, what="stage one")
      loaded = sample.LoadedModel("stage_one", fam, params, config, None)
    for w in (float(v) for v in args.w.split(",")):
      x = sample.generate(loaded, sampler="deterministic", num_steps=args.sampling_steps,
                          labels=labels, prompts=prompts, w=np.full(n, w), seed=0,
                          batch_size=int(config.eval.batch_size))
      result = evaluate.metrics_of(evaluate.sample_arrays(extract, x, clip=clip), labels,
                                   ref, pr_samples=int(config.eval.pr_samples),
                                   class_accuracy=not captioned, text_embeddings=text)
      rows.append({"step": step, "w": w, "fid": result["fid"],
                   "clip_score": result["clip_score"]})
  print(f"# python bench/stage_one_fid.py {' '.join(argv)}")
  print(f"# {common.machine_line()}")
  fid = "FID" if captioned else "digits-FID"
  score = " CLIP score |" if captioned else ""
  print(f"| stage-one checkpoint step (or teacher) | w | {fid} ({args.sampling_steps} DDIM steps, "
        f"{n} samples) |{score}")
  print("|---|---|---|" + ("---|" if captioned else ""))
  for r in rows:
    shown = f" {r['clip_score']:.2f} |" if captioned else ""
    print(f"| {r['step']} | {r['w']:g} | {r['fid']:.3f} |{shown}")
  return rows


if __name__ == "__main__":
  main()
