"""Multi-host: the tiny teacher, stage one and the eval stage as 2 processes × 4 CPU devices
equal 1 process × 8.

The two processes are ``python -m distill.main --multihost`` with a coordinator on 127.0.0.1
(``jax.distributed.initialize``; CPU collectives through gloo), sharing one workdir as pod
workers share a ``gs://`` one. Each process reads only its rows of every global batch; all
take part in the checkpoint saves and in their NaN check; only process 0 writes metrics. Every
link's logged losses and final parameters must equal those of the single-process run on the
same 8-device mesh: the ``tiny_pipeline`` fixture, trained in the test process. The eval stage
runs on a copy of that workdir without its report: each process draws its devices' rows of every
batch, and process 0 writes cells that must equal the fixture's.
"""

import os
import json
import pathlib
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from distill import layout, pipeline
from distill.config_utils import load_config

REPO = pathlib.Path(__file__).resolve().parent.parent
# A link trained from scratch and a link that starts from the previous link's checkpoint and
# holds it as a frozen teacher: the two ways a link meets the processes. (A halving is the
# second kind again, with another objective.) The teacher draws its progress grid, the sampler
# over the processes' mesh; stage one's would add compiles, not paths (a grid touches neither the
# training's keys nor its parameters: the reference draws it).
STAGES = "teacher,stage_one"


def _config():
  config = load_config("digits:runlocal")
  config.num_devices = -1
  return config


def _args(workdir, *options):
  return ["-m", "distill.main", f"--config={REPO}/configs/digits.py:runlocal",
          f"--workdir={workdir}", "--config.num_devices=-1", *options]


