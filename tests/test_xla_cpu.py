"""The XLA:CPU options the package puts into XLA_FLAGS (``distill.xla_cpu``)."""

import os

from distill import xla_cpu


def test_the_package_option_is_in_this_process():
  # conftest imports the package before any backend starts, so the option is in effect here
  # (tests/test_bench.py checks that XLA then compiles no YNNPACK fusion).
  assert xla_cpu.YNN_FUSION_FLAG + "=" in os.environ["XLA_FLAGS"].split()


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
