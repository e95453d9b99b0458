"""Loading ``configs/<name>.py[:arg]`` files outside the CLI (tests, notebooks, scripts)."""

from __future__ import annotations

import importlib.util
import pathlib

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
  module_spec = importlib.util.spec_from_file_location(f"distill_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
