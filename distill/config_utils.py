"""Loading ``configs/<name>.py[:arg]`` files outside the CLI (tests, notebooks, scripts).

A config file is a plain Python file with ``get_config(arg=None)``; it imports its shared
settings as ``from distill import config_common as common``, so it loads from any directory.
"""

from __future__ import annotations

import pathlib
import runpy

import ml_collections

REPO_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``"configs/digits.py:runlocal"`` → ``get_config("runlocal")`` of that file.

  A bare name such as ``"digits"`` or ``"digits:runlocal"`` is looked up in the repository's
  ``configs/`` folder.
  """
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if file.suffix != ".py":
    file = REPO_CONFIGS / f"{path}.py"
  if not file.is_file():
    raise ValueError(f"config file {str(file)!r} does not exist: pass a path such as "
                     "configs/digits.py or a name in configs/.")
  return runpy.run_path(str(file))["get_config"](arg or None)
