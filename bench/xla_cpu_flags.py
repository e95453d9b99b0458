"""The XLA:CPU options that ``distill`` sets (``distill/xla_cpu.py``) against XLA's defaults.

    python bench/xla_cpu_flags.py [--models=digits,cifar10] [--rounds=3] [--runs=5] [--quick]

XLA reads its flags once per process, so each setting runs in its own subprocess: one with the
package's options (YNNPACK fusions off), one with ``DISTILL_XLA_CPU_DEFAULTS=0`` (XLA's defaults),
alternating for ``--rounds`` rounds so that both see the same machine state. Each subprocess
times the U-Net's forward pass (x-prediction) and a forward + backward pass (gradient of a
mean-squared error, dropout on) at the model's batch, medians of ``--runs`` calls after a warm-up
call, and saves both outputs; the parent reports medians over rounds, the ratio, and how far the
two settings' outputs differ (the option changes how XLA compiles, not what it computes).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

from distill.xla_cpu import DEVICE_COUNT_FLAG, YNN_FUSION_FLAG  # noqa: E402

MODELS = {"digits": ("digits", 128), "cifar10": ("cifar10", 4)}
QUICK = {"digits": ("digits:runlocal", 8), "cifar10": ("cifar10:runlocal", 2)}
SETTINGS = {"package options": "1", "XLA defaults": "0"}


def worker(spec: str, batch: int, runs: int, out: str) -> None:
  """Runs in the subprocess: times and saves the forward pass and the gradient."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from distill import denoiser, family, models  # pylint: disable=import-outside-toplevel
  from distill.config_utils import load_config  # pylint: disable=import-outside-toplevel

  config = load_config(spec)
  fam = family.of(config)
  student = fam.student
  params = models.init_params(student, jax.random.key(1), models.model_input_shape(config))
  z = jax.random.normal(jax.random.key(0), models.model_input_shape(config, batch))
  t = jnp.linspace(0.05, 0.95, batch)
  labels = jnp.arange(batch, dtype=jnp.int32) % config.data.num_classes
  w = jnp.full((batch,), 1.0)

  def loss(p):
    x = denoiser.x_prediction(fam, student, p, z, t, labels, w, train=True,
                              rngs={"dropout": jax.random.key(3)})
    return jnp.mean(jnp.square(x))

  forward = jax.jit(lambda p: denoiser.x_prediction(fam, student, p, z, t, labels, w))
  grad = jax.jit(jax.grad(loss))
  result = {"ynn_fusions": forward.lower(params).compile().as_text().count("__ynn_fusion")}
  for name, fn in (("forward", forward), ("grad", grad)):
    result[name] = common.timed(lambda fn=fn: common.block(fn(params)), runs=runs)["median_s"]
  np.savez(out + ".npz", forward=np.asarray(forward(params)),
           grad=np.concatenate([np.ravel(g) for g in jax.tree.leaves(grad(params))]))
  pathlib.Path(out + ".json").write_text(json.dumps(result))


def _env(value: str) -> dict:
  """This process's environment with the package's options on ("1") or off ("0"), whatever
  ``XLA_FLAGS`` says now (importing ``distill`` here would already have added them), and one CPU
  device: the package sets its option only then (``distill/xla_cpu.py``)."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if f.split("=", 1)[0] not in (YNN_FUSION_FLAG, DEVICE_COUNT_FLAG)]
  env = dict(os.environ, DISTILL_XLA_CPU_DEFAULTS=value, XLA_FLAGS=" ".join(flags))
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return env


def bench_model(name: str, spec: str, batch: int, rounds: int, runs: int) -> dict:
  times = {s: {"forward": [], "grad": []} for s in SETTINGS}
  outputs, ynn = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(rounds):
      for setting, value in SETTINGS.items():
        out = os.path.join(tmp, f"{value}_{r}")
        env = _env(value)
        subprocess.run([sys.executable, __file__, "--worker", spec, str(batch), str(runs), out],
                       check=True, env=env)
        res = json.loads(pathlib.Path(out + ".json").read_text())
        for k in ("forward", "grad"):
          times[setting][k].append(res[k])
        ynn[setting] = res["ynn_fusions"]
        if r == 0:
          outputs[setting] = dict(np.load(out + ".npz"))
  ours, xla = (outputs[s] for s in SETTINGS)
  result = {"model": name, "config": spec, "batch": batch, "rounds": rounds, "ynn_fusions": ynn,
            "forward_max_abs_diff": float(np.abs(ours["forward"] - xla["forward"]).max()),
            "grad_rel_diff": float(np.linalg.norm(ours["grad"] - xla["grad"]) /
                                   np.linalg.norm(xla["grad"]))}
  for k in ("forward", "grad"):
    a, b = (statistics.median(times[s][k]) for s in SETTINGS)
    result[k] = {"package_s": a, "xla_default_s": b, "ratio": a / b}
  return result


def print_report(results: list[dict], argv: list[str]) -> None:
  print(f"# python bench/xla_cpu_flags.py {' '.join(argv)}")
  print(f"# {common.machine_line()}")
  print("| model | batch | pass | package options (s) | XLA defaults (s) | ratio | "
        "YNN fusions (package / XLA) |")
  print("|---|---|---|---|---|---|---|")
  for res in results:
    for k in ("forward", "grad"):
      r = res[k]
      print(f"| {res['model']} | {res['batch']} | {k} | {r['package_s']:.4f} | "
            f"{r['xla_default_s']:.4f} | {r['ratio']:.2f} | "
            f"{' / '.join(str(v) for v in res['ynn_fusions'].values())} |")
  for res in results:
    print(f"# {res['model']}: forward outputs differ by at most {res['forward_max_abs_diff']:.2e}, "
          f"gradients by {res['grad_rel_diff']:.2e} (relative)")


def main(argv=None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] == "--worker":
    worker(argv[1], int(argv[2]), int(argv[3]), argv[4])
    return []
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="digits,cifar10")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="tiny models, one round, few runs")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args(argv)
  table = QUICK if args.quick else MODELS
  if args.quick:
    args.rounds, args.runs = 1, 2
  results = []
  for name in args.models.split(","):
    if name not in table:
      raise SystemExit(f"--models: unknown model {name!r}; choose from {sorted(table)}.")
    results.append(bench_model(name, *table[name], args.rounds, args.runs))
  print_report(results, argv)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main()
