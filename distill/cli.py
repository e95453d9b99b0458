"""What every command-line entry shares: bad input ends in one line, never a traceback.

``run_cli(fn, …)`` calls ``fn`` and turns the errors that describe bad input or a run that cannot
go on (a config field, a missing or damaged file, a checkpoint that cannot be written, a run of
non-finite steps) into ``error: <message>`` on stderr and exit status 1. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


def user_errors() -> tuple[type[BaseException], ...]:
  from distill import checkpoints, train  # pylint: disable=import-outside-toplevel
  return (ValueError, FileNotFoundError, checkpoints.CheckpointError, train.NonFiniteError)


def run_cli(fn, *args, **kwargs):
  try:
    return fn(*args, **kwargs)
  except user_errors() as e:
    raise SystemExit(f"error: {e}") from None  # printed to stderr, exit status 1
