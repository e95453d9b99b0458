"""XLA:CPU options that the package sets before JAX starts its backends.

jax 0.10's CPU backend hands convolutions, dots, reductions and element-wise ops to YNNPACK
fusions by default. For this project's U-Nets those fusions are the slow path on CPU: turning
them off (``--xla_cpu_experimental_ynn_fusion_type=`` with an empty list) makes the digits U-Net's
forward and backward passes about 2× faster and the CIFAR-10 U-Net's 25–30 % faster, with
bit-identical forward outputs (``bench/xla_cpu_flags.py``; BENCHMARKS.md, "XLA:CPU's YNNPACK
fusions").

``apply()`` adds the option to ``XLA_FLAGS`` unless the user's ``XLA_FLAGS`` already sets it (to
choose fusions yourself) or ``DISTILL_XLA_CPU_DEFAULTS=0``. It is a CPU-backend option: TPU and GPU
programs are unaffected. XLA reads ``XLA_FLAGS`` once, when the first backend starts, so it takes
effect only if ``distill`` is imported before JAX runs anything; ``distill/__init__.py`` calls it.
"""

from __future__ import annotations

import os

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT_FLAGS = (f"{YNN_FUSION_FLAG}=",)


def flags_with_defaults(xla_flags: str) -> str:
  """``xla_flags`` with each of ``DEFAULT_FLAGS`` appended unless that option is already set."""
  out = xla_flags.split()
  for flag in DEFAULT_FLAGS:
    name = flag.split("=", 1)[0]
    if not any(f == name or f.startswith(name + "=") for f in out):
      out.append(flag)
  return " ".join(out)


def apply(environ=os.environ) -> None:
  """Put ``DEFAULT_FLAGS`` into ``environ["XLA_FLAGS"]`` (see the module docstring)."""
  if environ.get("DISTILL_XLA_CPU_DEFAULTS", "1") == "0":
    return
  environ["XLA_FLAGS"] = flags_with_defaults(environ.get("XLA_FLAGS", ""))
