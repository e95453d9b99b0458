"""The TPU pod scripts in ``launch/``, through their ``--dry-run`` output (nothing is run)."""

import os
import pathlib
import shlex
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
ENV = {"TPU_NAME": "test-slice", "ZONE": "europe-west4-b", "ACCELERATOR": "v4-32",
       "WORKDIR": "gs://bucket/runs/imagenet64", "DATA_DIR": "gs://bucket/tfds"}


def dry_run(script, **env):
  result = subprocess.run(["bash", str(LAUNCH / f"{script}.sh"), "--dry-run"],
                          env=dict(os.environ, **ENV, **env), capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  lines = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
  assert lines and len(lines) == len(result.stdout.splitlines())
  return [shlex.split(line) for line in lines]


def gcloud(commands):
  return [c for c in commands if c[0] == "gcloud"]


@pytest.mark.parametrize("script", ["create", "setup", "run", "logs", "delete"])
def test_every_command_names_the_same_slice_and_zone(script):
  commands = gcloud(dry_run(script))
  assert commands
  for c in commands:
    assert c[:3] == ["gcloud", "compute", "tpus"] and "--zone=europe-west4-b" in c
    assert any(arg == "test-slice" or arg.startswith("test-slice:") for arg in c), c
    if c[4] in ("ssh", "scp") and script != "logs":
      assert "--worker=all" in c, c


def test_create_names_accelerator_runtime_and_spot():
  (c,) = dry_run("create", SPOT="1", RUNTIME="tpu-ubuntu2204-base")
  assert c[3:5] == ["tpu-vm", "create"]
  assert {"--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"} <= set(c)


def test_setup_is_idempotent_and_installs_jax_tpu():
  *_, ssh = dry_run("setup", REPO_URL="https://example.org/distill.git", REF="v1")
  command = ssh[-1].split("=", 1)[1]
  assert "if [ -d ~/distill/.git ]; then git -C ~/distill fetch" in command
  assert "checkout --quiet --force v1" in command
  assert "[ -x ~/distill-venv/bin/python ] || python3 -m venv ~/distill-venv" in command
  assert "'jax[tpu]>=0.10.0,<0.11' -e ~/distill" in command
  copy = dry_run("setup")  # no REPO_URL: this checkout is archived and copied to every worker
  assert copy[0][:2] == ["git", "-C"] and "archive" in copy[0]
  assert copy[1][4] == "scp" and "--worker=all" in copy[1]


def test_run_starts_distill_main_multihost_on_every_worker():
  (ssh,) = dry_run("run", EXTRA_FLAGS="--config.stages=stage_one,stage_two")
  command = ssh[-1].split("=", 1)[1]
  assert "DISTILL_MULTIHOST=1" in command and "-m distill.main" in command
  assert "--config=configs/imagenet64.py --workdir=gs://bucket/runs/imagenet64" in command
  assert "--config.data.data_dir=gs://bucket/tfds --config.stages=stage_one,stage_two" in command


def test_run_without_workdir_says_what_to_set():
  result = subprocess.run(["bash", str(LAUNCH / "run.sh"), "--dry-run"],
                          env=dict(os.environ, **dict(ENV, WORKDIR="")), capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 2 and "WORKDIR is not set" in result.stderr