def _env(devices: int):
  """This process's environment (its XLA options: the same compiled code as the reference), with
  ``devices`` forced CPU devices."""
  flags = [f for f in os.environ["XLA_FLAGS"].split()
           if not f.startswith("--xla_force_host_platform_device_count=")]
  return dict(os.environ, XLA_FLAGS=" ".join(
      [*flags, f"--xla_force_host_platform_device_count={devices}"]))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(args, root, name) -> list[str]:
  """Runs ``python args`` as processes 0 and 1 of 2, each with 4 CPU devices; their logs."""
  port = _free_port()
  logs = [root / f"{name}_process_{i}.log" for i in (0, 1)]
  procs = []
  for i, log in enumerate(logs):  # logs to files: a full pipe would stall one process
    with open(log, "w", encoding="utf-8") as out:
      procs.append(subprocess.Popen(
          [sys.executable, *args, "--multihost", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={i}"],
          env=_env(4), stdout=out, stderr=subprocess.STDOUT, text=True))
  for p in procs:
    p.wait(timeout=1200)
  texts = [log.read_text() for log in logs]
  for i, (p, text) in enumerate(zip(procs, texts)):
    assert p.returncode == 0, text[-3000:]
    assert f"JAX process {i}/2, 4 local / 8 global devices" in text
  return texts


@pytest.fixture(scope="module")
def runs(tiny_pipeline, tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  assert jax.device_count() == 8  # the reference: this process's eight forced CPU devices
  _run_two_processes(_args(root / "multi", f"--config.stages={STAGES}",
                           "--config.stage_one.sample_every=0"), root, "train")
  return tiny_pipeline, root / "multi"


EVAL_SEED = 0  # the fixture's cells of this seed are redrawn: every method, step count and w


@pytest.fixture(scope="module")
def eval_runs(tiny_pipeline, tmp_path_factory):
  """The fixture's workdir copied without its report (but with its digits classifier, the
  feature extractor: trained again, it would be the same one), and the eval stage run on it by 2
  processes; ``(reference, copy, logs)``."""
  root = tmp_path_factory.mktemp("multihost_eval")
  shutil.copytree(tiny_pipeline, root / "multi", ignore=shutil.ignore_patterns("report"))
  shutil.copytree(tiny_pipeline / "report" / "classifier", root / "multi" / "report" / "classifier")
  args = _args(root / "multi", "--config.stages=eval", f"--config.eval.seeds={EVAL_SEED},")
  return tiny_pipeline, root / "multi", _run_two_processes(args, root, "eval")


def _losses(directory):
  (events,) = [p for p in directory.iterdir() if p.name.startswith("events.out")]
  # clu writes scalars as TF2 summaries: tensors of rank 0.
  acc = event_accumulator.EventAccumulator(str(events), size_guidance={"tensors": 0})
  acc.Reload()
  return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors("loss")]


def test_two_processes_match_one_process(runs):
  single, multi = runs
  config = _config()
  mesh = pipeline.make_mesh(config)
  links = [link for link in layout.chain(config) if link.name in STAGES.split(",")]
  assert len(links) == 2
  for link in links:
    # Only process 0 writes metrics: one event file per link, with the same losses.
    a, b = _losses(link.directory(single)), _losses(link.directory(multi))
    assert [s for s, _ in a] == [s for s, _ in b] and a, link.name
    # Stage one starts at its target (the teacher's guided prediction), so its losses are about
    # 1e-5 and follow rounding-sized gradients, which Adam scales up to full steps: losses are
    # held to 1e-6 absolute, a tenth of their size (the teacher's, about 0.7, to 1e-5 relative).
    np.testing.assert_allclose([v for _, v in b], [v for _, v in a], rtol=1e-5, atol=1e-6,
                               err_msg=link.name)
    # Parameters to float32 rounding: the processes' gradient all-reduce (gloo) sums in another
    # order than one process's, and Adam's 1/sqrt(v) enlarges rounding in near-zero gradients.
    # A wrong data shard or a missed update moves them by orders of magnitude more.
    pa = jax.device_get(layout.read_final_params(config, single, link, mesh))
    pb = jax.device_get(layout.read_final_params(config, multi, link, mesh))
    jax.tree.map(lambda x, y, name=link.name: np.testing.assert_allclose(
        y, x, rtol=1e-4, atol=1e-5, err_msg=name), pa, pb)


def test_two_processes_evaluate_as_one(eval_runs):
  single, multi, logs = eval_runs
  config = _config()
  reference = sorted((single / "report" / "cells").glob(f"*_seed{EVAL_SEED}.json"))
  assert sorted(p.name for p in (multi / "report" / "cells").iterdir()) == [
      p.name for p in reference] and len(reference) == 16
  for path in reference:
    want, got = json.loads(path.read_text()), json.loads((multi / "report" / "cells" /
                                                          path.name).read_text())
    for key in ("fid", "is", "class_accuracy", "precision", "recall"):
      # Samples to float32 rounding (another device count per process runs the same programs);
      # a sample drawn twice, lost or out of order moves a metric by far more.
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=f"{path.name} {key}")
    assert got["num_samples"] == want["num_samples"] == config.eval.num_samples
  # The reference features were extracted share by share and gathered: the same statistics.
  for stats in (single / "report").glob("stats_*.npz"):
    a, b = np.load(stats), np.load(multi / "report" / stats.name)
    np.testing.assert_allclose(b["sigma"], a["sigma"], rtol=1e-6, atol=1e-9)
    assert int(a["count"]) == int(b["count"])
  for head in (single / "report" / "heads").iterdir():  # the grids' samples, gathered in order
    a, b = np.load(head), np.load(multi / "report" / "heads" / head.name)
    np.testing.assert_allclose(b["images"], a["images"], atol=1e-5)
    assert list(b["conditions"]) == list(a["conditions"])
  assert (multi / "report" / "table.md").exists()
  # Each process drew the rows of its 4 devices in every batch: a batch of 20 is padded to 24,
  # 3 rows per device, so process 0 holds examples 0–11 and process 1 examples 12–19.
  n = config.eval.num_samples
  assert (n, config.eval.batch_size) == (20, 20)
  for i, (mine, text) in enumerate(zip((12, 8), logs)):
    assert (f"eval: process {i}/2 drew {mine * len(reference)} of the {n * len(reference)} "
            "samples (its 4 of 8 devices)" in text), text[-2000:]
