"""The bench scripts in their ``--quick`` mode, so that they cannot rot.

No timing is asserted, and no figure is checked by recomputing the script's own formula from its
own output. What a script computes besides time (FLOP and parameter counts, memory, outputs of
two frameworks or two settings) is checked against an independent count; a script that only
times is a smoke run: it ran, and its report has the expected rows.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def _script(name):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("warmup", ["call", "compile"])
def test_sampling_quick_smoke(capsys, warmup):
  """Smoke run (the script only times): every sampler × N row ran twice with the warm-up asked
  for, and the report lists them; the student's parameter count is the exact one."""
  results = _script("sampling").main(["--quick", "--models=digits", f"--warmup={warmup}"])
  (res,) = results
  assert res["params"] == 196_321  # the digits:runlocal student (tests/test_unet.py)
  rows = [(r["sampler"], r["steps"]) for r in res["samplers"]]
  assert rows == [(s, n) for s in ("deterministic", "stochastic") for n in (1, 4)]
  for r in res["samplers"]:
    assert ("compile_s" in r) == (warmup == "compile")
    assert r["runs"] == 2  # quick: --runs=2
  assert res["speedup"]["teacher_runs"] == 2 and res["speedup"]["student4_runs"] == 6
  out = capsys.readouterr().out
  printed = [line for line in out.splitlines() if line.startswith("| digits |")]
  assert [line.split(" | ")[:6] for line in printed[:4]] == [
      ["| digits", "0.20 M", "8", s, str(n), "2"] for s, n in rows]
  assert len(printed) == 5 and printed[4].startswith("| digits | 8 | ")  # the speed-up row


def test_eval_metrics_quick_smoke(capsys):
  """Smoke run (the script only times; that a ``Reference`` gives the metrics computed from
  scratch is tests/test_metrics.py's check against scipy and a brute-force count)."""
  result = _script("eval_metrics").main(["--quick"])
  assert list(result["rows"]) == ["per cell from scratch", "against the reference"]
  out = capsys.readouterr().out
  assert "| 256 | 500 | against the reference |" in out
  assert "| 256 | 500 | the reference itself, once per evaluation |" in out


def test_train_step_flops_quick(capsys):
  """The stages' FLOPs against each other, from the lowered programs (``--flops_only``: the six
  compiles of the timed mode would take a minute; its timing is ``common.round_robin``, which
  the PyTorch peer's smoke run exercises)."""
  result = _script("train_step").main(["--quick", "--flops_only"])
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
  # The timed mode's peak counts 2n³ FLOPs per n×n matmul: XLA's count, the one the steps'
  # FLOPs come from.
  n = 256
  a = jax.ShapeDtypeStruct((n, n), jnp.float32)
  assert jax.jit(jnp.matmul).lower(a, a).compile().cost_analysis()["flops"] == 2 * n**3
  assert {r["batch"] for r in result["stages"]} == {16}  # one batch for every stage
  printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
  assert len(printed) == 1 + 6 and printed[1].startswith("| teacher | 16 | ")  # header, rows


