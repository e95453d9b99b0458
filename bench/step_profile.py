"""Where the U-Net's gradient spends its time on this machine, with our layers and with flax's.

    python bench/step_profile.py [--model=cifar10] [--runs=3] [--top=12] [--quick]

The gradient of a training loss (mean-squared error of the U-Net's output, dropout on, the
model's bench batch) is compiled twice: with the U-Net's own layers (``distill/models/layers.py``)
and with ``flax.linen``'s Conv, Dense and GroupNorm (same parameters, autodiff gradients). Both
are timed, alternating (medians). Then one call of each is traced with ``jax.profiler`` and the
XLA:CPU thunk times are summed by kind (fusion names without their number) and by the layer
that issued them (the op_name metadata of the compiled HLO).

Caveat when reading the profile: convolutions run in Eigen's thread pool, asynchronously, and
their thunks record only the launch; the rest of the wall time is theirs. Thunks of independent
ops may run on two threads at once.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

from distill import family, models  # noqa: E402
from distill.config_utils import load_config  # noqa: E402
from distill.models import layers, unet  # noqa: E402

MODELS = {"digits": ("digits", 64), "cifar10": ("cifar10", 8)}
QUICK = {"digits": ("digits:runlocal", 4), "cifar10": ("cifar10:runlocal", 2)}
LAYER_SETS = {"ours": layers, "flax": layers.FLAX_LAYERS}


@contextlib.contextmanager
def _layers(name: str):
  unet.layers = LAYER_SETS[name]
  try:
    yield
  finally:
    unet.layers = layers


def compiled_gradients(spec: str, batch: int) -> tuple[dict, tuple]:
  """``{layer set: compiled gradient}`` and its arguments ``(params, key)``."""
  config = load_config(spec)
  model = family.of(config).teacher
  params = models.init_params(model, jax.random.key(0), models.model_input_shape(config))
  shape = models.model_input_shape(config, batch)
  z = jax.random.normal(jax.random.key(1), shape)
  target = jax.random.normal(jax.random.key(2), shape)
  logsnr = jnp.linspace(-5.0, 5.0, batch)
  labels = jnp.arange(batch, dtype=jnp.int32) % config.data.num_classes

  def loss(p, key):
    out = model.apply({"params": p}, z, logsnr, labels, train=True, rngs={"dropout": key})
    return jnp.mean((out - target) ** 2)

  args = (params, jax.random.key(3))
  out = {}
  for name in LAYER_SETS:
    with _layers(name):
      out[name] = jax.jit(jax.grad(loss)).lower(*args).compile()
  return out, args


def thunk_profile(fn, args) -> dict:
  """Traces one call of the compiled ``fn``: thunk milliseconds summed by op kind and by issuing
  layer, thunk counts."""
  hlo_text = fn.as_text()
  instructions = set(re.findall(r"\n\s*(?:ROOT )?%(\S+) = ", hlo_text))
  op_names = dict(re.findall(r"\n\s*(?:ROOT )?%(\S+) = [^\n]*?op_name=\"([^\"]+)\"", hlo_text))
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    jax.block_until_ready(fn(*args))
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{tmp}/plugins/profile/*/perfetto_trace.json.gz")
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  kinds, sources, counts = collections.Counter(), collections.Counter(), collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name not in instructions:
      continue
    ms, kind = e["dur"] / 1e3, re.sub(r"\.\d+$", "", name)
    kinds[kind] += ms
    counts[kind] += 1
    # "jit(loss)/transpose(jvp(UNet))/up_0_res_2/norm_0/reduce_sum" → "backward …/res/norm_0/…"
    src = op_names.get(name, "?/(no op_name: layout copies of the convolutions' backward)")
    phase = "backward" if "transpose(" in src else "forward"
    path = [p for p in src.split("/")[1:] if not p.startswith(("transpose(", "jvp("))]
    path = [re.sub(r"^(down|up)_\d+_(res|attn)_\d+$|^mid_(res|attn)(_\d+)?$",
                   lambda m: f"{m.group(2) or m.group(3)}", p) for p in path]
    sources[f"{phase} {'/'.join(path)}"] += ms
  return {"total_ms": sum(kinds.values()), "kinds": dict(kinds), "sources": dict(sources),
          "counts": dict(counts)}


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", default="cifar10", choices=sorted(MODELS))
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--quick", action="store_true", help="tiny model, two runs")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args(argv)
  spec, batch = (QUICK if args.quick else MODELS)[args.model]
  runs = 2 if args.quick else args.runs
  fns, fn_args = compiled_gradients(spec, batch)
  t_ours, t_flax = common.alternate(lambda: jax.block_until_ready(fns["ours"](*fn_args)),
                                    lambda: jax.block_until_ready(fns["flax"](*fn_args)),
                                    runs=runs)
  result = {"model": args.model, "config": spec, "batch": batch, "runs": runs,
            "gradient_s": {"ours": t_ours, "flax": t_flax}, "profile": {}}
  for name, fn in fns.items():
    result["profile"][name] = thunk_profile(fn, fn_args)

  print(f"# python bench/step_profile.py {' '.join(argv)}")
  print(f"# {common.machine_line()}")
  print(f"\nGradient of the training loss, {spec}, batch {batch}, median of {runs} "
        "(alternating):\n")
  print("| layers | gradient (s) | ratio |\n|---|---|---|")
  print(f"| distill.models.layers | {t_ours:.4f} | {t_ours / t_flax:.2f} |")
  print(f"| flax.linen | {t_flax:.4f} | 1.00 |")
  for what in ("kinds", "sources"):
    rows = collections.Counter()
    for name in fns:
      rows.update({k: 0.0 for k in result["profile"][name][what]})
    top = sorted(rows, key=lambda k: -max(result["profile"][n][what].get(k, 0.0) for n in fns))
    label = "op kind" if what == "kinds" else "issued by"
    print(f"\nThunk time by {label} (ms), top {args.top}:\n")
    print(f"| {label} | ours | flax |\n|---|---|---|")
    for k in top[:args.top]:
      vals = [result["profile"][n][what].get(k, 0.0) for n in fns]
      print(f"| {k} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
  print("\n| total thunk time (ms) | " + " | ".join(
      f"{result['profile'][n]['total_ms']:.1f}" for n in fns) + " |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
