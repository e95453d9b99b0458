"""The XLA:CPU options the package puts into XLA_FLAGS (``distill.xla_cpu``)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from distill import xla_cpu


def _ynn_fusions() -> int:
  a = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  return jax.jit(lambda x, y: jnp.tanh(x @ y + 1.0)).lower(a, a).compile().as_text().count(
      "__ynn_fusion")


def test_this_process_with_eight_devices_keeps_xlas_fusions():
  """conftest forces eight CPU devices and imports the package before JAX starts a backend: with
  several devices the package leaves XLA's YNNPACK fusions on (distill/xla_cpu.py), so a dot
  compiles to one. The one-device case, where the option is set and no fusion is left, is
  checked in fresh processes (``test_split_host`` below, tests/test_bench.py)."""
  assert xla_cpu.cpu_device_count() == jax.device_count() == 8
  assert xla_cpu.YNN_FUSION_FLAG + "=" not in os.environ["XLA_FLAGS"].split()
  assert _ynn_fusions() > 0


_OPTION = "--xla_cpu_experimental_ynn_fusion_type="


def test_option_only_for_one_cpu_device():
  count = "--xla_force_host_platform_device_count"
  for env, added in (({"XLA_FLAGS": f"{count}=8"}, []), ({"XLA_FLAGS": f"{count}=1"}, [_OPTION]),
                     ({"JAX_NUM_CPU_DEVICES": "2"}, []), ({"JAX_NUM_CPU_DEVICES": "-1"}, [_OPTION]),
                     ({}, [_OPTION])):
    before = env.get("XLA_FLAGS", "").split()
    xla_cpu.apply(env)
    assert [f for f in env.get("XLA_FLAGS", "").split() if f not in before] == added, env
    assert env.get(xla_cpu.ADDED_VAR, "").split() == added, env  # what split_host may take out
  assert xla_cpu.cpu_device_count({"XLA_FLAGS": f"--a=1 {count}=3"}) == 3
  assert xla_cpu.cpu_device_count({"JAX_NUM_CPU_DEVICES": "4", "XLA_FLAGS": ""}) == 4
  assert xla_cpu.cpu_device_count({}) is None


_SPLIT = """
import json, os, sys
import distill
from distill import xla_cpu
xla_cpu.split_host(int(sys.argv[1]))
import jax, jax.numpy as jnp
a = jax.ShapeDtypeStruct((64, 64), jnp.float32)
hlo = jax.jit(lambda x, y: jnp.tanh(x @ y + 1.0)).lower(a, a).compile().as_text()
print(json.dumps([jax.device_count(), os.environ["XLA_FLAGS"], hlo.count("__ynn_fusion")]))
"""


def test_split_host():
  """In fresh processes: ``split_host(2)`` makes two CPU devices and takes the package's option
  back out of XLA_FLAGS before the backend starts (XLA's fusions are compiled); ``split_host(1)``
  keeps one device and the option (no fusion is compiled); an option the user set stays."""
  base = {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES", xla_cpu.ADDED_VAR)}
  own = _OPTION
  out = {}
  for name, n, env in (("split", 2, base), ("one", 1, base),
                       ("user's own", 2, dict(base, XLA_FLAGS=own))):
    res = subprocess.run([sys.executable, "-c", _SPLIT, str(n)], env=env, capture_output=True,
                         text=True, check=True, timeout=300)
    out[name] = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["split"][:2] == [2, ""] and out["split"][2] > 0, out
  assert out["one"] == [1, own, 0], out
  assert out["user's own"] == [2, own, 0], out


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


def test_how_distill_main_splits_the_host(monkeypatch):
  """``--cpu_devices`` wins; then a count the environment already sets or an accelerator plugin
  (no split); then ``config.num_devices``; else the most devices, up to one per core, that
  divide every link's batch size."""
  from distill import main, sharding  # pylint: disable=import-outside-toplevel
  from distill.config_utils import load_config  # pylint: disable=import-outside-toplevel
  config = load_config("digits")  # batch 64 in every link
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)))
  assert main.cpu_devices(config, 3, environ={"JAX_NUM_CPU_DEVICES": "8"}) == 3
  assert main.cpu_devices(config, None, environ={"JAX_NUM_CPU_DEVICES": "8"}) is None
  assert main.cpu_devices(config, None, environ={}) == 4  # 6 cores; 4 divides 64, 5 and 6 not
  with monkeypatch.context() as m:  # a TPU or GPU plugin installed: JAX's own count
    m.setattr(main, "ACCELERATOR_PLUGINS", ("json",))
    assert main.cpu_devices(config, None, environ={}) is None
    assert main.cpu_devices(config, 2, environ={}) == 2
  config.stage_one.batch_size = 48
  config.num_devices = 2
  assert main.cpu_devices(config, None, environ={}) == 2
  config.num_devices = -1
  assert main.cpu_devices(config, None, environ={}) == 4
  assert sharding.cpu_devices_for([64, 48], 8) == 8
  assert sharding.cpu_devices_for([63], 2) == 1
  assert sharding.cpu_devices_for([12], 8) == 6
