"""JAX's persistent compilation cache, on by default for the command-line entries.

Every link of the chain builds its train step anew, and the stage-two halvings compile the same
program each time (the student's step count is an argument, not a constant): with the cache,
halvings after the first load their step from disk instead of recompiling it, and a rerun or a
resumed run loads every program it compiled before (BENCHMARKS.md, "The default run with the
compilation cache and the 2×128 reference"). A cached program is the same executable, so results
do not change.

``--compilation_cache_dir`` of ``distill.main`` and ``distill.sample`` chooses the directory:
by default ``$JAX_COMPILATION_CACHE_DIR`` when that is set, else
``$XDG_CACHE_HOME/distill/jax`` (``~/.cache/distill/jax``); an empty value turns the cache off.
Programs that compile in less than JAX's threshold (1 s) are not stored. The cache is code that
the process runs: keep it in a directory only you can write to.
"""

from __future__ import annotations

import logging
import os

from distill import paths


def default_directory(environ=os.environ) -> str:
  """``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/distill/jax``."""
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  base = environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return os.path.join(base, "distill", "jax")


def enable(directory: str) -> str:
  """Points JAX's persistent compilation cache at ``directory`` (resolved; ``""``: off).

  Call before the first compile. Returns the directory used (``""`` when off).
  """
  import jax  # pylint: disable=import-outside-toplevel
  directory = paths.resolve(directory)
  if not directory:
    jax.config.update("jax_enable_compilation_cache", False)
    return ""
  if not paths.is_url(directory):
    paths.check_writable(directory, what="--compilation_cache_dir")
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  logging.info("compilation cache: %s", directory)
  return directory
