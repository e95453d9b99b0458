"""Training-step cost of each stage, FLOPs per step, and achieved FLOP/s against the machine.

    python bench/train_step.py [--config=configs/digits.py] [--steps=30] [--quick] [--flops_only]

1. The median wall time of a teacher, a stage-one and a stage-two training step at the same
   batch (the project's own jitted, donated train step), relative to the teacher. Targets:
   stage one ≤ 1.5×, stage two ≤ 1.6× (by FLOPs both are ≈ 1.67: one/two teacher forwards
   without backward on top of the student's forward and backward).
2. FLOPs per step from XLA's cost analysis of the compiled step, and the achieved FLOP/s
   against this machine's measured float32 matrix-multiply peak (a jitted n×n matmul).
3. Where the time goes, for the teacher step: the same step without the optimiser/EMA (loss
   and gradient only), the forward pass alone, and the U-Net without attention blocks.

Medians over ``--steps`` after two warm-up steps, one device. All rows are timed round-robin
(one call of each per round), so that their ratios compare the same minutes of the machine.
``--flops_only`` neither compiles nor times: FLOPs from the cost analysis of the lowered programs,
before XLA's optimisation passes (for the runlocal teacher step, 0.34 GFLOP against the compiled
program's 0.37), in seconds instead of a minute of compiles.
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

from distill import (family, input_pipeline, layout, losses, models,  # noqa: E402
                     sharding, train)
from distill.config_utils import load_config  # noqa: E402


def flops_of(program) -> float:
  """FLOPs of a compiled or a lowered program, from XLA's cost analysis."""
  analysis = program.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def matmul_peak(n: int, runs: int) -> dict:
  """float32 GFLOP/s of a jitted ``n×n @ n×n`` (2n³ FLOPs): the machine's practical peak."""
  a = jax.random.normal(jax.random.key(0), (n, n))
  b = jax.random.normal(jax.random.key(1), (n, n))
  f = jax.jit(jnp.matmul)
  r = common.timed(lambda: common.block(f(a, b)), runs=runs, warmup=2)
  return {"n": n, "median_s": r["median_s"], "gflops": 2 * n**3 / r["median_s"] / 1e9}


def make_step(name, objective, params, frozen, section, config, mesh, *,
              compile_it: bool = True) -> dict:
  """The project's train step (optimiser, EMA, non-finite guard) of one stage, compiled: a row
  with ``run`` (one step, blocking) for ``timed_rows``; with ``compile_it=False`` only lowered,
  a row with its FLOPs."""
  tx, schedule = train.make_optimizer(section)
  step = train.make_train_step(objective, tx, schedule, ema_decay=section.ema_decay, mesh=mesh)
  state = jax.device_put(train.init_state(params, tx), sharding.replicated(mesh), may_alias=False)
  frozen = None if frozen is None else sharding.replicate(mesh, frozen)
  batches = input_pipeline.train_batches(config.data, global_batch_size=section.batch_size,
                                         seed=0)
  key = jax.random.key(0)
  batch = sharding.global_batch(mesh, batches[0])
  lowered = step.lower(state, frozen, batch, key)
  if not compile_it:
    return {"what": name, "batch": section.batch_size, "flops": flops_of(lowered)}
  compiled = lowered.compile()
  holder = {"state": state}

  def run():
    holder["state"], m = compiled(holder["state"], frozen, batch, key)
    common.block(m["loss"])

  return {"what": name, "batch": section.batch_size, "flops": flops_of(compiled), "run": run}


def make_fn(name, fn, args, batch, *, compile_it: bool = True) -> dict:
  lowered = jax.jit(fn).lower(*args)
  if not compile_it:
    return {"what": name, "batch": batch, "flops": flops_of(lowered)}
  compiled = lowered.compile()
  return {"what": name, "batch": batch, "flops": flops_of(compiled),
          "run": lambda: common.block(compiled(*args))}


def timed_rows(rows: list[dict], steps: int) -> list[dict]:
  """Times every row's ``run`` round-robin (``common.round_robin``): medians of ``steps``."""
  medians = common.round_robin({r["what"]: r["run"] for r in rows}, runs=steps, warmup=2)
  return [{k: v for k, v in r.items() if k != "run"} | {"median_s": medians[r["what"]]}
          for r in rows]


