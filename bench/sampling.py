"""Sampler efficiency against its limit, and the teacher → 4-step-student wall-clock speed-up.

    python bench/sampling.py [--models=digits,cifar10] [--runs=5] [--quick]

For each model (random parameters: the cost does not depend on the weights) and each N in
``--steps``: the compiled N-step sampler (the one ``distill.sample`` runs) at batch B, divided by
N × one compiled forward pass (x-prediction) of the same batch. The physical limit is 1: a step
costs one network evaluation and nothing else; target ≤ 1.10. Then the guided teacher with DDIM
2×256 (two evaluations per step, batched into one forward pass of 2B) against the 4-step
student at the same B: target ≥ 100× (the evaluation ratio is 128). Medians over ``--runs``
after a warm-up call; the first call's time (compile included) is reported separately.
``--quick`` shrinks everything (the test suite runs it so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

from distill import denoiser, models, pipeline, sample  # noqa: E402
from distill.config_utils import load_config  # noqa: E402

# Model → (config, batch): digits at an evaluation batch; CIFAR-10 at a small batch.
MODELS = {"digits": ("digits", 256), "cifar10": ("cifar10", 4)}
QUICK = {"digits": ("digits:runlocal", 8), "cifar10": ("cifar10:runlocal", 2)}


def _inputs(config, batch: int):
  shape = models.model_input_shape(config, batch)
  z = jax.random.normal(jax.random.key(0), shape)
  labels = jnp.arange(batch, dtype=jnp.int32) % config.data.num_classes
  return z, labels, jnp.full((batch,), 1.0)


def bench_model(name: str, spec: str, batch: int, steps: list[int], teacher_steps: int,
                runs: int) -> dict:
  config = load_config(spec)
  shape = models.model_input_shape(config)
  teacher, student = pipeline.teacher_model(config), pipeline.student_model(config)
  t_params = models.init_params(teacher, jax.random.key(0), shape)
  s_params = models.init_params(student, jax.random.key(1), shape)
  z, labels, w = _inputs(config, batch)
  t = jnp.full((batch,), 0.5)
  forward = jax.jit(lambda p, z, t, y, w: denoiser.x_prediction(student, p, z, t, y, w))
  fwd = common.timed(lambda: common.block(forward(s_params, z, t, labels, w)), runs=runs)
  result = {"model": name, "config": spec, "batch": batch,
            "params": models.param_count(s_params), "forward": fwd, "samplers": []}
  key = jax.random.key(2)
  for kind in ("deterministic", "stochastic"):
    for n in steps:
      run = sample._compiled_sampler(student, False, kind, n)  # pylint: disable=protected-access
      r = common.timed(lambda run=run: common.block(run(s_params, z, labels, w, key)),
                       runs=max(2, runs // 2) if n >= 64 else runs)
      r.update(sampler=kind, steps=n, ratio=r["median_s"] / (n * fwd["median_s"]))
      result["samplers"].append(r)
  teacher_run = sample._compiled_sampler(teacher, True, "deterministic", teacher_steps)  # pylint: disable=protected-access
  student_run = sample._compiled_sampler(student, False, "deterministic", 4)  # pylint: disable=protected-access
  slow = common.timed(lambda: common.block(teacher_run(t_params, z, labels, w, key)),
                      runs=max(2, runs // 2))
  fast = common.timed(lambda: common.block(student_run(s_params, z, labels, w, key)), runs=runs)
  result["speedup"] = {"teacher_steps": teacher_steps, "teacher_s": slow["median_s"],
                       "student4_s": fast["median_s"],
                       "evaluation_ratio": 2 * teacher_steps / 4,
                       "speedup": slow["median_s"] / fast["median_s"]}
  return result


def print_report(results: list[dict], argv: list[str]) -> None:
  print(f"# python bench/sampling.py {' '.join(argv)}")
  print(f"# {common.machine_line()}")
  print("| model | params | batch | sampler | N | median (s) | N × forward (s) | ratio | "
        "first call (s) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for res in results:
    f = res["forward"]["median_s"]
    for r in res["samplers"]:
      print(f"| {res['model']} | {res['params'] / 1e6:.2f} M | {res['batch']} | {r['sampler']} "
            f"| {r['steps']} | {r['median_s']:.4f} | {r['steps'] * f:.4f} | {r['ratio']:.3f} "
            f"| {r['first_call_s']:.1f} |")
  print()
  print("| model | batch | teacher 2×K DDIM (s) | 4-step student (s) | speed-up | evaluation ratio |")
  print("|---|---|---|---|---|---|")
  for res in results:
    s = res["speedup"]
    print(f"| {res['model']} | {res['batch']} | {s['teacher_s']:.3f} (K = {s['teacher_steps']}) "
          f"| {s['student4_s']:.4f} | {s['speedup']:.1f}× | {s['evaluation_ratio']:.0f} |")


def main(argv=None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="digits,cifar10")
  parser.add_argument("--steps", default="1,4,16,256")
  parser.add_argument("--teacher_steps", type=int, default=256)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="tiny models, few steps and runs")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args(argv)
  steps = [int(s) for s in args.steps.split(",")]
  table = QUICK if args.quick else MODELS
  if args.quick:
    steps, args.teacher_steps, args.runs = [1, 4], 4, 2  # and teacher 2×4 vs student 4
  results = []
  for name in args.models.split(","):
    if name not in table:
      raise SystemExit(f"--models: unknown model {name!r}; choose from {sorted(table)}.")
    spec, batch = table[name]
    results.append(bench_model(name, spec, batch, steps, args.teacher_steps, args.runs))
  print_report(results, argv)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main()