def test_scale_plan_quick(capsys, monkeypatch):
  """Halvings, the FLOPs of the two stages against each other, and the memory: the hand count
  from the exact parameter count, and XLA's memory analysis of the compiled step against it.
  The slices' plan on fsdp 2 takes as arguments exactly the shards the layout rule gives each
  device (the tiny U-Net's arrays split from 2^8 elements): about half the replicated state."""
  from distill import models  # pylint: disable=import-outside-toplevel
  from distill.config_utils import load_config  # pylint: disable=import-outside-toplevel
  module = _script("scale_plan")
  monkeypatch.setattr(module.sharding, "MIN_SHARDED_SIZE", 2 ** 8)
  result = module.main(["--quick"])
  config = load_config("imagenet64:runlocal")
  assert result["halvings"] == [4, 2, 1]  # runlocal: start_num_steps 8, end 1
  one, two = result["flops"]["stage_one"]["flops"], result["flops"]["stage_two"]["flops"]
  assert 0.8 < one / two < 1.25  # both: student forward + backward, teacher forwards at 2B
  mem, n = result["memory"], 260_259  # the imagenet64:runlocal student (tests/test_unet.py)
  # params, EMA, Adam's two moments in float32; five int32 counters (step, two skip counts,
  # Adam's and the schedule's counts). The frozen teacher of stage two: float32 params.
  assert mem["state_bytes"] == 4 * 4 * n + 5 * 4
  assert mem["teacher_bytes"] == 4 * n
  image = int(np.prod(models.model_input_shape(config, mem["batch"]))) * 4
  labels, key, num_steps = mem["batch"] * 4, 8, 4
  assert mem["argument_bytes"] == (mem["state_bytes"] + mem["teacher_bytes"] + image + labels
                                   + key + num_steps)
  assert mem["alias_bytes"] == mem["state_bytes"]  # donated: the new state reuses the old
  (row,) = result["slices"]
  assert (row["fsdp"], row["batch"]) == (2, 2)
  assert row["argument_bytes"] == row["state_shard_bytes"] + row["batch_shard_bytes"] + key
  replicated = mem["state_bytes"] + mem["teacher_bytes"] + num_steps
  assert 0.5 * replicated <= row["state_shard_bytes"] < 0.6 * replicated
  assert row["batch_shard_bytes"] == image // mem["batch"] * 2 + 2 * 4  # 2 images, 2 labels
  out = capsys.readouterr().out
  assert all(f"| {chip} |" in out for chip in ("TPU v4", "TPU v5e", "H100 SXM"))
  assert "| quick | 2 | 2 |" in out


def test_peer_pytorch_quick(capsys):
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  (r,) = _script("peer_pytorch").main(["--quick", "--models=digits"])
  # The peer is the same architecture: within 0.1 % of our exact count (the script itself
  # refuses only beyond 10 %; BENCHMARKS' full-size rows agree to 0.002 %).
  assert r["params_ours"] == 191_073  # the digits:runlocal teacher (tests/test_unet.py)
  assert abs(r["params_ours"] - r["params_theirs"]) <= 1e-3 * r["params_ours"]
  assert "| digits | 4 | 0.191 M / 0.191 M |" in capsys.readouterr().out


def test_conv_kernels_quick(capsys):
  """Both frameworks run the same convolution (outputs agree), so the timing compares like
  with like."""
  pytest.importorskip("torch")
  (r,) = _script("conv_kernels").main(["--quick"])
  assert r["max_abs_diff"] < 1e-4
  assert "| tiny | 2×4×4×8 → 8 |" in capsys.readouterr().out


