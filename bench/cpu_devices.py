"""Forced CPU devices for the scripts that compile programs for a mesh (``--fsdp=8,16``).

Imported by a script run as ``__main__`` before JAX is: XLA reads the device count once, when its
CPU backend starts. Under pytest the suite's eight devices stay.
"""

import os
import sys


def force_for_fsdp(argv=None, *, default: str) -> None:
  """Enough CPU devices for the largest ``--fsdp`` size in ``argv`` (or in ``default``)."""
  argv = sys.argv[1:] if argv is None else argv
  given = [a.split("=", 1)[1] for a in argv if a.startswith("--fsdp=")]
  count = max(int(n) for n in (given[-1] if given else default).split(","))
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={count}")
