"""Files the package writes and reads: atomic writes (local paths and gs:// alike: a rerun never
trusts a half-written file), and external safetensors weights read with errors that name the file.
"""

from __future__ import annotations

import contextlib

import numpy as np
from etils import epath


def write_atomic(path, data: bytes | str) -> None:
  """Writes ``data`` to ``path`` through a temporary file renamed over it."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(path)


@contextlib.contextmanager
def safetensors_errors(path):
  """Turns the library's error for a damaged, truncated or non-safetensors file (e.g. a pickle
  renamed ``.safetensors``) into a one-line ``ValueError`` that names ``path``."""
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  try:
    yield
  except SafetensorError as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e}); it is truncated, damaged "
                     "or in another format: download or convert it again.") from None


def check_finite(tensors: dict, *, what: str) -> None:
  """A one-line ``ValueError`` naming ``what`` and the first tensor holding NaN or infinity."""
  for name, value in tensors.items():
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
      raise ValueError(f"{what}: {name} holds NaN or infinite values: these weights are "
                       "damaged and are not used.")
