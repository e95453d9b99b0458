"""The host-side cost of one eval cell's metrics: FID and precision/recall of a cell's features
against the real data's, per cell from scratch (``frechet_distance``, ``precision_recall``) and
against a ``metrics.Reference`` computed once per evaluation (``frechet_distance_to``,
``precision_recall_to``), as the eval stage does.

    python bench/eval_metrics.py                  # ImageNet's sizes: 2048 features, 10k for P/R
    python bench/eval_metrics.py --pr_samples=5000 --runs=3
    python bench/eval_metrics.py --quick          # a smoke run at small sizes

Both ways give the same numbers (the script checks it); only time is measured. Features are
Gaussian with a random covariance of full rank (no model is run).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

from distill.evaluation import metrics  # noqa: E402


def _features(rng, n: int, dim: int, shift: float) -> np.ndarray:
  mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  return rng.normal(size=(n, dim)) @ mix + shift


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dim", type=int, default=2048, help="features (Inception's pool: 2048)")
  parser.add_argument("--pr_samples", type=int, default=10_000,
                      help="samples per set for precision and recall (eval.pr_samples)")
  parser.add_argument("--runs", type=int, default=3, help="cells timed each way")
  parser.add_argument("--quick", action="store_true", help="256 features, 500 samples, 2 runs")
  args = parser.parse_args(argv)
  if args.quick:
    args.dim, args.pr_samples, args.runs = 256, 500, 2
  rng = np.random.default_rng(0)
  real = _features(rng, args.pr_samples, args.dim, 0.0)
  fake = _features(rng, args.pr_samples, args.dim, 0.1)
  stats = {}
  for name, x in (("real", real), ("fake", fake)):
    s = metrics.FeatureStats(args.dim)
    s.update(x)
    stats[name] = (s.mean, s.cov)

  def per_cell():
    return (metrics.frechet_distance(*stats["fake"], *stats["real"]),
            *metrics.precision_recall(real, fake))

  t0 = time.perf_counter()
  reference = metrics.Reference.of(*stats["real"], real)
  once_s = time.perf_counter() - t0

  def against_reference():
    return (metrics.frechet_distance_to(reference, *stats["fake"]),
            *metrics.precision_recall_to(reference, fake))

  rows = {}
  for name, fn in (("per cell from scratch", per_cell),
                   ("against the reference", against_reference)):
    times, values = [], None
    for _ in range(args.runs):
      t0 = time.perf_counter()
      values = fn()
      times.append(time.perf_counter() - t0)
    rows[name] = {"median_s": float(np.median(times)), "values": values}
  a, b = (rows[k]["values"] for k in rows)
  if not np.allclose(a, b, rtol=1e-8, atol=1e-10):
    raise SystemExit(f"the two ways disagree: {a} vs {b}")

  print(f"# python bench/eval_metrics.py {' '.join(argv)}".rstrip())
  print(f"# {common.machine_line()}")
  print(f"| features | samples per set (P/R) | metrics of one cell | median of {args.runs} |")
  print("|---|---|---|---|")
  for name, row in rows.items():
    print(f"| {args.dim} | {args.pr_samples} | {name} | {row['median_s']:.2f} s |")
  print(f"| {args.dim} | {args.pr_samples} | the reference itself, once per evaluation | "
        f"{once_s:.2f} s |")
  return {"rows": rows, "reference_s": once_s, "dim": args.dim, "pr_samples": args.pr_samples}


if __name__ == "__main__":
  main()
