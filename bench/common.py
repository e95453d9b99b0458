"""Shared by the scripts in ``bench/``: timing, the machine line, a compiled step's memory per
device, the held-out sources of the editing measurements."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time

import jax

from distill import xla_cpu  # importing distill sets its XLA:CPU options before JAX starts a backend


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_line() -> str:
  """``nproc``, CPU model, devices, jax version and the date: one line for BENCHMARKS.md."""
  ynn = "off" if f"{xla_cpu.YNN_FUSION_FLAG}=" in os.environ.get(
      "XLA_FLAGS", "").split() else "XLA default"
  return (f"{os.cpu_count()} cores, {cpu_model()}, {jax.device_count()} "
          f"{jax.default_backend()} device(s), jax {jax.__version__}, YNNPACK fusions {ynn}, "
          f"{datetime.date.today().isoformat()}")


def on_sd15_layout(config):
  """``config`` with ``teacher.pretrained`` a fresh full-size SD 1.5 folder of config files
  (``reference_configs.write_sd15_layout``; the tokenizer of the tiny test fixture): enough to
  build the family on abstract shapes."""
  import pathlib  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel
  from distill.latent import reference_configs  # pylint: disable=import-outside-toplevel
  tokenizer = (pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "latent"
               / "tiny-sd" / "tokenizer")
  config.teacher.pretrained = reference_configs.write_sd15_layout(
      tempfile.mkdtemp(prefix="sd15-layout-"), tokenizer=tokenizer)
  return config


def shard_bytes(tree) -> int:
  """Bytes one device holds of ``tree``'s abstract arrays, by their shardings (whole arrays
  when they have none)."""
  shape = lambda x: x.shape if x.sharding is None else x.sharding.shard_shape(x.shape)
  return int(sum(math.prod(shape(x)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def step_memory(step, state, frozen, batch) -> dict:
  """Per-device bytes of a train step (``distill.train.make_train_step``) compiled for abstract
  ``state``, ``frozen`` and ``batch`` with shardings: XLA's memory analysis (arguments,
  temporaries; the peak is arguments + temporaries + outputs − the donated state the outputs
  reuse), and the shards the arguments should be by their shardings."""
  return compile_step(step, state, frozen, batch)[1]


def compile_step(step, state, frozen, batch):
  """``(compiled step, step_memory's dict)``; the compiled step runs on arrays of those
  shapes and shardings."""
  t0 = time.time()
  compiled = step.lower(state, frozen, batch, jax.random.key(0)).compile()
  mem = compiled.memory_analysis()
  memory = {"compile_s": round(time.time() - t0, 1),
            "argument_bytes": int(mem.argument_size_in_bytes),
            "temp_bytes": int(mem.temp_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes),
            "peak_bytes": int(mem.argument_size_in_bytes + mem.temp_size_in_bytes
                              + mem.output_size_in_bytes - mem.alias_size_in_bytes),
            "state_shard_bytes": shard_bytes(state) + shard_bytes(frozen),
            "batch_shard_bytes": shard_bytes(batch)}
  return compiled, memory


def timed(fn, *, runs: int, warmup: int = 1) -> dict:
  """Median wall time of ``fn()`` (which must block until its result is ready) over ``runs``
  calls after ``warmup`` calls; the first call's time (compile included) separately.

  ``warmup=0`` is for a function compiled ahead of time: no call is spent on warming up, and
  the first call's time is that of the first timed run.
  """
  if runs < 1 or warmup < 0:
    raise ValueError(f"timed: runs={runs} must be >= 1 and warmup={warmup} >= 0.")
  first = None
  for _ in range(warmup):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0 if first is None else first
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "min_s": min(times),
          "first_call_s": times[0] if first is None else first, "runs": runs}


def round_robin(fns: dict, *, runs: int, warmup: int = 1, settle: int = 0) -> dict:
  """Medians of each ``fns[name]()``, timed in turn (one call of each per round) after
  ``warmup`` rounds, so that all of them see the same machine state: on a shared machine the
  speed drifts by 10–20 % over minutes, and timing one function after another would compare
  machine states rather than functions.

  ``settle`` untimed calls precede each timed call. Use it when the functions belong to
  different frameworks: after a PyTorch call, its OpenMP worker threads spin-wait for a while
  and take a core from whatever runs next (seen here: a JAX train step timed right after a
  PyTorch one took 1.4× its time alone; with one settling call, its time alone).
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      for _ in range(settle):
        fn()
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def alternate(a, b, *, runs: int, warmup: int = 1, settle: int = 0) -> tuple[float, float]:
  """``round_robin`` of two functions (e.g. two frameworks side by side in one process)."""
  r = round_robin({"a": a, "b": b}, runs=runs, warmup=warmup, settle=settle)
  return r["a"], r["b"]


def block(tree):
  """``jax.block_until_ready`` that returns nothing (for ``timed``)."""
  jax.block_until_ready(tree)


def held_out_sources(config, limit: int):
  """Up to ``limit`` held-out images (``[n, H, W, C]`` in [−1, 1]) and their labels (an array)
  or captions (a list): the sources of ``editing.py`` and ``style_transfer.py``."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from distill import input_pipeline  # pylint: disable=import-outside-toplevel
  held = input_pipeline.source(config.data, "held_out")
  items = [held[i] for i in range(min(len(held), limit))]
  x = np.stack([np.asarray(item["image"], np.float32) for item in items])
  if input_pipeline.captioned(config.data):
    return x, [str(item["caption"]) for item in items]
  return x, np.asarray([int(item["label"]) for item in items])