def test_stage_one_fid_on_the_tiny_pipeline(tiny_pipeline, capsys):
  rows = _script("stage_one_fid").main([f"--workdir={tiny_pipeline}", "--config=digits:runlocal",
                                        "--w=0,1", "--sampling_steps=2", "--teacher"])
  steps = sorted(int(p.name) for p in (tiny_pipeline / "stage_one" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert [(r["step"], r["w"]) for r in rows] == [
      (s, w) for s in steps + ["teacher"] for w in (0.0, 1.0)]
  assert all(np.isfinite(r["fid"]) and r["fid"] >= 0 for r in rows)
  assert "digits-FID" in capsys.readouterr().out


def test_stage_one_fid_on_the_emoji_run(emoji_run, capsys):
  """A smoke run on caption data: the eval stage's prompts, the evaluator CLIP's FID and a CLIP
  score in its range, for the one checkpoint asked."""
  _, workdir = emoji_run
  rows = _script("stage_one_fid").main([f"--workdir={workdir}", "--config=emoji:runlocal",
                                        "--steps=4", "--w=4", "--sampling_steps=2"])
  assert [(r["step"], r["w"]) for r in rows] == [(4, 4.0)]
  assert np.isfinite(rows[0]["fid"]) and 0 <= rows[0]["clip_score"] <= 100
  assert "| CLIP score |" in capsys.readouterr().out


def test_stage_memory_quick(capsys, tmp_path):
  """A smoke run of one stage in its own process: it left its checkpoint, and the RSS is in GiB
  (a unit slip of 2^10 would leave the range). The other stages run the same function."""
  results = _script("stage_memory").main(["--quick", f"--workdir={tmp_path}", "--stages=teacher"])
  assert [r["stage"] for r in results] == ["teacher"]
  assert (tmp_path / "teacher" / "checkpoints" / "2").is_dir()
  assert 0.1 < results[0]["peak_rss_gib"] < 24  # a real process's RSS, in GiB
  assert "peak RSS" in capsys.readouterr().out


def test_latent_memory_quick(capsys, monkeypatch):
  """The parameter counts, exactly, and the state bytes against the arrays themselves: the
  student's float32 params, gradients, Adam state (optax's own) and EMA, and the bfloat16
  teacher, as abstract shapes; one compiled memory analysis ran. The plan's compiled train step
  on fsdp 2 takes as arguments exactly the shards the layout rule gives each device (plus the
  key), about half the unsplit state (the tiny U-Net's arrays split from 2^8 elements)."""
  module = _script("latent_memory")
  monkeypatch.setattr(module.sharding, "MIN_SHARDED_SIZE", 2 ** 8)
  result = module.main(["--quick", "--plan"])
  assert result["text_params"] == 123_060_480 and result["vae_params"] == 83_653_863
  cfg = module.unet.UNetConfig.from_diffusers(module.TINY_UNET)
  params = jax.eval_shape(lambda: module.unet.UNet2DConditionModel(cfg).init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)),
      jnp.zeros((1, 77, cfg.cross_attention_dim))))["params"]
  assert result["unet_params"] == 792_964 == sum(x.size for x in jax.tree.leaves(params))
  adam = jax.eval_shape(optax.adam(1e-4).init, params)
  teacher = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating))
  assert result["state_bytes"] == 3 * nbytes(params) + nbytes(adam) + nbytes(teacher)
  (row,) = result["rows"]
  assert (row["batch"], row["remat"]) == (1, False) and row["temp_bytes"] > 0
  (step,) = result["plan"]
  assert (step["stage"], step["fsdp"], step["batch"]) == ("stage_two", 2, 1)
  key_bytes = 8  # a threefry key: two uint32
  assert step["argument_bytes"] == step["state_shard_bytes"] + step["batch_shard_bytes"] + \
      key_bytes
  # The student's state (params, EMA, Adam's two moments) and its frozen copy, unsplit.
  fam = module.latent_family.from_config(module.load_config("sd15:runlocal"), shapes_only=True)
  student = jax.eval_shape(lambda p: fam.student_from_teacher(p, None), fam.models.unet_params)
  unsplit = 5 * nbytes(student)
  assert 0.5 * unsplit <= step["state_shard_bytes"] < 0.6 * unsplit
  assert step["peak_bytes"] > step["argument_bytes"]
  out = capsys.readouterr().out
  assert "| **total** |" in out and "| stage_two | 2 | off | 1 |" in out


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
  assert set(res["gradient_s"]) == {"ours", "flax"}
  ours, flax = res["profile"]["ours"], res["profile"]["flax"]
  # Our layers' position sums are matrix products; flax's gradients issue reductions of the
  # biases instead. The profile attributes thunks to the layers that issued them.
  assert any("backward" in k and "conv_in" in k for k in flax["sources"])
  assert ours["counts"].get("dot", 0) > flax["counts"].get("dot", 0)
  out = capsys.readouterr().out
  assert "| distill.models.layers |" in out and "Thunk time by op kind" in out


