"""The latent chain through the CLI: imported teacher → teacher_v → stage one.

On the tiny class-conditional fixture (cin256-like): a run killed with SIGKILL in stage one,
from another directory with relative paths, then finished by the same run, ends with
teacher_v's and stage one's parameters bit-identical to an uninterrupted run; a rerun trains
nothing; a changed config is refused; ``distill.sample --labels`` decodes images. The latent
halvings run in the chains of the text-to-image run (tests/test_latent_parts.py, with prompts →
images and the eval stage's CLIP scores), the latent cache (tests/test_latent_cache.py) and the
inpainting U-Net (tests/test_latent_inpainting.py); a resume inside a halving is the pixel
chain's test (tests/test_pipeline.py).
"""

import json
import logging
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from distill import layout, pipeline, sample
from distill.config_utils import load_config
from test_pipeline import DRIVER  # the SIGKILL driver of the pixel chain's test

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("latent_pipeline")

# Four steps per link; stage one saves every two steps (the kill comes at its step 2), teacher_v
# at its end.
OVERRIDES = {"num_devices": 1, "stages": "teacher,teacher_v,stage_one",
             "teacher_v.num_train_steps": 4, "stage_one.num_train_steps": 4}
for _name in ("teacher_v", "stage_one"):
  OVERRIDES[f"{_name}.checkpoint_every"] = 2 if _name == "stage_one" else 4
  OVERRIDES[f"{_name}.sample_every"] = 4 if _name == "teacher_v" else 0  # one grid compile


def _config(name):
  config = load_config(f"{name}:runlocal")
  for key, value in OVERRIDES.items():
    holder = config
    *sections, field = key.split(".")
    for section in sections:
      holder = holder[section]
    holder[field] = value
  return config


def _flags():
  return [f"--config.{k}={v}" for k, v in OVERRIDES.items()]


def _final_params(config, workdir, names=("teacher_v", "stage_one")):
  mesh = pipeline.make_mesh(config)
  return {link.name: jax.device_get(layout.read_final_params(config, workdir, link, mesh))
          for link in layout.chain(config) if link.name in names}


def _equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def _cli(cwd, name, workdir, *, stop_at=None, extra=()):
  env = dict(os.environ)
  config = os.path.relpath(REPO / "configs" / f"{name}.py", cwd)
  args = [f"--config={config}:runlocal", f"--workdir={workdir}", *_flags(), *extra]
  if stop_at:
    env.update(STOP_AT=stop_at, STOP_HOW="kill")
    cmd = [sys.executable, "-c", DRIVER, *args]
  else:
    cmd = [sys.executable, "-m", "distill.main", *args]
  return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def cin_reference(tmp_path_factory):
  """The links up to stage one, uninterrupted."""
  config = _config("ldm_cin256")
  workdir = tmp_path_factory.mktemp("cin_reference")
  pipeline.run(config, workdir)
  return workdir


def test_cin_chain_killed_through_the_cli_resumes_bit_identically(tmp_path, cin_reference,
                                                                  caplog, monkeypatch):
  config = _config("ldm_cin256")
  assert [link.name for link in layout.chain(config)][:3] == ["teacher", "teacher_v", "stage_one"]
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  workdir = cwd / "runs" / "cin"
  killed = _cli(cwd, "ldm_cin256", "runs/cin", stop_at="stage_one:2")
  assert killed.returncode == -9, killed.stderr[-2000:]
  stages = json.loads((workdir / "manifest.json").read_text())["stages"]
  assert "teacher_v" in stages and "stage_one" not in stages and "teacher" not in stages

  # Finished by the same run in this process, from the same directory with the same relative
  # workdir (the CLI's path to pipeline.run is tested by the kill; a second interpreter would
  # only add its start-up and the programs' cache loads).
  monkeypatch.chdir(cwd)
  with caplog.at_level(logging.INFO):
    pipeline.run(_config("ldm_cin256"), "runs/cin")
  assert "teacher: not trained" in caplog.text
  assert "teacher_v (link 1/2): complete" in caplog.text
  assert re.search(r"stage_one step 4/4: .* \| link 2/2", caplog.text)
  caplog.clear()
  resumed, straight = _final_params(config, workdir), _final_params(config, cin_reference)
  assert set(straight) == {"teacher_v", "stage_one"}
  for name in straight:
    assert _equal(resumed[name], straight[name]), name
  # Each link trained: teacher_v moved away from the imported weights, stage one added cond_proj.
  imported = jax.device_get(layout.read_final_params(
      config, workdir, layout.chain(config)[0], pipeline.make_mesh(config)))
  assert not _equal(imported, resumed["teacher_v"])
  assert "time_embedding_cond_proj" in resumed["stage_one"]
  assert float(np.abs(resumed["stage_one"]["time_embedding_cond_proj"]["kernel"]).max()) > 0

  # A rerun trains nothing, a changed config is refused in one line.
  with caplog.at_level(logging.INFO):
    pipeline.run(config, workdir)
  assert "stage_one (link 2/2): complete" in caplog.text
  assert not re.search(r"\S+ step \d+/\d+: loss", caplog.text)
  config.stage_one.lr = 0.005
  with pytest.raises(ValueError, match=r"stage_one\.lr: 0\.001 -> 0\.005") as info:
    pipeline.run(config, workdir)
  assert "\n" not in str(info.value)

  # distill.sample's command line, in this process, from the run's directory.
  sample._main(["--workdir=runs/cin", "--model=stage_one", "--num_steps=1", "--labels=3,7",  # pylint: disable=protected-access
                "--w=0,4", "--per_row=2", "--out=samples",
                f"--compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"])
  with np.load(cwd / "samples" / "stage_one_deterministic_1steps_seed0.npz") as f:
    assert f["images"].shape == (4, 16, 16, 3)  # decoded by the VQ first stage
    assert list(f["labels"]) == [3, 7, 3, 7] and list(f["w"]) == [0, 0, 4, 4]
  with pytest.raises(ValueError, match=r"is class-conditional: pass --labels, not prompts\.$"):
    sample._main([f"--workdir={workdir}", "--model=stage_one", "--num_steps=1",  # pylint: disable=protected-access
                  "--prompt=a cat", f"--out={tmp_path / 'refused'}",
                  f"--compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"])
