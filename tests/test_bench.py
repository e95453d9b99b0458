"""The bench scripts in their ``--quick`` mode, so that they cannot rot.

No timing is asserted: only what the scripts compute besides time (FLOP counts, parameter
counts, the pipeline's cost arithmetic) is checked, against independent counts.
"""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def _script(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("warmup", ["call", "compile"])
def test_sampling_quick(capsys, warmup):
  results = _script("sampling").main(["--quick", "--models=digits", f"--warmup={warmup}"])
  (res,) = results
  assert {(r["sampler"], r["steps"]) for r in res["samplers"]} == {
      (s, n) for s in ("deterministic", "stochastic") for n in (1, 4)}
  for r in res["samplers"]:
    assert r["median_s"] > 0 and math.isclose(
        r["ratio"], r["median_s"] / (r["steps"] * r["forward_s"]))
    assert ("compile_s" in r) == (warmup == "compile")
    assert r["runs"] == 2  # quick: --runs=2
  assert res["speedup"]["evaluation_ratio"] == 2 * 4 / 4  # quick: teacher 2×4 vs student 4
  assert "| digits |" in capsys.readouterr().out


def test_train_step_quick(capsys):
  result = _script("train_step").main(["--quick"])
  by_name = {r["what"]: r for r in result["stages"] + result["breakdown"]}
  teacher, one, two = by_name["teacher"]["flops"], by_name["stage_one"]["flops"], \
      by_name["stage_two"]["flops"]
  # A forward pass is about a third of forward + backward, so a stage step (student forward and
  # backward plus teacher forwards at batch 2B) costs about 1 + 2/3 teacher steps in FLOPs.
  forward = by_name["U-Net forward only"]["flops"]
  grad = by_name["teacher loss + gradient (no optimiser, EMA, guard)"]["flops"]
  assert 0.25 < forward / grad < 0.45
  for stage in (one, two):
    assert 1.4 < stage / teacher < 1.9
  assert by_name["teacher step without attention blocks"]["flops"] < teacher
  assert result["matmul_peak"]["gflops"] > 0
  assert "of matmul peak" in capsys.readouterr().out


def test_scale_plan_quick(capsys):
  from distill import pipeline  # pylint: disable=import-outside-toplevel
  from distill.config_utils import load_config  # pylint: disable=import-outside-toplevel
  result = _script("scale_plan").main(["--quick"])
  config = load_config("imagenet64:runlocal")
  halvings = pipeline.halvings(config)
  assert result["halvings"] == halvings == [4, 2, 1]
  one, two = result["flops"]["stage_one"]["flops"], result["flops"]["stage_two"]["flops"]
  assert 0.8 < one / two < 1.25  # both: student forward + backward, teacher forwards at 2B
  expected = config.stage_one.num_train_steps * one + sum(
      pipeline.halving_section(config, n).num_train_steps for n in halvings) * two
  assert math.isclose(result["total_flops"], expected)
  assert math.isclose(result["chip_hours"]["TPU v5e"],
                      expected / (197e12 * result["utilisation"]) / 3600)
  mem = result["memory"]
  assert mem["argument_bytes"] >= mem["state_bytes"] + mem["teacher_bytes"]
  assert "chip-hours" in capsys.readouterr().out


def test_peer_pytorch_quick(capsys):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  (r,) = _script("peer_pytorch").main(["--quick", "--models=digits"])
  assert abs(r["params_ours"] - r["params_theirs"]) <= 0.1 * r["params_theirs"]
  assert r["forward_ours_s"] > 0 and r["train_theirs_s"] > 0
  assert "| digits |" in capsys.readouterr().out


def test_conv_kernels_quick(capsys):
  """Both frameworks run the same convolution (outputs agree), so the timing compares like
  with like."""
  pytest.importorskip("torch")
  (r,) = _script("conv_kernels").main(["--quick"])
  assert r["max_abs_diff"] < 1e-4
  assert r["forward_xla_s"] > 0 and r["fwd_bwd_torch_s"] > 0
  assert "| tiny |" in capsys.readouterr().out


def test_stage_one_fid_on_the_tiny_pipeline(tiny_pipeline, capsys):
  rows = _script("stage_one_fid").main([f"--workdir={tiny_pipeline}", "--config=digits:runlocal",
                                        "--w=0,1", "--sampling_steps=2", "--teacher"])
  steps = sorted(int(p.name) for p in (tiny_pipeline / "stage_one" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert [(r["step"], r["w"]) for r in rows] == [
      (s, w) for s in steps + ["teacher"] for w in (0.0, 1.0)]
  assert all(np.isfinite(r["fid"]) and r["fid"] >= 0 for r in rows)
  assert "digits-FID" in capsys.readouterr().out


def test_stage_memory_quick(capsys):
  results = _script("stage_memory").main(["--quick"])
  assert [r["stage"] for r in results] == ["teacher", "stage_one", "stage_two", "eval"]
  assert all(0.1 < r["peak_rss_gib"] < 24 for r in results)  # a real process's RSS, in GiB
  assert "peak RSS" in capsys.readouterr().out


def test_latent_memory_quick(capsys):
  """The SD state arithmetic from the published parameter counts, and one compiled analysis."""
  result = _script("latent_memory").main(["--quick"])
  assert round(result["text_params"] / 1e6, 1) == 123.1
  assert round(result["vae_params"] / 1e6, 1) == 83.7
  n = result["unet_params"]
  assert result["state_bytes"] == (4 + 4 + 8 + 4 + 2) * n
  (row,) = result["rows"]
  assert row["temp_bytes"] > 0 and row["total_bytes"] == result["state_bytes"] + row["temp_bytes"]
  assert "| **total** |" in capsys.readouterr().out


def test_xla_cpu_flags_quick(capsys):
  (res,) = _script("xla_cpu_flags").main(["--quick", "--models=digits"])
  # The package's option reaches XLA (no YNNPACK fusion left) and XLA's default path uses them.
  assert res["ynn_fusions"] == {"package options": 0, "XLA defaults": res["ynn_fusions"]["XLA defaults"]}
  assert res["ynn_fusions"]["XLA defaults"] > 0
  # It changes how XLA compiles, not what it computes.
  assert res["forward_max_abs_diff"] < 1e-5 and res["grad_rel_diff"] < 1e-4
  assert "| digits | 8 | forward |" in capsys.readouterr().out


def test_step_profile_quick(capsys):
  res = _script("step_profile").main(["--quick", "--model=digits"])
  assert set(res["gradient_s"]) == {"ours", "flax"} and min(res["gradient_s"].values()) > 0
  ours, flax = res["profile"]["ours"], res["profile"]["flax"]
  assert ours["total_ms"] > 0 and flax["total_ms"] > 0
  # Our layers' position sums are matrix products; flax's gradients issue reductions of the
  # biases instead. The profile attributes thunks to the layers that issued them.
  assert any("backward" in k and "conv_in" in k for k in flax["sources"])
  assert ours["counts"].get("dot", 0) > flax["counts"].get("dot", 0)
  out = capsys.readouterr().out
  assert "| distill.models.layers |" in out and "Thunk time by op kind" in out
