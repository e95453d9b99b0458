"""``python -m distill.main --config=configs/<name>.py[:runlocal] --workdir=DIR``.

All logic lives in importable libraries (``distill.pipeline``) that tests and notebooks call.
Multi-host: pass ``--multihost`` or set ``DISTILL_MULTIHOST=1`` to call
``jax.distributed.initialize()`` first (its failure is not swallowed).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/digits.py:runlocal.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints and reports.")
flags.DEFINE_bool("multihost", os.environ.get("DISTILL_MULTIHOST", "") not in ("", "0"),
                  "Call jax.distributed.initialize() first (default: $DISTILL_MULTIHOST).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.multihost:
    jax.distributed.initialize()
  from distill import pipeline  # pylint: disable=import-outside-toplevel
  logging.info("JAX process %d/%d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  pipeline.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
