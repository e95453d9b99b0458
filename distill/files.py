"""Atomic file writes (local paths and gs:// alike): a rerun never trusts a half-written file."""

from __future__ import annotations

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
