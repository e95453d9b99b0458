"""The cost of the paper's distillation pipeline on ImageNet 64, on paper, before launching.

    python bench/scale_plan.py [--config=configs/imagenet64.py] [--utilisation=0.4]
        [--memory_batch=32] [--quick]

1. FLOPs per training step of stage one and stage two at the config's global batch, from XLA's
   cost analysis of the lowered step (abstract shapes: nothing is allocated or trained). With
   ``model.remat`` the backward pass recomputes the forward pass, and the count includes it.
2. The teacher-free pipeline of the paper: stage one plus the halvings from
   ``stage_two.start_num_steps`` to ``end_num_steps`` (1024 → 1: 10 halvings) at
   ``train_steps_per_halving`` steps each, in chip-hours on TPU v4, TPU v5e and H100 at a stated
   model-FLOPs utilisation of the chips' dense bfloat16 peak.
3. Per-device memory under data parallelism (parameters, EMA, Adam moments and the frozen
   teacher replicated; activations for the per-device batch of a v5e-64 slice): the XLA
   memory analysis of the stage-two step compiled for that batch on this CPU, next to the
   parameter/optimiser bytes counted by hand.
4. The per-chip peak on each slice of ``--slices`` (v5e-64, v4-32, 8×H100): the stage-two step
   compiled at the slice's per-chip batch (the global batch over its chips) on a
   ``('data', 'fsdp')`` mesh of ``fsdp`` forced CPU devices (data 1; a larger data axis adds no
   memory per chip), for each ``--fsdp`` size: the state's and teacher's shards, temporaries,
   and the peak against the chip's memory.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
if __name__ == "__main__":  # the slices' meshes: as many CPU devices as the largest fsdp
  import cpu_devices  # pylint: disable=wrong-import-position
  cpu_devices.force_for_fsdp(default="1,8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402  pylint: disable=wrong-import-position

from distill import family, layout, losses, models, sharding, train  # noqa: E402
from distill.config_utils import load_config  # noqa: E402

# Dense bfloat16 peak per chip (vendor data sheets) and memory per chip.
CHIPS = {
    "TPU v4": {"tflops": 275.0, "hbm_gib": 32},
    "TPU v5e": {"tflops": 197.0, "hbm_gib": 16},
    "H100 SXM": {"tflops": 989.0, "hbm_gib": 80},
}
# Slices: (chip, chips JAX sees). A v4-32 slice has 16 chips (32 TensorCores).
SLICES = {"v5e-64": ("TPU v5e", 64), "v4-32": ("TPU v4", 16), "8xH100": ("H100 SXM", 8)}


def _abstract_batch(config, batch: int):
  shape = models.model_input_shape(config, batch)
  return {"image": jax.ShapeDtypeStruct(shape, jnp.float32),
          "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}


def stage_steps(config, mesh):
  """``{stage: (jitted step, abstract state, abstract frozen)}`` for stage one and two."""
  shape = models.model_input_shape(config)
  fam = family.of(config)
  teacher, student = fam.teacher, fam.student
  t_params = jax.eval_shape(lambda: models.init_params(teacher, jax.random.key(0), shape))
  s_params = jax.eval_shape(lambda: models.init_params(student, jax.random.key(0), shape))
  w = dict(w_min=config.stage_one.w_min, w_max=config.stage_one.w_max)
  two = layout.halving_section(config, 4)
  out = {}
  for name, objective, section, frozen in (
      ("stage_one", losses.stage_one_objective(fam, **w), config.stage_one,
       t_params),
      ("stage_two", losses.stage_two_objective(fam, **w), two,
       {"params": s_params, "num_student_steps": jax.ShapeDtypeStruct((), jnp.int32)})):
    tx, schedule = train.make_optimizer(section)
    step = train.make_train_step(objective, tx, schedule, ema_decay=section.ema_decay, mesh=mesh)
    state = jax.eval_shape(lambda tx=tx: train.init_state(
        models.init_params(student, jax.random.key(0), shape), tx))
    out[name] = (step, state, frozen, section)
  return out, t_params, s_params


def slice_plan(config, *, slices, fsdps, quick: bool = False) -> list[dict]:
  """Section 4 of the module docstring: one row per slice and fsdp size (``quick``: one
  4-chip slice at per-chip batch 2)."""
  rows = []
  todo = [("quick", "TPU v5e", 2)] if quick else [
      (name, SLICES[name][0], config.stage_two.batch_size // SLICES[name][1]) for name in slices]
  for fsdp in fsdps:
    mesh = sharding.make_mesh(fsdp, fsdp=fsdp)
    step, state, frozen, _ = stage_steps(config, mesh)[0]["stage_two"]
    state, frozen = sharding.abstract_params(mesh, state), sharding.abstract_params(mesh, frozen)
    split = sharding.batch_sharded(mesh)
    for name, chip, per_chip in todo:
      batch = jax.tree.map(lambda x, s=split: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                           _abstract_batch(config, per_chip * fsdp))
      rows.append({"slice": name, "chip": chip, "hbm_gib": CHIPS[chip]["hbm_gib"],
                   "batch": per_chip, "fsdp": fsdp,
                   **common.step_memory(step, state, frozen, batch)})
      print(f"  {name} fsdp {fsdp}: compiled in {rows[-1]['compile_s']} s", flush=True)
  return rows


def tree_bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/imagenet64.py")
  parser.add_argument("--utilisation", type=float, default=0.4,
                      help="model-FLOPs utilisation assumed for the chip-hours")
  parser.add_argument("--memory_batch", type=int, default=32,
                      help="per-device batch for the memory analysis (2048 / 64 on v5e-64)")
  parser.add_argument("--slices", default=",".join(SLICES))
  parser.add_argument("--fsdp", default="1,8", help="fsdp sizes of the slices' plan")
  parser.add_argument("--quick", action="store_true", help="runlocal config, tiny batches")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args(argv)
  if args.quick:
    args.config = args.config if ":" in args.config else args.config + ":runlocal"
    args.memory_batch = 2
  config = load_config(args.config)
  mesh = sharding.make_mesh(1)
  steps, t_params, s_params = stage_steps(config, mesh)
  key = jax.random.key(0)

  flops = {}
  for name, (step, state, frozen, section) in steps.items():
    t0 = time.time()
    lowered = step.lower(state, frozen, _abstract_batch(config, section.batch_size), key)
    flops[name] = {"batch": section.batch_size,
                   "flops": float(lowered.cost_analysis()["flops"]),
                   "lower_s": time.time() - t0}
  halvings = layout.halvings(config)
  per_halving = config.stage_two.train_steps_per_halving
  total = (config.stage_one.num_train_steps * flops["stage_one"]["flops"]
           + sum(layout.halving_section(config, n).num_train_steps for n in halvings)
           * flops["stage_two"]["flops"])
  hours = {chip: total / (spec["tflops"] * 1e12 * args.utilisation) / 3600
           for chip, spec in CHIPS.items()}

  # Per-device memory: the stage-two step compiled for the per-device batch.
  step, state, frozen, _ = steps["stage_two"]
  memory = {"batch": args.memory_batch, "state_bytes": tree_bytes(state),
            "teacher_bytes": tree_bytes(s_params),
            **common.step_memory(step, state, frozen, _abstract_batch(config, args.memory_batch))}
  slices = slice_plan(config, slices=[] if args.quick else args.slices.split(","),
                      fsdps=(2,) if args.quick else [int(n) for n in args.fsdp.split(",")],
                      quick=args.quick)

  gib = 2**30
  print(f"# python bench/scale_plan.py {' '.join(argv)}")
  print(f"# {common.machine_line()}; config {args.config}: "
        f"{sum(x.size for x in jax.tree.leaves(s_params)) / 1e6:.1f} M student parameters, "
        f"model dtype {config.model.dtype}, remat {config.model.remat}")
  print("| stage | global batch | TFLOP per step | steps |")
  print("|---|---|---|---|")
  print(f"| stage one | {flops['stage_one']['batch']} | {flops['stage_one']['flops'] / 1e12:.2f} | "
        f"{config.stage_one.num_train_steps} |")
  print(f"| stage two ({len(halvings)} halvings, {config.stage_two.start_num_steps}→{halvings[-1]} steps) | "
        f"{flops['stage_two']['batch']} | {flops['stage_two']['flops'] / 1e12:.2f} | "
        f"{len(halvings)} × {per_halving} |")
  print(f"\nTotal: {total / 1e18:.1f} EFLOP. Chip-hours at {args.utilisation:.0%} of the dense "
        "bfloat16 peak:")
  print("| chip | peak TFLOP/s | chip-hours | days on 64 chips |")
  print("|---|---|---|---|")
  for chip, spec in CHIPS.items():
    print(f"| {chip} | {spec['tflops']:.0f} | {hours[chip]:,.0f} | {hours[chip] / 64 / 24:.1f} |")
  print(f"\nPer-device memory, stage-two step at per-device batch {args.memory_batch} "
        f"(XLA CPU memory analysis, compile {memory['compile_s']:.0f} s):")
  print(f"- train state (params, EMA, Adam moments, step counters): "
        f"{memory['state_bytes'] / gib:.2f} GiB; frozen teacher: "
        f"{memory['teacher_bytes'] / gib:.2f} GiB")
  print(f"- arguments {memory['argument_bytes'] / gib:.2f} GiB + temporaries "
        f"{memory['temp_bytes'] / gib:.2f} GiB (+ the metrics, the outputs the donated state "
        f"does not hold) = peak {memory['peak_bytes'] / gib:.2f} GiB "
        f"(v5e has {CHIPS['TPU v5e']['hbm_gib']} GiB per chip)")
  print("\nPer-chip peak of the stage-two step on each slice (XLA CPU memory analysis):")
  print("| slice | per-chip batch | fsdp | state + teacher shards (GiB) | temporaries (GiB) | "
        "peak (GiB) | chip memory (GiB) |\n|---|---|---|---|---|---|---|")
  for r in slices:
    print(f"| {r['slice']} | {r['batch']} | {r['fsdp']} | {r['state_shard_bytes'] / gib:.2f} | "
          f"{r['temp_bytes'] / gib:.2f} | {r['peak_bytes'] / gib:.2f} | {r['hbm_gib']} |")
  result = {"flops": flops, "total_flops": total, "chip_hours": hours, "memory": memory,
            "utilisation": args.utilisation, "halvings": halvings, "slices": slices}
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
