"""Paths as users type them: local paths made absolute once, at each entry point.

Orbax (and so every checkpoint) needs absolute paths; a relative ``--workdir=runs/digits`` is
resolved against the working directory of the command, ``~`` is expanded, and URLs
(``gs://…`` and any other ``scheme://``) are left exactly as given.
"""

from __future__ import annotations

import os
import uuid

import ml_collections
from etils import epath

# Config fields that name a file or directory: (section, field). Absent fields are skipped.
CONFIG_PATH_FIELDS = (("teacher", "checkpoint"), ("teacher", "pretrained"),
                      ("eval", "inception_weights"), ("eval", "clip_model"),
                      ("eval", "captions_file"),
                      ("data", "data_dir"), (None, "pretrained"))


MISSING_WORKDIR = "--workdir is missing: pass --workdir=DIR (a local path or gs://...)."


def is_url(path) -> bool:
  return "://" in str(path)


def resolve(path) -> str:
  """``path`` made absolute (local paths) or unchanged (URLs, and ``""`` meaning unset)."""
  path = os.fspath(path) if not isinstance(path, str) else path
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose path fields (``CONFIG_PATH_FIELDS``) are resolved."""
  config = config.copy_and_resolve_references()
  for section, field in CONFIG_PATH_FIELDS:
    holder = config if section is None else config.get(section)
    if holder is not None and field in holder and isinstance(holder[field], str):
      holder[field] = resolve(holder[field])
  return config


def check_writable(directory, *, what: str = "--workdir") -> epath.Path:
  """Creates ``directory`` if needed and writes a probe file in it, or raises a one-line
  ``ValueError`` naming it, before anything compiles or trains."""
  directory = epath.Path(resolve(directory))
  # One probe name per process: several processes of one run check the same directory at once.
  probe = directory / f".distill-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"{what}={str(directory)!r} is not a writable directory "
                     f"({type(e).__name__}: {e.strerror or e}): pass a directory you can "
                     "write to.") from None
  return directory
