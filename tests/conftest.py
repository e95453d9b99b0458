"""Test set-up: eight forced CPU devices, fast compiles, a persistent compilation cache.

Identical programs compiled again (each resumed run builds its train step anew) load from the
cache instead of recompiling; subprocesses inherit it through JAX_COMPILATION_CACHE_DIR.
"""

import collections
import gc
import os
import shutil
import tempfile

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()
# Tests are dominated by XLA's CPU compile time, not run time. Skip LLVM's optimisation passes
# (about 2.5x faster compiles), and at that level emit fusions with XLA's older elemental emitters
# instead of its MLIR fusion emitters: a tiny U-Net's train step compiles in 4.0 s instead of 6.0 s
# (docs/testing.md). Results are the same programs' results, to float32 rounding.
for _option, _value in (("--xla_backend_optimization_level", "0"),
                        ("--xla_cpu_use_fusion_emitters", "false"),
                        ("--xla_cpu_parallel_codegen_split_count", "1")):
  if _option not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += f" {_option}={_value}"
import distill  # noqa: E402,F401  (puts its XLA:CPU options into XLA_FLAGS before JAX starts)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One scratch directory per test run, shared by the pytest-xdist workers and the subprocesses
# (they inherit the environment) and removed when the run ends (`pytest_unconfigure`): the
# compilation cache, and the temporary files of libraries (tfds leaves an empty directory in the
# system's temporary directory whenever a builder starts without its data). pytest's own
# `tmp_path` directories stay where pytest keeps them, for a failed test's inspection.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
_OWNS_SCRATCH = "DISTILL_TEST_SCRATCH" not in os.environ  # not a pytest-xdist worker's
if _OWNS_SCRATCH:
  os.environ["DISTILL_TEST_SCRATCH"] = tempfile.mkdtemp(prefix="distill-tests-")
_SCRATCH = os.environ["DISTILL_TEST_SCRATCH"]
os.makedirs(os.path.join(_SCRATCH, "tmp"), exist_ok=True)
os.environ["TMPDIR"] = tempfile.tempdir = os.path.join(_SCRATCH, "tmp")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_SCRATCH, "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the environment above)
from jax import monitoring  # noqa: E402  (JAX's event listeners: tiny_pipeline_traces)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402


def pytest_unconfigure(config):
  """The run's scratch directory goes when the process that made it ends (the controller under
  pytest-xdist, or the one process under ``-n 0``)."""
  del config
  if _OWNS_SCRATCH:
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
  """What outlives a test (JAX's trace and compile caches, modules, session fixtures: about
  1.5 million objects in a worker) is moved out of reach of Python's cyclic garbage collector
  once the test's own garbage is collected. Otherwise every full collection walks all of it
  again: 9 % of the CPU time of a run of two test files (docs/testing.md)."""
  del item, nextitem
  gc.collect()
  gc.freeze()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """The suite runs on two pytest-xdist workers (pytest.ini): every test that uses the tiny
  pipeline (or the emoji run) goes to one worker, so that it is trained once per run."""
  for item in items:
    for name in ("tiny_pipeline", "emoji_run"):
      if name in item.fixturenames:
        item.add_marker(pytest.mark.xdist_group(name))


_TINY_PIPELINE_TRACES = collections.Counter()  # function name -> times JAX traced it


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
  """A workdir with the whole tiny digits pipeline (teacher → stage one → halvings 8 → 1) run
  uninterrupted on the eight devices of this process; shared by every test that needs trained
  models, and the reference of the multi-host test (2 processes × 4 devices). The functions JAX
  traced during the run are counted (``tiny_pipeline_traces``)."""
  from distill import pipeline  # pylint: disable=import-outside-toplevel
  from distill.config_utils import load_config  # pylint: disable=import-outside-toplevel
  config = load_config("digits:runlocal")
  config.num_devices = -1
  workdir = tmp_path_factory.mktemp("tiny_pipeline")

  def count_traces(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/jaxpr_trace_duration":
      _TINY_PIPELINE_TRACES[kwargs.get("fun_name")] += 1

  monitoring.register_event_duration_secs_listener(count_traces)
  try:
    pipeline.run(config, workdir)
  finally:
    monitoring.unregister_event_duration_listener(count_traces)
  return workdir


@pytest.fixture(scope="session")
def tiny_pipeline_traces(tiny_pipeline) -> dict[str, int]:
  """How many times JAX traced each function (by name) while the tiny pipeline ran."""
  del tiny_pipeline
  return dict(_TINY_PIPELINE_TRACES)


@pytest.fixture(scope="session")
def emoji_run(tmp_path_factory):
  """``(config, workdir)``: configs/emoji.py:runlocal, every link from the autoencoder to the
  halving 2 -> 1 and a small eval stage, on one device; shared by the text-to-image tests and the
  text-to-image notebook's."""
  from distill import pipeline  # pylint: disable=import-outside-toplevel
  from distill.config_utils import load_config  # pylint: disable=import-outside-toplevel
  config = load_config("emoji:runlocal")
  config.num_devices = 1
  config.stage_two.start_num_steps = 2  # one halving, 2 -> 1
  config.teacher_v.sample_every = config.teacher_v.num_train_steps  # a grid of sample_prompts
  # The teacher's guided DDIM (at 4 steps), DPM-Solver++ and the student: DDIM at other step
  # counts is the teacher's sampler again.
  config.eval.update(dict(w_values=(4.0,), num_samples=12, batch_size=12, student_steps=(1,),
                          ddim_steps=()))
  workdir = tmp_path_factory.mktemp("emoji_run")
  pipeline.run(config, str(workdir))
  return config, workdir


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
  """A converted-layout FID Inception file with random weights: ``(path, arrays)``."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from distill.evaluation import inception  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  arrays = {}
  for name, shape in inception.torch_layout().items():
    # Scales that carry each image's signal through the ~95 layers (He-scaled convolutions,
    # batch-norm gains near 1): with gains of 0.1 every image gave the same features.
    if name.endswith("running_var"):
      arrays[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    elif name.endswith(".bn.weight"):
      arrays[name] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
    elif name.endswith(".conv.weight") or name == "fc.weight":
      fan_in = int(np.prod(shape[1:]))
      arrays[name] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    else:
      arrays[name] = rng.normal(0.0, 0.1, shape).astype(np.float32)
  path = tmp_path_factory.mktemp("inception") / "random_fid_inception.safetensors"
  save_file(arrays, str(path))
  return path, arrays
