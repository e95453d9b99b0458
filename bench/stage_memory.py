"""Peak resident memory of each stage of the digits pipeline, one process per stage.

    python bench/stage_memory.py [--config=configs/digits.py] [--workdir=DIR] [--quick]
                                 [--stages=teacher,stage_one,stage_two,eval]

Runs ``python -m distill.main --config.stages=<stage>`` for teacher, stage_one, stage_two and
eval in turn on one workdir, each in its own process, and reads that process's peak resident
set size from ``os.wait4``. Memory does not grow with the number of steps, so every link trains
only ``--steps`` steps (the model, batch, samplers and compiled programs are the config's own);
the eval stage computes one w and one seed per row at the config's ``eval.num_samples``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parent.parent
STAGES = ("teacher", "stage_one", "stage_two", "eval")


def run_stage(config: str, workdir: str, stage: str, overrides: list[str], env) -> dict:
  cmd = [sys.executable, "-m", "distill.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.stages={stage}", *overrides]
  log = pathlib.Path(workdir) / f"stage_memory_{stage}.log"
  log.parent.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  with open(log, "w", encoding="utf-8") as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode != 0:
    raise SystemExit(f"stage {stage} failed (exit {proc.returncode}); see {log}")
  return {"stage": stage, "peak_rss_gib": usage.ru_maxrss / 2**20, "seconds": time.time() - t0}


def main(argv=None) -> list[dict]:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--workdir", default="")
  parser.add_argument("--steps", type=int, default=20, help="training steps per link")
  parser.add_argument("--quick", action="store_true", help="runlocal config, 2 steps")
  parser.add_argument("--json", default="", help="also write the results to this file")
  parser.add_argument("--stages", default=",".join(STAGES),
                      help="the stages to measure, in order (a later one needs the earlier)")
  args = parser.parse_args(argv)
  if args.quick:
    args.config = args.config if ":" in args.config else args.config + ":runlocal"
    args.steps = 2
  workdir = args.workdir or tempfile.mkdtemp(prefix="stage_memory_")
  s = args.steps
  overrides = [f"--config.teacher.num_train_steps={s}", f"--config.stage_one.num_train_steps={s}",
               f"--config.stage_two.train_steps_per_halving={s}",
               "--config.stage_two.long_halving_max_steps=0", "--config.eval.seeds=(0,)",
               "--config.eval.w_values=(1.0,)", "--config.num_devices=1"]
  overrides += [f"--config.{name}.{field}={s}" for name in ("teacher", "stage_one", "stage_two")
                for field in ("checkpoint_every", "sample_every")]
  if args.quick:  # one halving, 2 -> 1
    overrides += ["--config.stage_two.start_num_steps=2", "--config.stage_two.end_num_steps=1"]
  env = dict(os.environ)
  if not args.quick:
    env.pop("XLA_FLAGS", None)  # the pipeline's default XLA settings
  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    raise SystemExit(f"--stages: unknown {unknown}; choose from {','.join(STAGES)}")
  results = [run_stage(args.config, workdir, stage, overrides, env) for stage in stages]
  print(f"# python bench/stage_memory.py {' '.join(argv)}")
  print(f"# {common.machine_line()}; workdir {workdir}")
  print("| stage | peak RSS (GiB) | wall (s, incl. start-up and compiles) |")
  print("|---|---|---|")
  for r in results:
    print(f"| {r['stage']} | {r['peak_rss_gib']:.2f} | {r['seconds']:.0f} |")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main()