def test_side_by_side_on_the_emoji_run(emoji_run, tmp_path):
  """README's text-to-image picture, on the session's emoji run: a smoke run (its rows are
  the prompts; the columns' shared noise is checked on the report's heads, test_evaluation.py)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  _, workdir = emoji_run
  out = _script("side_by_side").main([
      f"--workdir={workdir}", "--w=4", "--teacher_steps=4", "--students=1",
      "--prompt=red heart", "--prompt=rocket", f"--out={tmp_path / 'picture.png'}"])
  # Two rows and two columns of 1.6-inch panels plus the label margin, at 110 dpi.
  assert Image.open(out).size == (int(110 * 1.6 * 3), int(110 * 1.6 * 2))


def test_editing_on_the_tiny_pipeline(tiny_pipeline, tmp_path, capsys):
  """Image-to-image and inpainting measured on held-out digits: every method's rows, a 2-step
  student from strength 0.5 takes one step from t0 = 1/2 and the teacher starts there too, the
  kept region of every inpainted image is the source's exactly, and the figure has its six rows."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from distill import images  # pylint: disable=import-outside-toplevel
  results = _script("editing").main([f"--workdir={tiny_pipeline}", "--num_sources=6",
                                     "--students=2", "--teacher_steps=2", "--strength=0.6",
                                     f"--out={tmp_path}"])
  img2img, inpaint = results["img2img"], results["inpaint"]
  assert [(r["method"], r["steps"], r["t_start"]) for r in img2img] == [
      ("source (unedited)", 0, None), ("student 2", 1, 0.5), ("DDIM 2x1", 1, 0.5),
      ("teacher 2x2", 2, 0.5)]
  assert img2img[0]["rms_to_source"] == 0 and all(r["rms_to_source"] > 0 for r in img2img[1:])
  assert all(0 <= r["class_share"] <= 1 and np.isfinite(r["fid"]) for r in img2img + inpaint)
  assert [(r["method"], r["steps"]) for r in inpaint] == [
      ("student 2", 2), ("DDIM 2x2", 2), ("teacher 2x2", 2)]
  assert all(r["kept_max_change"] == 0 and r["rms_filled"] > 0 for r in inpaint)
  with Image.open(tmp_path / "editing.png") as png:
    want = images.grid(np.zeros((36, 8, 8, 1)), rows=6).shape
    assert png.size == (want[1] * 4, want[0] * 4)
  assert "Inpainting of the centre" in (tmp_path / "editing.md").read_text()
  assert "share classified as target" in capsys.readouterr().out


def test_editing_reference_decodes_the_source_latents_where_the_mask_keeps():
  """The inpainting bench's reference for a latent model (``exact_kept_latents``): the source's
  latents in every latent cell the mask keeps, the sample's own (re-encoded) in the hole's,
  which for the centre half-square are the middle cells of the grid."""
  from distill.latent import family as latent_family  # pylint: disable=import-outside-toplevel
  from distill.config_utils import load_config  # pylint: disable=import-outside-toplevel
  module = _script("editing")
  fam = latent_family.from_config(load_config("sd15:runlocal"))
  rng = np.random.default_rng(0)
  src, x = rng.uniform(-1, 1, (2, 2, *fam.image_shape)).astype(np.float32)
  mask = module._centre_mask(fam.image_shape[:2], 0.5)  # pylint: disable=protected-access
  z_src = module._batched(fam.encode_images, src)  # pylint: disable=protected-access
  z = module.exact_kept_latents(fam, x, z_src, mask)
  h = fam.x_shape[0]
  hole = np.zeros((h, h), bool)
  hole[h // 4:h - h // 4, h // 4:h - h // 4] = True
  np.testing.assert_array_equal(z[:, ~hole], z_src[:, ~hole])
  z_x = module._batched(fam.encode_images, x)  # pylint: disable=protected-access
  np.testing.assert_array_equal(z[:, hole], z_x[:, hole])
  assert not np.allclose(z[:, hole], z_src[:, hole])


def test_gpu_check_skips_without_a_gpu_and_runs_quick_here(capsys):
  """The shell wrapper exits 0 with one line on a machine without a GPU; the script itself,
  on the tiny ImageNet 64 config here (stage two only): the compiled step's arguments are the
  state, the frozen teacher and the batch, and the step and the 4-step sampler ran."""
  import subprocess  # pylint: disable=import-outside-toplevel
  skipped = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True,
                           text=True, timeout=300)
  assert skipped.returncode == 0 and skipped.stdout.startswith("gpu_check: skipped: ")
  (r,) = _script("gpu_check").main(["--quick", "--models=imagenet64", "--stages=stage_two"])
  (stage,) = r["stages"]
  assert stage["argument_bytes"] == stage["state_shard_bytes"] + stage["batch_shard_bytes"] + 8
  assert stage["median_s"] > 0 and stage["runs"] == 2 and stage["peak_bytes"] > 0
  assert r["sampler"]["batch"] == 2 and r["sampler"]["images_per_s"] > 0
  out = capsys.readouterr().out
  assert "| imagenet64 | stage_two | 2 |" in out and "| imagenet64 | 2 |" in out
