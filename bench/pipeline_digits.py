"""Wall time of every stage of the digits pipeline, peak memory, and sample grids.

    python bench/pipeline_digits.py --workdir=runs/bench_digits [--config=configs/digits.py]
        [--stages=teacher,stage_one,stage_two]

Runs ``distill.pipeline.run`` (a fresh workdir measures everything; a finished one only
re-renders), then prints a Markdown table of each link's wall time and steps/s from
``manifest.json``, the process's peak resident memory, and writes PNG grids to
``WORKDIR/bench/``: the teacher with guided DDIM at 2×256 steps (rows w = 0, 1, 4) and each
student at its own step count.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from distill import images, layout, pipeline, sample
from distill.config_utils import load_config


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--teacher_steps", type=int, default=256)
  parser.add_argument("--stages", default="", help="override config.stages (e.g. without eval)")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)  # progress lines, as under distill.main
  config = load_config(args.config)
  if args.stages:
    config.stages = args.stages
  workdir = epath.Path(args.workdir)
  start = time.time()
  pipeline.run(config, workdir)
  total = time.time() - start
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

  manifest = json.loads((workdir / "manifest.json").read_text())
  out = workdir / "bench"
  w_values = (0.0, 1.0, 4.0)
  labels = np.tile(np.arange(10) % config.data.num_classes, len(w_values))
  w = np.repeat(w_values, 10)
  grids = {}
  for link in layout.chain(config):
    if link.stage == "encoder":  # encoders do not sample (bench/style_transfer.py measures them)
      continue
    kind = {"teacher": "teacher", "stage_one": "stage_one"}.get(link.name, "student")
    loaded = sample.load_model(workdir, kind, num_steps=link.num_steps, config=config)
    steps = {"teacher": args.teacher_steps,
             "stage_one": config.stage_one.sample_steps}.get(kind, link.num_steps)
    t0 = time.time()
    samples = sample.generate(loaded, sampler="deterministic", num_steps=steps, labels=labels,
                              w=w, seed=1234)  # the same noise for every model
    seconds = time.time() - t0
    name = f"{link.name.replace('/', '_')}_{steps}steps.png"
    images.save_png(images.grid(samples, rows=len(w_values)), out / name, scale=4)
    grids[link.name] = (name, steps, seconds)

  overview = [name for name in ("teacher", "stage_one", "stage_two/N=4", "stage_two/N=1")
              if name in grids]
  tiles = [np.asarray(Image.open(out / grids[name][0])) for name in overview]
  gap = np.full((6, tiles[0].shape[1]), 128, np.uint8)
  stacked = np.concatenate([x for tile in tiles for x in (tile, gap)])[:-6]
  images.save_png(stacked[..., None], out / "overview.png")
  print(f"# overview.png, top to bottom: {', '.join(overview)} (rows w = 0, 1, 4 in each)")
  print(f"# python {' '.join(sys.argv)}")
  print(f"# {platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s), "
        f"jax {jax.__version__}; this invocation {total:.0f} s, peak RSS {peak_gib:.2f} GiB")
  print("| link | steps | wall (s) | steps/s | grid |")
  print("|---|---|---|---|---|")
  stage_total = 0.0
  for link in layout.chain(config) + ([layout.Link("eval", "eval", -1)]
                                        if "eval" in manifest["stages"] else []):
    if link.stage == "encoder" and link.name not in manifest["stages"]:
      continue  # not trained by this run
    entry = manifest["stages"].get(link.name, {})
    seconds = entry.get("seconds", float("nan"))
    stage_total += seconds
    steps = entry.get("final_step", 0)
    grid = (f"{grids[link.name][0]} ({grids[link.name][1]} sampling steps)"
            if link.name in grids else "report/")
    print(f"| {link.name} | {steps or ''} | {seconds:.0f} | "
          f"{f'{steps / seconds:.1f}' if steps else ''} | {grid} |")
  print(f"| **all stages** | | **{stage_total:.0f}** ({stage_total / 60:.1f} min) | | |")


if __name__ == "__main__":
  main()