def breakdown(config, mesh, *, compile_it: bool = True) -> list[dict]:
  """Teacher step pieces: loss+grad only, forward only, and without attention."""
  shape = models.model_input_shape(config)
  fam = family.of(config)
  teacher = fam.teacher
  params = models.init_params(teacher, jax.random.key(0), shape)
  objective = losses.teacher_objective(fam, p_uncond=0.1)
  batch = sharding.global_batch(mesh, input_pipeline.train_batches(
      config.data, global_batch_size=config.teacher.batch_size, seed=0)[0])
  key = jax.random.key(0)
  b = config.teacher.batch_size
  z = jax.random.normal(key, models.model_input_shape(config, b))
  logsnr = jnp.zeros((b,))
  labels = jnp.zeros((b,), jnp.int32)
  rows = [
      make_fn("teacher loss + gradient (no optimiser, EMA, guard)",
              lambda p, batch, k: jax.value_and_grad(objective, has_aux=True)(p, None, batch, k),
              (params, batch, key), b, compile_it=compile_it),
      make_fn("U-Net forward only", lambda p, z: teacher.apply({"params": p}, z, logsnr, labels),
              (params, z), b, compile_it=compile_it),
  ]
  no_attn = config.copy_and_resolve_references()
  no_attn.model.attn_resolutions = ()
  plain = family.of(no_attn)
  p_plain = models.init_params(plain.teacher, jax.random.key(0), shape)
  obj_plain = losses.teacher_objective(plain, p_uncond=0.1)
  rows.append(make_step("teacher step without attention blocks", obj_plain, p_plain, None,
                        no_attn.teacher, no_attn, mesh, compile_it=compile_it))
  return rows


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--matmul_n", type=int, default=2048)
  parser.add_argument("--quick", action="store_true", help="runlocal config, few steps")
  parser.add_argument("--flops_only", action="store_true",
                      help="FLOPs of the lowered programs only: no compiles, no timings")
  parser.add_argument("--json", default="", help="also write the results to this file")
  args = parser.parse_args(argv)
  if args.quick:
    args.config = args.config if ":" in args.config else args.config + ":runlocal"
    args.steps, args.matmul_n = 2, 256
  config = load_config(args.config)
  batch = config.teacher.batch_size
  for section in (config.stage_one, config.stage_two):
    section.batch_size = batch  # the same batch for every stage
  mesh = sharding.make_mesh(1)
  shape = models.model_input_shape(config)
  fam = family.of(config)
  teacher, student = fam.teacher, fam.student
  t_params = models.init_params(teacher, jax.random.key(0), shape)
  s_params = models.student_params_from_teacher(
      t_params, models.init_params(student, jax.random.key(1), shape))
  w = dict(w_min=config.stage_one.w_min, w_max=config.stage_one.w_max)
  two = layout.halving_section(config, 4)
  compile_it = not args.flops_only
  stages = [
      make_step("teacher", losses.teacher_objective(fam, p_uncond=0.1), t_params, None,
                config.teacher, config, mesh, compile_it=compile_it),
      make_step("stage_one", losses.stage_one_objective(fam, **w), s_params,
                t_params, config.stage_one, config, mesh, compile_it=compile_it),
      make_step("stage_two", losses.stage_two_objective(fam, **w), s_params,
                {"params": s_params, "num_student_steps": jnp.int32(4)}, two, config, mesh,
                compile_it=compile_it),
  ]
  pieces = breakdown(config, mesh, compile_it=compile_it)
  print(f"# python bench/train_step.py {' '.join(argv)}")
  print(f"# {common.machine_line()}; config {args.config}, "
        f"{models.param_count(t_params) / 1e6:.2f} M parameters")
  base_f = stages[0]["flops"]
  if args.flops_only:
    print("| step | batch | GFLOP per step (lowered) | × teacher FLOPs |")
    print("|---|---|---|---|")
    for r in stages + pieces:
      print(f"| {r['what']} | {r['batch']} | {r['flops'] / 1e9:.2f} | {r['flops'] / base_f:.2f} |")
    return {"stages": stages, "breakdown": pieces}
  timed = timed_rows(stages + pieces, args.steps)
  stages, pieces = timed[:len(stages)], timed[len(stages):]
  peak = matmul_peak(args.matmul_n, runs=max(3, args.steps // 3))

  base_t = stages[0]["median_s"]
  print(f"# float32 matmul peak: {peak['gflops']:.1f} GFLOP/s ({peak['n']}×{peak['n']})")
  print("| step | batch | median (s) | × teacher time | GFLOP per step | × teacher FLOPs | "
        "GFLOP/s | of matmul peak |")
  print("|---|---|---|---|---|---|---|---|")
  for r in stages + pieces:
    gflop = r["flops"] / 1e9
    rate = gflop / r["median_s"]
    print(f"| {r['what']} | {r['batch']} | {r['median_s']:.4f} | {r['median_s'] / base_t:.2f} | "
          f"{gflop:.2f} | {r['flops'] / base_f:.2f} | {rate:.1f} | "
          f"{rate / peak['gflops']:.0%} |")
  result = {"stages": stages, "breakdown": pieces, "matmul_peak": peak}
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
