"""The TPU pod scripts in ``launch/`` and the GPU ones in ``launch/gpu/``, through their
``--dry-run`` output (nothing is run)."""

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


def gpu_dry_run(script, cwd=None, **env):
  result = subprocess.run(["bash", str(LAUNCH / "gpu" / f"{script}.sh"), "--dry-run"],
                          env={**os.environ, "VENV": "/opt/venv", **env}, capture_output=True,
                          text=True, timeout=60, cwd=cwd)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines)
  return [shlex.split(line[2:]) for line in lines]


def test_gpu_node_runs_distill_main_on_all_its_gpus(tmp_path):
  (cmd,) = gpu_dry_run("run_node", cwd=tmp_path, WORKDIR="runs/in", DATA_DIR="/data/tfds",
                       EXTRA_FLAGS="--config.mesh.fsdp=8 --config.stages=stage_one")
  assert cmd[:3] == ["/opt/venv/bin/python", "-m", "distill.main"]
  assert cmd[3] == f"--config={LAUNCH.parent / 'configs' / 'imagenet64.py'}"
  # The workdir as typed: distill.main resolves it against the directory the script runs in.
  assert cmd[4:] == ["--workdir=runs/in", "--config.data.data_dir=/data/tfds",
                     "--config.mesh.fsdp=8", "--config.stages=stage_one"]
  assert "--multihost" not in cmd


def test_slurm_submits_one_multihost_task_per_node():
  (cmd,) = gpu_dry_run("slurm", WORKDIR="/shared/runs/sd15", NODES="4", GPUS_PER_NODE="8",
                       PARTITION="a100", CONFIG="configs/sd15.py",
                       EXTRA_FLAGS="--config.mesh.fsdp=8")
  assert cmd[0] == "sbatch"
  flags = dict(a.split("=", 1) for a in cmd[1:] if a.startswith("--") and "=" in a)
  assert (flags["--nodes"], flags["--ntasks-per-node"], flags["--gpus-per-node"]) == (
      "4", "1", "8")
  assert flags["--partition"] == "a100" and flags["--signal"] == "TERM@120"
  assert "--requeue" in cmd and "--account" not in flags
  wrapped = shlex.split(flags["--wrap"])
  assert wrapped[:5] == ["srun", "/opt/venv/bin/python", "-m", "distill.main", "--multihost"]
  assert wrapped[5:] == ["--config=configs/sd15.py", "--workdir=/shared/runs/sd15",
                         "--config.mesh.fsdp=8"]


def test_gpu_setup_installs_the_cuda_extra_and_the_runs_need_a_workdir(tmp_path):
  commands = gpu_dry_run("setup", VENV=str(tmp_path / "venv"))
  assert commands[0] == ["python3", "-m", "venv", str(tmp_path / "venv")]
  assert commands[2][-1] == f"{LAUNCH.parent}[cuda]"
  for script in ("run_node", "slurm"):
    result = subprocess.run(["bash", str(LAUNCH / "gpu" / f"{script}.sh"), "--dry-run"],
                            env={k: v for k, v in os.environ.items() if k != "WORKDIR"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == ("WORKDIR is not set: export WORKDIR=/shared/path/... "
                                     "(see launch/README.md)")


def test_the_cuda_extra_pins_jax_to_the_tested_range():
  setup = (LAUNCH.parent / "setup.py").read_text()
  tested = next(line for line in setup.splitlines() if '"jax>=' in line).strip().strip(",")
  cuda = next(line for line in setup.splitlines() if '"cuda":' in line)
  assert tested.replace('"jax', '"jax[cuda12]') in cuda
