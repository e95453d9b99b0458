"""Style transfer with a distilled encoder and decoder (paper §4.3, Fig. 12), measured.

    python bench/style_transfer.py --workdir=runs/digits --steps=16,4,1 --w=0 --ddim_steps=16

The sources are the held-out images (up to ``eval.num_samples``), each with its class (or
caption). Source ``j`` is encoded under its own condition A, DDIM encoding (Eq. 2 from the data to
``t = 1``), and the code is decoded under B: the next class, ``(A + 1) mod K`` (for captions, the
caption of source ``j + 1``). Methods, all at the same ``w``:

- **distilled k + k**: the distilled encoder of k steps (``encoder/N=k``), then the stage-two
  student of k steps;
- **DDIM k + k, teacher**: the guided teacher encodes and decodes with DDIM at ``--ddim_steps``
  (two network evaluations a step), the paper's baseline, and at each student's k;
- **DDIM k + k, stage one**: the w-conditioned student before the halvings, DDIM both ways.

Measured: the share classified as B (for captions, the CLIP score to B with the evaluator CLIP),
FID against the training images (the report's features), the RMS distance to the source in
[−1, 1], and the reconstruction: the RMS distance to the source when B = A (how well the decoder
inverts the encoder). Writes ``style_transfer.json``, ``.md`` and ``.png`` (rows: the sources,
then each method's transfers) to ``--out`` (default ``WORKDIR/report/style_transfer``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

from distill import images, input_pipeline, layout, paths, sample  # noqa: E402  pylint: disable=wrong-import-position
from distill.evaluation import evaluate, features  # noqa: E402  pylint: disable=wrong-import-position
from distill.latent import clip_loader  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", default="16,4,1",
                      help="step counts k of the distilled encoder + student pairs")
  parser.add_argument("--w", type=float, default=0.0, help="the guidance weight (paper: 0)")
  parser.add_argument("--ddim_steps", type=int, default=16,
                      help="the teacher's DDIM encoder and decoder steps (paper: 16)")
  parser.add_argument("--num_sources", type=int, default=None,
                      help="held-out sources (default eval.num_samples)")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  workdir = paths.resolve(args.workdir)
  config = paths.resolve_config(layout.workdir_config(workdir))
  w = float(args.w)
  steps = [int(s) for s in args.steps.split(",") if s.strip()]
  out = pathlib.Path(paths.resolve(args.out) if args.out else
                     pathlib.Path(workdir) / "report" / "style_transfer")
  out.mkdir(parents=True, exist_ok=True)

  extract, info = features.make_extractor(config, workdir)
  ref = features.real_reference(config, extract, pathlib.Path(workdir) / "report")
  captioned = input_pipeline.captioned(config.data)
  clip = clip_loader.load(config.eval.clip_model) if captioned else None
  x_src, conds = common.held_out_sources(config,
                                         args.num_sources or int(config.eval.num_samples))
  n = len(x_src)
  targets = ([conds[(j + 1) % n] for j in range(n)] if captioned
             else (conds + 1) % config.data.num_classes)
  key = "prompts" if captioned else "labels"

  def score(x, cond) -> dict:
    m = evaluate.cell_metrics(extract, x, None if captioned else cond, ref,
                              pr_samples=int(config.eval.pr_samples),
                              class_accuracy=not captioned, clip=clip,
                              prompts=cond if captioned else None)
    return {"fid": m["fid"], "score": m["clip_score" if captioned else "class_accuracy"]}

  def transfer(decoder, encoder, k, target):
    return sample.generate(decoder, sampler="deterministic", num_steps=k, w=np.full(n, w),
                           seed=0, batch_size=int(config.eval.batch_size), source=x_src,
                           encoder=encoder, **{key: target, f"source_{key}": conds})

  load = lambda kind, k=None: sample.load_model(workdir, kind, num_steps=k, config=config)
  teacher, stage_one = load("teacher"), load("stage_one")
  methods = []
  for k in steps:
    methods.append((f"distilled {k} + {k}", k, 1, load("student", k), load(sample.ENCODER, k)))
  for k in sorted({args.ddim_steps, *steps}, reverse=True):
    methods.append((f"DDIM {k} + {k}, teacher", k, 2, teacher, teacher))
  for k in sorted({args.ddim_steps, *steps}, reverse=True):
    methods.append((f"DDIM {k} + {k}, stage one", k, 1, stage_one, stage_one))

  rows, shown = [], [x_src[:10]]
  for name, k, evals, decoder, encoder in methods:
    t0 = time.time()
    x = transfer(decoder, encoder, k, targets)
    seconds = time.time() - t0
    back = transfer(decoder, encoder, k, conds)
    rows.append(dict(method=name, steps=k, evaluations=2 * k * evals,
                     rms_to_source=float(np.sqrt(np.mean((x - x_src) ** 2))),
                     reconstruction_rms=float(np.sqrt(np.mean((back - x_src) ** 2))),
                     seconds=round(seconds, 1), **score(x, targets)))
    baseline = f"DDIM {args.ddim_steps} + {args.ddim_steps}, teacher"
    if name.startswith("distilled") or name == baseline:
      shown.append(x[:10])
    print(f"{name}: {rows[-1]}", flush=True)

  what = "CLIP score to B" if captioned else "share classified as B"
  lines = [f"Style transfer on {config.data.name}, w = {w:g}, {n} held-out sources, A -> "
           f"{'the next caption' if captioned else '(A + 1) mod K'}; features: {info['features']}",
           "", f"| method | network evaluations | {what} | FID | RMS to source | "
           "reconstruction RMS (B = A) |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['evaluations']} | {r['score']:.3f} | {r['fid']:.2f} | "
                 f"{r['rms_to_source']:.3f} | {r['reconstruction_rms']:.3f} |")
  table = "\n".join(lines) + "\n"
  (out / "style_transfer.md").write_text(table)
  (out / "style_transfer.json").write_text(json.dumps(dict(
      rows=rows, w=w, num_sources=n, ddim_steps=args.ddim_steps, features=info["features"],
      score=what), indent=1) + "\n")
  images.save_png(images.grid(np.concatenate(shown), rows=len(shown)), out / "style_transfer.png",
                  scale=4)
  print(table)
  print(f"wrote {out}/style_transfer.md, .json, .png (rows: the sources, then the distilled "
        f"pairs and DDIM {args.ddim_steps} + {args.ddim_steps})")
  return {"rows": rows}


if __name__ == "__main__":
  main()
