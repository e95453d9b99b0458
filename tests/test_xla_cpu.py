"""The XLA:CPU options the package puts into XLA_FLAGS (``distill.xla_cpu``)."""

import os

import jax
import jax.numpy as jnp

from distill import xla_cpu


def test_this_process_compiles_without_ynnpack_fusions():
  """conftest imports the package before JAX starts a backend, so XLA compiles this process's
  programs with the option: a dot that XLA's defaults hand to a YNNPACK fusion compiles to none.
  Fails if the option is missing or reached XLA_FLAGS after the backend started.
  (tests/test_bench.py::test_xla_cpu_flags_quick checks, in fresh processes, that XLA's
  defaults do make such fusions, so that a zero here is not vacuous.)"""
  assert xla_cpu.YNN_FUSION_FLAG + "=" in os.environ["XLA_FLAGS"].split()
  a = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  hlo = jax.jit(lambda x, y: jnp.tanh(x @ y + 1.0)).lower(a, a).compile().as_text()
  assert "__ynn_fusion" not in hlo


def test_added_to_other_flags_and_only_once():
  flags = xla_cpu.flags_with_defaults("--xla_force_host_platform_device_count=8")
  assert flags.split() == ["--xla_force_host_platform_device_count=8",
                           "--xla_cpu_experimental_ynn_fusion_type="]
  assert xla_cpu.flags_with_defaults(flags) == flags
  assert xla_cpu.flags_with_defaults("") == "--xla_cpu_experimental_ynn_fusion_type="


def test_a_users_own_setting_wins():
  own = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
  assert xla_cpu.flags_with_defaults(own) == own
  # A longer flag that merely starts with the same name is not the same option.
  other = "--xla_cpu_experimental_ynn_fusion_type_extra=1"
  assert xla_cpu.flags_with_defaults(other).split() == [
      other, "--xla_cpu_experimental_ynn_fusion_type="]


def test_opt_out():
  env = {"XLA_FLAGS": "--a=1", "DISTILL_XLA_CPU_DEFAULTS": "0"}
  xla_cpu.apply(env)
  assert env["XLA_FLAGS"] == "--a=1"
  env = {}
  xla_cpu.apply(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
