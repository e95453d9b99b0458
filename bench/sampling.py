"""Sampler efficiency against its limit, and the teacher → 4-step-student wall-clock speed-up.

    python bench/sampling.py [--models=digits,cifar10] [--steps=1,4,16,256] [--runs=5]
        [--samplers=deterministic,stochastic] [--warmup=call|compile] [--quick]

For each model (random parameters: the cost does not depend on the weights) and each N in
``--steps``: the compiled N-step sampler (the one ``distill.sample`` runs) at batch B, divided by
N × one compiled forward pass (x-prediction) of the same batch. The physical limit is 1: a step
costs one network evaluation and nothing else; target ≤ 1.10. Then the guided teacher with DDIM
2×256 (two evaluations per step, batched into one forward pass of 2B) against the 4-step
student at the same B: target ≥ 100× (the evaluation ratio is 128). Medians over ``--runs``
(half as many, at least 2, for N ≥ 64 and the teacher) after a warm-up call; the first call's
time (compile included) is reported separately. Each timed sampler run is followed by
min(N, 16) timed forward passes, and each teacher run by three student runs, so that a ratio
compares two functions timed in the same minutes of a machine whose speed drifts.
``--warmup=compile`` warms up by compiling ahead of time instead of calling, and reports the
compile time: at the CIFAR-10 size one call at N = 256 takes minutes, and the warm-up call
would cost as much as a timed run.
``--quick`` shrinks everything (the test suite runs it so the script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

from distill import denoiser, family, models, sample  # noqa: E402
from distill.config_utils import load_config  # noqa: E402

# Model → (config, batch): digits at an evaluation batch; CIFAR-10 at a small batch.
MODELS = {"digits": ("digits", 256), "cifar10": ("cifar10", 4)}
QUICK = {"digits": ("digits:runlocal", 8), "cifar10": ("cifar10:runlocal", 2)}


def _inputs(config, batch: int):
  shape = models.model_input_shape(config, batch)
  z = jax.random.normal(jax.random.key(0), shape)
  labels = jnp.arange(batch, dtype=jnp.int32) % config.data.num_classes
  return z, labels, jnp.full((batch,), 1.0)


def _warm(run, args: tuple, warmup: str):
  """``(fn, info)``: ``fn()`` calls the jitted ``run(*args)`` and blocks. Warmed up by one call
  (its time, compile included, in ``info["first_call_s"]``) or, with ``warmup="compile"``, by an
  ahead-of-time compile (``info["compile_s"]``)."""
  t0 = time.perf_counter()
  if warmup == "call":
    common.block(run(*args))
    return (lambda: common.block(run(*args))), {"first_call_s": time.perf_counter() - t0}
  compiled = run.lower(*args).compile()
  return (lambda: common.block(compiled(*args))), {"compile_s": time.perf_counter() - t0}


def _paired(a, b, *, runs: int, b_calls: int) -> tuple[list[float], list[float]]:
  """Wall times of ``a()`` and ``b()``: ``runs`` rounds of one ``a()`` then ``b_calls`` ``b()``,
  so that both see the same machine state (on a shared machine the speed drifts by 10–20 %
  over minutes, more than the overheads measured here)."""
  ta, tb = [], []
  for _ in range(runs):
    for fn, out, calls in ((a, ta, 1), (b, tb, b_calls)):
      for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
  return ta, tb


def bench_model(name: str, spec: str, batch: int, steps: list[int], teacher_steps: int,
                runs: int, warmup: str = "call",
                samplers: tuple[str, ...] = ("deterministic", "stochastic")) -> dict:
  config = load_config(spec)
  shape = models.model_input_shape(config)
  fam = family.of(config)
  teacher, student = fam.teacher, fam.student
  t_params = models.init_params(teacher, jax.random.key(0), shape)
  s_params = models.init_params(student, jax.random.key(1), shape)
  z, labels, w = _inputs(config, batch)
  t = jnp.full((batch,), 0.5)
  forward = jax.jit(lambda p, z, t, y, w: denoiser.x_prediction(fam, student, p, z, t, y, w))
  fwd, fwd_info = _warm(forward, (s_params, z, t, labels, w), warmup)
  result = {"model": name, "config": spec, "batch": batch, "warmup": warmup,
            "params": models.param_count(s_params), "forward_warmup": fwd_info, "samplers": []}
  key = jax.random.key(2)
  for kind in samplers:
    for n in steps:
      run, num_steps = sample.sampler_program(fam, guided=False, sampler=kind, steps=n)
      fn, info = _warm(run, (s_params, z, labels, w, key, None, num_steps), warmup)
      # Each sampler run is followed by min(N, 16) forward passes: the reference N × forward
      # is measured beside the sampler it is compared with.
      ts, tf = _paired(fn, fwd, runs=max(2, runs // 2) if n >= 64 else runs,
                       b_calls=min(n, 16))
      r = {"sampler": kind, "steps": n, "median_s": statistics.median(ts), "min_s": min(ts),
           "runs": len(ts), "forward_s": statistics.median(tf), **info}
      r["ratio"] = r["median_s"] / (n * r["forward_s"])
      result["samplers"].append(r)
  teacher_run, teacher_n = sample.sampler_program(fam, guided=True, sampler="deterministic",
                                                  steps=teacher_steps)
  student_run, student_n = sample.sampler_program(fam, guided=False, sampler="deterministic",
                                                  steps=4)
  slow, slow_info = _warm(teacher_run, (t_params, z, labels, w, key, None, teacher_n), warmup)
  fast, fast_info = _warm(student_run, (s_params, z, labels, w, key, None, student_n), warmup)
  t_slow, t_fast = _paired(slow, fast, runs=max(2, runs // 2), b_calls=3)
  result["speedup"] = {"teacher_steps": teacher_steps, "teacher_s": statistics.median(t_slow),
                       "student4_s": statistics.median(t_fast),
                       "teacher_runs": len(t_slow), "student4_runs": len(t_fast),
                       "teacher_warmup": slow_info, "student4_warmup": fast_info,
                       "evaluation_ratio": 2 * teacher_steps / 4}
  result["speedup"]["speedup"] = result["speedup"]["teacher_s"] / result["speedup"]["student4_s"]
  return result


def print_report(results: list[dict], argv: list[str]) -> None:
  print(f"# python bench/sampling.py {' '.join(argv)}")
  print(f"# {common.machine_line()}")
  print("| model | params | batch | sampler | N | runs | median (s) | N × forward (s) | ratio | "
        "first call (s) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for res in results:
    for r in res["samplers"]:
      first = (f"{r['first_call_s']:.1f}" if "compile_s" not in r else
               f"{r['compile_s']:.1f} (compile only)")
      print(f"| {res['model']} | {res['params'] / 1e6:.2f} M | {res['batch']} | {r['sampler']} "
            f"| {r['steps']} | {r['runs']} | {r['median_s']:.4f} | {r['steps'] * r['forward_s']:.4f} "
            f"| {r['ratio']:.3f} "
            f"| {first} |")
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
  parser.add_argument("--warmup", default="call", choices=["call", "compile"],
                      help="warm up by one call, or by compiling ahead of time")
  parser.add_argument("--samplers", default="deterministic,stochastic")
  parser.add_argument("--quick", action="store_true", help="tiny models, few steps and runs")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args(argv)
  steps = [int(s) for s in args.steps.split(",")]
  samplers = tuple(args.samplers.split(","))
  for kind in samplers:
    if kind not in sample.SAMPLERS:
      raise SystemExit(f"--samplers: unknown sampler {kind!r}; choose from {list(sample.SAMPLERS)}.")
  table = QUICK if args.quick else MODELS
  if args.quick:
    steps, args.teacher_steps, args.runs = [1, 4], 4, 2  # and teacher 2×4 vs student 4
  results = []
  for name in args.models.split(","):
    if name not in table:
      raise SystemExit(f"--models: unknown model {name!r}; choose from {sorted(table)}.")
    spec, batch = table[name]
    results.append(bench_model(name, spec, batch, steps, args.teacher_steps, args.runs,
                               args.warmup, samplers))
  print_report(results, argv)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main()
