"""A first check of a GPU machine: train-step time and memory, and the 4-step sampler's speed.

    bash bench/gpu_check.sh                 # on a machine with a GPU; skips cleanly without one
    python bench/gpu_check.py [--models=imagenet64,sd15] [--batches=imagenet64:32,sd15:2]
    python bench/gpu_check.py --quick       # tiny configs on any backend (the test suite's run)

For each model (``configs/imagenet64.py``; ``configs/sd15.py`` on a full-size SD 1.5 layout with
random weights: nothing is downloaded), on the first device:

1. stage one's and stage two's train steps (``distill.train.make_train_step``, the state and
   the frozen teacher on the device) at the per-chip batch of ``--batches``: the compile time,
   the median step time over ``--runs`` steps, XLA's memory analysis of the compiled step
   (arguments + temporaries + outputs − the donated state), and the device's own peak of
   memory in use where the backend reports it (GPUs do);
2. the 4-step deterministic sampler of the stage-one student (what a distilled student runs) at
   ``--sample_batch``: images per second, decoding included for SD.

The default batches fit an 80 GB GPU; lower them for a smaller one. The whole run takes a few
minutes on one H100-class GPU, most of it compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

from distill import family, layout, losses, sample, sharding, train  # noqa: E402
from distill.config_utils import load_config  # noqa: E402
from distill.latent import family as latent_family  # noqa: E402

DEFAULT_BATCHES = {"imagenet64": 32, "sd15": 2}


def model_family(name: str, quick: bool):
  """``(config, family, teacher params)``: SD's with random weights on its published shapes."""
  config = load_config(f"{name}:runlocal" if quick else name)
  if config.get("family", "pixel") != "latent":
    fam = family.of(config)
    return config, fam, fam.init_teacher(jax.random.key(0))
  if not quick:
    config = common.on_sd15_layout(config)
  fam = latent_family.from_config(config, shapes_only=not quick)
  if not quick:  # random weights of the published shapes (U-Net and VAE), made on the device
    models = dataclasses.replace(fam.models, unet_params=_random_like(fam.models.unet_params, 0),
                                 vae_params=_random_like(fam.models.vae_params, 1))
    fam = dataclasses.replace(fam, models=models)
  return config, fam, fam.models.unet_params


def _random_like(shapes, seed: int):
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.02 * jax.random.normal(k, s.shape, s.dtype)
                                   for k, s in zip(keys, leaves)])


def _batch(fam, config, b: int, rng: np.random.Generator) -> dict:
  x = rng.standard_normal((b, *fam.x_shape)).astype(np.float32)
  if fam.name == "latent":
    context = rng.standard_normal((b, *fam.context_table.shape[1:])).astype(np.float32)
    return {"latents": x, "context": context}
  return {"image": np.clip(x, -1, 1), "label": rng.integers(0, config.data.num_classes, b)}


def measure(name: str, *, batch: int, runs: int, sample_batch: int, quick: bool,
            stages=("stage_one", "stage_two")) -> dict:
  config, fam, teacher = model_family(name, quick)
  mesh = sharding.make_mesh(1)
  teacher = sharding.shard_params(mesh, teacher)
  student = fam.student_from_teacher(teacher, jax.random.key(1))
  w = dict(w_min=config.stage_one.w_min, w_max=config.stage_one.w_max)
  data = sharding.global_batch(mesh, _batch(fam, config, batch, np.random.default_rng(0)))
  out = {"model": name, "batch": batch, "backend": jax.default_backend(),
         "device": jax.devices()[0].device_kind, "stages": []}
  for stage in stages:
    if stage == "stage_one":
      objective, section, frozen = losses.stage_one_objective(fam, **w), config.stage_one, teacher
    else:
      objective = losses.stage_two_objective(fam, **w)
      section = layout.halving_section(config, 4)
      frozen = {"params": student, "num_student_steps": jnp.asarray(4, jnp.int32)}
    tx, schedule = train.make_optimizer(section)
    step = train.make_train_step(objective, tx, schedule, ema_decay=section.ema_decay, mesh=mesh)
    state = sharding.shard_params(mesh, train.init_state(student, tx), may_alias=False)
    abstract = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    compiled, memory = common.compile_step(step, abstract(state), abstract(frozen),
                                           abstract(data))
    holder = [state]

    def one_step(holder=holder, compiled=compiled, frozen=frozen):
      holder[0], metrics = compiled(holder[0], frozen, data, jax.random.key(1))
      common.block(metrics)

    timing = common.timed(one_step, runs=runs, warmup=0)
    stats = jax.devices()[0].memory_stats() or {}
    out["stages"].append({"stage": stage, **memory, **timing,
                          "device_peak_bytes": stats.get("peak_bytes_in_use")})
    del holder, state
  loaded = sample.LoadedModel("student", fam, student, config, 4, mesh)
  run = sample.make_sampler(loaded, "deterministic", 4)
  z1 = jax.random.normal(jax.random.key(2), (sample_batch, *fam.x_shape))
  cond = fam.cond_from_labels(np.zeros(sample_batch, np.int32))
  ws = jnp.full((sample_batch,), 4.0)
  timing = common.timed(lambda: common.block(run(z1, cond, ws, jax.random.key(3))), runs=runs)
  out["sampler"] = {"batch": sample_batch, **timing,
                    "images_per_s": sample_batch / timing["median_s"]}
  return out


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="imagenet64,sd15")
  parser.add_argument("--batches", default="",
                      help="per-chip batches, e.g. imagenet64:32,sd15:2 (defaults: those)")
  parser.add_argument("--sample_batch", type=int, default=16)
  parser.add_argument("--runs", type=int, default=5)
  parser.add_argument("--stages", default="stage_one,stage_two")
  parser.add_argument("--quick", action="store_true", help="runlocal configs, batch 2, 2 runs")
  args = parser.parse_args(argv)
  batches = dict(DEFAULT_BATCHES)
  batches.update({k: int(v) for k, v in (item.split(":") for item in args.batches.split(",")
                                         if item)})
  runs, sample_batch = (2, 2) if args.quick else (args.runs, args.sample_batch)
  results = []
  for name in args.models.split(","):
    results.append(measure(name, batch=2 if args.quick else batches[name], runs=runs,
                           sample_batch=sample_batch, quick=args.quick,
                           stages=tuple(args.stages.split(","))))
  gib = 2**30
  print(f"# python bench/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}")
  print(f"# {common.machine_line()}, device {results[0]['device']}")
  print("| model | stage | per-chip batch | compile (s) | step (s) | compiled peak (GiB) | "
        "device peak (GiB) |\n|---|---|---|---|---|---|---|")
  for r in results:
    for s in r["stages"]:
      device = "n/a" if s["device_peak_bytes"] is None else f"{s['device_peak_bytes'] / gib:.2f}"
      print(f"| {r['model']} | {s['stage']} | {r['batch']} | {s['compile_s']} | "
            f"{s['median_s']:.3f} | {s['peak_bytes'] / gib:.2f} | {device} |")
  print("\n| model | 4-step sampler batch | images/s |\n|---|---|---|")
  for r in results:
    print(f"| {r['model']} | {r['sampler']['batch']} | {r['sampler']['images_per_s']:.1f} |")
  print("\n" + json.dumps(results, default=float))
  return results


if __name__ == "__main__":
  main()
