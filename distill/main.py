"""``python -m distill.main --config=configs/<name>.py[:runlocal] --workdir=DIR``.

All logic lives in importable libraries (``distill.pipeline``) that tests and notebooks call.
Multi-host: pass ``--multihost`` or set ``DISTILL_MULTIHOST=1`` to call
``jax.distributed.initialize()`` first (its failure is not swallowed). On Cloud TPU it finds its
peers by itself; elsewhere pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (on CPU the processes' collectives then go through gloo).

Relative paths (``--workdir``, ``teacher.checkpoint``, ``eval.inception_weights``,
``data.data_dir``) are taken against the current directory; bad input ends in one line
(``error: …``, exit status 1).

On a host without accelerators the CPU is split into XLA devices, one per core by default
(``--cpu_devices``), and every link trains data-parallel over them, with the eval stage's samplers
split the same way: on 2 cores README's digits run takes 0.885 of its time on one device
(BENCHMARKS.md, "One XLA device per core"; ``distill/xla_cpu.py`` on the XLA option that goes
with it).

Compiled programs are kept in JAX's persistent compilation cache (``--compilation_cache_dir``;
``distill/compilation_cache.py``), so later halvings and reruns do not compile them again.

Preemption: a SIGTERM during training saves a checkpoint of the current step and exits with
status 143; rerunning the same command resumes there.
"""

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from distill import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py:runlocal.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and reports.")
flags.DEFINE_bool("multihost", os.environ.get("DISTILL_MULTIHOST", "") not in ("", "0"),
                  "Call jax.distributed.initialize() first (default: $DISTILL_MULTIHOST).")
flags.DEFINE_string("coordinator_address", None,
                    "With --multihost off Cloud TPU: host:port of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "With --multihost off Cloud TPU: process count.")
flags.DEFINE_integer("process_id", None, "With --multihost off Cloud TPU: this process's index.")
flags.DEFINE_string("compilation_cache_dir", None,
                    "JAX's persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR, "
                    "else ~/.cache/distill/jax); an empty value turns it off.")
flags.DEFINE_integer("cpu_devices", None,
                     "CPU devices to split the host into (the CPU backend only; 1: no split). "
                     "Default: config.num_devices if set, else the most, up to one per core, that "
                     "divide every link's batch size; XLA_FLAGS' "
                     "--xla_force_host_platform_device_count or JAX_NUM_CPU_DEVICES, if set, "
                     "or an installed TPU/GPU plugin of JAX leave the count alone.")
flags.mark_flags_as_required(["config"])


def initialize_distributed(jax) -> None:
  """``jax.distributed.initialize`` with the flags given (none: auto-detection, as on TPU)."""
  explicit = {"coordinator_address": FLAGS.coordinator_address,
              "num_processes": FLAGS.num_processes, "process_id": FLAGS.process_id}
  explicit = {k: v for k, v in explicit.items() if v is not None}
  # Collectives between the processes' CPU devices (the test set-up, and the host side of a
  # TPU job); TPU devices use their own interconnect whatever this says.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**explicit)


# JAX's TPU and GPU plugins: where one is installed, the host's CPU is left as one device.
ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin")


def cpu_devices(config, requested: int | None, environ=os.environ) -> int | None:
  """How many CPU devices to split this host into (None: leave JAX's own count)."""
  from distill import layout, sharding, xla_cpu  # pylint: disable=import-outside-toplevel
  if requested is not None:
    return requested
  if xla_cpu.cpu_device_count(environ) is not None or any(
      importlib.util.find_spec(p) for p in ACCELERATOR_PLUGINS):
    return None
  if config.num_devices >= 1:  # other values: the pipeline's validation names the field
    return config.num_devices
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  sizes = [int(layout.section_of(config, link).batch_size) for link in layout.chain(config)]
  return sharding.cpu_devices_for(sizes, cores or 1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:  # at once, before JAX and the pipeline load
    from distill import paths  # pylint: disable=import-outside-toplevel
    raise SystemExit(f"error: {paths.MISSING_WORKDIR}")
  from distill import xla_cpu  # pylint: disable=import-outside-toplevel
  split = cli.run_cli(cpu_devices, FLAGS.config, FLAGS.cpu_devices)
  if split is not None:
    cli.run_cli(xla_cpu.split_host, split)  # before JAX starts a backend
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.multihost:
    initialize_distributed(jax)
  from distill import (compilation_cache, pipeline,  # pylint: disable=import-outside-toplevel
                       preemption)
  cache = FLAGS.compilation_cache_dir
  cli.run_cli(compilation_cache.enable,
              compilation_cache.default_directory() if cache is None else cache)
  logging.info("JAX process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    cli.run_cli(pipeline.run, FLAGS.config, FLAGS.workdir)  # paths resolved there
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(preemption.EXIT_STATUS)


if __name__ == "__main__":
  app.run(main)
