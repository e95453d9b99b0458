"""The latent chain through the CLI: imported teacher → teacher_v → stage one → the halving 2 → 1.

On the tiny class-conditional fixture (cin256-like): a run killed with SIGKILL in stage one,
from another directory with relative paths, then finished by the same command, ends with
teacher_v's and stage one's parameters bit-identical to an uninterrupted run; a rerun trains nothing; a
changed config is refused; ``distill.sample --labels`` decodes images. On the tiny SD-like
fixture (text), on image–caption data: the chain runs, ``distill.sample --prompt`` decodes
images of prompts, and the eval stage reports FID and CLIP score (the tiny CLIP fixture) on the
held-out captions.
"""

import csv
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
from PIL import Image
from test_image_text import CAPTIONS, _image, _png  # small RGBA images with captions
from test_pipeline import DRIVER  # the SIGKILL driver of the pixel chain's test

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.xdist_group("latent_pipeline")

# Four steps per link, a checkpoint every two, halvings 2 → 1: every link trains and saves.
OVERRIDES = {"num_devices": 1, "teacher_v.num_train_steps": 4, "stage_one.num_train_steps": 4,
             "stage_two.train_steps_per_halving": 4, "stage_two.start_num_steps": 2}
for _name in ("teacher_v", "stage_one", "stage_two"):
  OVERRIDES[f"{_name}.checkpoint_every"] = 2
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


