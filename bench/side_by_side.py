"""The teacher and the students of a finished workdir side by side, a row per prompt (or class).

    python bench/side_by_side.py --workdir=runs/emoji --w=4 --teacher_steps=256 \
        --students=4,1 --prompt="grinning face" --prompt="red heart" --out=side_by_side.png

The picture of the report's ``side_by_side_w<w>.png`` (``distill/evaluation/report.py``) for
prompts of your choice: sample ``j`` of every column starts from the same noise (the seed and
``j``), the teacher with guided DDIM at ``--teacher_steps`` steps (two evaluations each), each
student with its deterministic sampler. README's text-to-image picture is made by this script.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import

from distill import paths, sample  # noqa: E402  pylint: disable=wrong-import-position
from distill.evaluation import report  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None) -> pathlib.Path:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--w", type=float, default=4.0)
  parser.add_argument("--teacher_steps", type=int, default=256)
  parser.add_argument("--students", default="4,1", help="the students' step counts, in order")
  parser.add_argument("--prompt", action="append", default=[], help="repeat for several rows")
  parser.add_argument("--labels", default="", help="class labels instead of prompts")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="side_by_side.png")
  args = parser.parse_args(argv)
  if bool(args.prompt) == bool(args.labels):
    raise SystemExit("pass --prompt (repeated) or --labels, one of them.")
  workdir = paths.resolve(args.workdir)
  prompts = args.prompt or None
  labels = None if prompts else np.asarray([int(v) for v in args.labels.split(",")])
  conditions = prompts or [f"class {label}" for label in labels]
  count = len(conditions)
  columns = [("teacher", args.teacher_steps)] + [
      ("student", int(n)) for n in args.students.split(",") if n.strip()]
  heads = []
  for method, steps in columns:
    loaded = (sample.load_model(workdir, "teacher") if method == "teacher" else
              sample.load_model(workdir, "student", num_steps=steps))
    x = sample.generate(loaded, sampler="deterministic",
                        num_steps=steps if method == "teacher" else None, labels=labels,
                        prompts=prompts, w=np.full(count, args.w), seed=args.seed)
    heads.append((method, steps, x, conditions))
  out = pathlib.Path(paths.resolve(args.out))
  report.draw_side_by_side(heads, w=args.w, path=out)
  print(f"{out}: {count} rows, columns {', '.join(f'{m} {s}' for m, s in columns)}, w = {args.w:g}")
  return out


if __name__ == "__main__":
  main()
