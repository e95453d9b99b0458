"""Cost of one training step of each stage on the digits config, relative to a teacher step.

    python bench/step_cost.py [--config=configs/digits.py] [--steps=30]

Stage two's ideal is about 1.67 teacher steps (two teacher forwards plus one student forward
and backward against one forward and backward); stage one's the same (one forward of the
teacher at batch 2B). Times are the median over ``--steps`` after two warm-up steps, on one
device; compile times are printed too.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from distill import input_pipeline, losses, models, pipeline, sharding, train
from distill.config_utils import load_config


def time_objective(name, objective, params, frozen, section, config, mesh, steps):
  tx, schedule = train.make_optimizer(section)
  step = train.make_train_step(objective, tx, schedule, ema_decay=section.ema_decay, mesh=mesh)
  state = jax.device_put(train.init_state(params, tx), sharding.replicated(mesh), may_alias=False)
  frozen = None if frozen is None else sharding.replicate(mesh, frozen)
  batches = input_pipeline.train_batches(config.data, global_batch_size=section.batch_size,
                                         seed=0)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  state, m = step(state, frozen, sharding.global_batch(mesh, batches[0]), key)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(1, steps + 3):
    batch = sharding.global_batch(mesh, batches[i])
    t0 = time.perf_counter()
    state, m = step(state, frozen, batch, key)
    jax.block_until_ready(m["loss"])
    if i > 2:
      times.append(time.perf_counter() - t0)
  return {"stage": name, "median_step_s": statistics.median(times), "first_call_s": compile_s}


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--steps", type=int, default=30)
  args = parser.parse_args(argv)
  config = load_config(args.config)
  mesh = sharding.make_mesh(1)
  shape = models.model_input_shape(config)
  teacher = pipeline.teacher_model(config)
  student = pipeline.student_model(config)
  t_params = models.init_params(teacher, jax.random.key(0), shape)
  s_params = models.student_params_from_teacher(
      t_params, models.init_params(student, jax.random.key(1), shape))
  w = dict(w_min=config.stage_one.w_min, w_max=config.stage_one.w_max)
  two = pipeline.halving_section(config, 4)
  rows = [
      time_objective("teacher", losses.teacher_objective(teacher, p_uncond=0.1), t_params, None,
                     config.teacher, config, mesh, args.steps),
      time_objective("stage_one", losses.stage_one_objective(student, teacher, **w), s_params,
                     t_params, config.stage_one, config, mesh, args.steps),
      time_objective("stage_two", losses.stage_two_objective(student, **w), s_params,
                     {"params": s_params, "num_student_steps": jnp.int32(4)}, two, config,
                     mesh, args.steps),
  ]
  base = rows[0]["median_step_s"]
  print(f"# {' '.join(sys.argv)} | {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}")
  print("| stage | batch | median step (s) | relative to teacher | first call incl. compile (s) |")
  print("|---|---|---|---|---|")
  for r, section in zip(rows, (config.teacher, config.stage_one, two)):
    print(f"| {r['stage']} | {section.batch_size} | {r['median_step_s']:.4f} | "
          f"{r['median_step_s'] / base:.2f} | {r['first_call_s']:.1f} |")
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