def _sample(cwd, workdir, *args):
  return subprocess.run([sys.executable, "-m", "distill.sample", f"--workdir={workdir}", *args],
                        cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cin_reference(tmp_path_factory):
  """The links up to stage one, uninterrupted (the halving's resume is the pixel chain's test)."""
  config = _config("ldm_cin256")
  config.stages = "teacher,teacher_v,stage_one"
  workdir = tmp_path_factory.mktemp("cin_reference")
  pipeline.run(config, workdir)
  return workdir


def test_cin_chain_killed_and_resumed_through_the_cli_is_bit_identical(tmp_path, cin_reference,
                                                                       caplog):
  config = _config("ldm_cin256")
  assert [link.name for link in layout.chain(config)] == [
      "teacher", "teacher_v", "stage_one", "stage_two/N=1"]
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  workdir = cwd / "runs" / "cin"
  killed = _cli(cwd, "ldm_cin256", "runs/cin", stop_at="stage_one:2")
  assert killed.returncode == -9, killed.stderr[-2000:]
  stages = json.loads((workdir / "manifest.json").read_text())["stages"]
  assert "teacher_v" in stages and "stage_one" not in stages and "teacher" not in stages

  finished = _cli(cwd, "ldm_cin256", "runs/cin")
  assert finished.returncode == 0, finished.stderr[-3000:]
  assert "teacher: not trained" in finished.stderr
  assert "teacher_v (link 1/3): complete" in finished.stderr
  assert re.search(r"stage_two/N=1 step 4/4: .* \| link 3/3", finished.stderr)
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
  halving = _final_params(config, workdir, names=("stage_two/N=1",))["stage_two/N=1"]
  assert not _equal(halving, resumed["stage_one"])

  # In this process (the same code path as the CLI's, without a new interpreter): a rerun
  # trains nothing, a changed config is refused in one line.
  with caplog.at_level(logging.INFO):
    pipeline.run(config, workdir)
  assert "stage_one (link 2/3): complete" in caplog.text
  assert not re.search(r"\S+ step \d+/\d+: loss", caplog.text)
  config.stage_one.lr = 0.005
  with pytest.raises(ValueError, match=r"stage_one\.lr: 0\.001 -> 0\.005") as info:
    pipeline.run(config, workdir)
  assert "\n" not in str(info.value)

  out = _sample(cwd, "runs/cin", "--model=student", "--num_steps=1", "--labels=3,7", "--w=0,4",
                "--per_row=2", "--out=samples")
  assert out.returncode == 0, out.stderr[-2000:]
  with np.load(cwd / "samples" / "student1_deterministic_1steps_seed0.npz") as f:
    assert f["images"].shape == (4, 16, 16, 3)  # decoded by the VQ first stage
    assert list(f["labels"]) == [3, 7, 3, 7] and list(f["w"]) == [0, 0, 4, 4]
  with pytest.raises(ValueError, match=r"is class-conditional: pass --labels, not prompts\.$"):
    sample._main([f"--workdir={workdir}", "--model=student", "--num_steps=1",  # pylint: disable=protected-access
                  "--prompt=a cat", f"--out={tmp_path / 'refused'}",
                  f"--compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"])


def test_sd_chain_on_captions_and_prompts_to_images(tmp_path):
  """The SD-like chain through the CLI on image–caption data (a captions.jsonl folder), its
  progress grid drawn from latent.sample_prompts; then prompts → decoded images."""
  cwd = tmp_path / "elsewhere"
  (cwd / "pairs").mkdir(parents=True)
  lines = []
  for i, caption in enumerate(CAPTIONS):
    (cwd / "pairs" / f"{i}.png").write_bytes(_png(_image(i)))
    lines.append(json.dumps({"file": f"{i}.png", "caption": caption}))
  (cwd / "pairs" / "captions.jsonl").write_text("\n".join(lines))
  data = dict(name="image_text", data_dir="pairs", num_classes=0, image_size=16, channels=3,
              held_out=2)
  batch = {f"{name}.batch_size": 4 for name in ("teacher_v", "stage_one", "stage_two")}
  run = _cli(cwd, "sd15", "runs/sd", extra=[f"--config.data.{k}={v}" for k, v in data.items()]
             + [f"--config.{k}={v}" for k, v in batch.items()])
  assert run.returncode == 0, run.stderr[-3000:]
  assert re.search(r"stage_two/N=1 step 4/4", run.stderr)
  grid = np.asarray(Image.open(cwd / "runs" / "sd" / "teacher_v" / "samples" /
                               "step_00000004.png"))
  # Two rows (teacher_v.sample_w = 0, 4) of the four latent.sample_prompts: 16-pixel tiles,
  # 1-pixel pad, upscaled 4×.
  assert grid.shape[:2] == ((2 * 17 + 1) * 4, (4 * 17 + 1) * 4)
  (cwd / "prompts.txt").write_text("a handwritten digit three\n\na cat\n")
  out = _sample(cwd, "runs/sd", "--model=student", "--num_steps=1", "--prompt=a dog",
                "--prompts_file=prompts.txt", "--w=2,8", "--out=samples")
  assert out.returncode == 0, out.stderr[-2000:]
  with np.load(cwd / "samples" / "student1_deterministic_1steps_seed0.npz") as f:
    assert f["images"].shape == (8, 16, 16, 3)  # decoded by the KL first stage
    assert list(f["prompts"][:4]) == ["a dog", "a handwritten digit three", "a cat", "a dog"]
    assert list(f["w"]) == [2] * 4 + [8] * 4
    assert np.isfinite(f["images"]).all()
    assert not np.allclose(f["images"][0], f["images"][1])  # a prompt changes the image
  # The guided teacher, in this process: two branches per step on the folder's schedule.
  loaded = sample.load_model(cwd / "runs" / "sd", "teacher")
  x = sample.generate(loaded, sampler="deterministic", num_steps=2, prompts=["a cat", "a dog"],
                      w=[0.0, 8.0], seed=0)
  assert x.shape == (2, 16, 16, 3) and np.isfinite(x).all()
  with pytest.raises(ValueError, match="trained on image–caption data: pass --prompt"):
    sample._main([f"--workdir={cwd / 'runs' / 'sd'}", "--model=student", "--num_steps=1",  # pylint: disable=protected-access
                  f"--out={tmp_path / 'refused'}",
                  f"--compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"])

  # The eval stage on the finished chain, in this process: FID on the tiny CLIP's image
  # features and the CLIP score of each sample with its held-out caption.
  config = _config("sd15")
  config.data.update(dict(data, data_dir=str(cwd / "pairs")))
  for key, value in batch.items():
    config[key.split(".")[0]].batch_size = value
  config.stages = "eval"
  with pytest.raises(ValueError, match="pass --config.eval.clip_model=FOLDER"):
    pipeline.run(config, cwd / "runs" / "sd")
  config.eval.update(dict(
      features="clip", clip_model=str(REPO / "tests" / "fixtures" / "latent" / "clip-tiny"),
      w_values=(4.0,), seeds=(0,), num_samples=10, teacher_steps=1, ddim_steps=(1,),
      dpm_solver_steps=(3,), student_steps=(1,), samplers=("deterministic",), batch_size=10,
      reference_samples=4, pr_samples=4))
  pipeline.run(config, cwd / "runs" / "sd")
  report = cwd / "runs" / "sd" / "report"
  with open(report / "table.csv") as f:
    rows = {(r["method"], r["steps"]): r for r in csv.DictReader(f)}
  assert set(rows) == {("teacher", "1"), ("ddim", "1"), ("dpm_solver", "3"), ("student", "1")}
  # 100·max(cos, 0) of random-weight embeddings: finite, in [0, 100].
  for r in rows.values():
    assert 0.0 <= float(r["clip_score_mean"]) <= 100.0 and float(r["fid_mean"]) > 0, r
  cell = json.loads((report / "cells" / "student_steps1_w4_seed0.json").read_text())
  assert cell["is"] is None and cell["class_accuracy"] is None  # CLIP features: no classes
  table = (report / "table.md").read_text()
  assert "FID / CLIP score" in table and "clip-tiny" in table
  assert (report / "fid_clip_tradeoff.png").is_file()
