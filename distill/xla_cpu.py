"""XLA:CPU options that the package sets before JAX starts its backends.

jax 0.10's CPU backend hands convolutions, dots, reductions and element-wise ops to YNNPACK
fusions by default. For this project's U-Nets those fusions are the slow path on a single CPU
device: turning them off (``--xla_cpu_experimental_ynn_fusion_type=`` with an empty list) makes
the digits U-Net's forward and backward passes about 2× faster and the CIFAR-10 U-Net's 25–30 %
faster, with bit-identical forward outputs (``bench/xla_cpu_flags.py``; BENCHMARKS.md, "XLA:CPU's
YNNPACK fusions").

With **more than one CPU device** in the process (``--xla_force_host_platform_device_count`` or
``JAX_NUM_CPU_DEVICES`` above 1, or ``split_host``), the option is not set: without the YNNPACK
fusions, XLA:CPU computes wrong values for the first rows of each device's shard when the devices
run a long program (a 12-step sampler) concurrently, while with them the shards match one device
to float32 rounding (``tests/test_sample.py::test_sampler_on_eight_cpu_devices_matches_one``).
With one device per core, the two settings train equally fast (BENCHMARKS.md, "One XLA device per
core").

``apply()`` adds the option to ``XLA_FLAGS`` unless the user's ``XLA_FLAGS`` already sets it (to
choose fusions yourself), the process has several CPU devices, or ``DISTILL_XLA_CPU_DEFAULTS=0``.
It is a CPU-backend option: TPU and GPU programs are unaffected. XLA reads ``XLA_FLAGS`` once, when
the first backend starts, so it takes effect only if ``distill`` is imported before JAX runs
anything; ``distill/__init__.py`` calls it.
"""

from __future__ import annotations

import os

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
DEFAULT_FLAGS = (f"{YNN_FUSION_FLAG}=",)
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
ADDED_VAR = "DISTILL_XLA_CPU_ADDED"  # the options apply() put into XLA_FLAGS (not the user's own)


def flags_with_defaults(xla_flags: str) -> str:
  """``xla_flags`` with each of ``DEFAULT_FLAGS`` appended unless that option is already set."""
  out = xla_flags.split()
  for flag in DEFAULT_FLAGS:
    name = flag.split("=", 1)[0]
    if not any(f == name or f.startswith(name + "=") for f in out):
      out.append(flag)
  return " ".join(out)


def _flag_value(xla_flags: str, name: str) -> str | None:
  values = [f.split("=", 1)[1] for f in xla_flags.split() if f.startswith(name + "=")]
  return values[-1] if values else None


def cpu_device_count(environ=os.environ) -> int | None:
  """The CPU device count this process was told to create (``JAX_NUM_CPU_DEVICES``, else
  ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``), or None if neither is set."""
  for value in (environ.get("JAX_NUM_CPU_DEVICES"),
                _flag_value(environ.get("XLA_FLAGS", ""), DEVICE_COUNT_FLAG)):
    if value not in (None, "", "-1"):
      return int(value)
  return None


def apply(environ=os.environ) -> None:
  """Put ``DEFAULT_FLAGS`` into ``environ["XLA_FLAGS"]`` (see the module docstring)."""
  if environ.get("DISTILL_XLA_CPU_DEFAULTS", "1") == "0" or (cpu_device_count(environ) or 1) > 1:
    return
  before = environ.get("XLA_FLAGS", "").split()
  environ["XLA_FLAGS"] = flags_with_defaults(" ".join(before))
  added = [f for f in environ["XLA_FLAGS"].split() if f not in before]
  if added:  # inherited by subprocesses together with XLA_FLAGS
    environ[ADDED_VAR] = " ".join(added)


def split_host(num_devices: int, environ=os.environ) -> None:
  """Make JAX's CPU backend ``num_devices`` devices (``jax_num_cpu_devices``), for data
  parallelism over the cores of a host without accelerators; with more than one, the options
  ``apply()`` added are taken out of ``XLA_FLAGS`` again (module docstring).

  Must run before JAX starts a backend (JAX raises otherwise). Only the CPU backend changes:
  on a TPU or GPU host the accelerators are still ``jax.devices()``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if num_devices < 1:
    raise ValueError(f"cpu_devices={num_devices} must be >= 1.")
  jax.config.update("jax_num_cpu_devices", num_devices)
  added = environ.get(ADDED_VAR, "").split()
  if num_devices > 1 and added:
    environ["XLA_FLAGS"] = " ".join(f for f in environ.get("XLA_FLAGS", "").split()
                                    if f not in added)
    del environ[ADDED_VAR]
