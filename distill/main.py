"""``python -m distill.main --config=configs/<name>.py[:runlocal] --workdir=DIR``.

All logic lives in importable libraries (``distill.pipeline``) that tests and notebooks call.
Multi-host: pass ``--multihost`` or set ``DISTILL_MULTIHOST=1`` to call
``jax.distributed.initialize()`` first (its failure is not swallowed). On Cloud TPU it finds its
peers by itself; elsewhere pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (on CPU the processes' collectives then go through gloo).

Relative paths (``--workdir``, ``teacher.checkpoint``, ``eval.inception_weights``,
``data.data_dir``) are taken against the current directory; bad input ends in one line
(``error: …``, exit status 1).

Compiled programs are kept in JAX's persistent compilation cache (``--compilation_cache_dir``;
``distill/compilation_cache.py``), so later halvings and reruns do not compile them again.

Preemption: a SIGTERM during training saves a checkpoint of the current step and exits with
status 143; rerunning the same command resumes there.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:  # at once, before JAX and the pipeline load
    from distill import paths  # pylint: disable=import-outside-toplevel
    raise SystemExit(f"error: {paths.MISSING_WORKDIR}")
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.multihost:
    initialize_distributed(jax)
  from distill import (cli, compilation_cache, pipeline,  # pylint: disable=import-outside-toplevel
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
