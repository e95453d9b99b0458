"""The distilled encoder (paper §4.3): DDIM encoding against the Gaussian oracle, the encoder
target's identity written out in float64, and the chain's encoder links with style transfer.

Oracles: for Gaussian data ``x ~ N(μ, s²)`` per pixel the probability-flow ODE is affine, so
encoding the data to ``t = 1`` is ``z_1 = α_1 μ + √(α_1² s² + σ_1²)·(x − μ)/s`` exactly, and the
exact ``v̂ = α ε̂ − σ x̂`` is closed-form without dividing by ``σ``.
"""

import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from distill import (config_validation, denoiser, diffusion, editing, images, layout, losses,
                     pipeline, sample, schedules)
from distill.config_utils import load_config
from test_diffusion import MU, STD
from test_diffusion import _np_alpha_sigma as _np_schedule
from test_distillation import nets  # noqa: F401  (a fixture)


def _np_alpha_sigma(t):
  """(α_t, σ_t) in float64 of the cosine schedule, σ(0) > 0 included: encoding starts from the
  data at λ_max, where the network is evaluated."""
  alpha, sigma, _ = _np_schedule(np.asarray(t, np.float64))
  return alpha[:, None, None, None], sigma[:, None, None, None]


def gaussian_v(z, t):
  """Exact ``v̂`` for x ~ N(MU, STD²): ``α ε̂ − σ x̂`` with ``ε̂ = σ (z − αμ)/(α² s² + σ²)``."""
  alpha, sigma = schedules.alpha_sigma(schedules.cosine_logsnr(t))
  alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
  var = alpha**2 * STD**2 + sigma**2
  x_hat = MU + alpha * STD**2 / var * (z - alpha * MU)
  eps_hat = sigma / var * (z - alpha * MU)
  return alpha * eps_hat - sigma * x_hat


@pytest.fixture(scope="module")
def data():
  return MU + STD * jax.random.normal(jax.random.key(3), (4000, 2, 2, 1))


def test_encode_step_is_eq2_read_upwards():
  """``ddim_encode_step`` with ``v̂`` is Eq. 2 written out in float64 from s to t > s with
  ``x̂ = α_s z − σ_s v̂``, where σ_s is large enough to divide by."""
  k1, k2 = jax.random.split(jax.random.key(0))
  z, v = jax.random.normal(k1, (5, 2, 2, 1)), jax.random.normal(k2, (5, 2, 2, 1))
  s, t = np.array([0.1, 0.2, 0.3, 0.5, 0.7]), np.array([0.15, 0.4, 0.35, 0.9, 1.0])
  got = diffusion.ddim_encode_step(z, v, schedules.cosine_logsnr(s), schedules.cosine_logsnr(t))
  (a_s, s_s), (a_t, s_t) = _np_alpha_sigma(s), _np_alpha_sigma(t)
  z64, v64 = np.asarray(z, np.float64), np.asarray(v, np.float64)
  x = a_s * z64 - s_s * v64
  np.testing.assert_allclose(got, a_t * x + s_t * (z64 - a_s * x) / s_s, atol=2e-5)


def test_many_step_encoder_follows_the_exact_flow(data):
  """Encoding Gaussian data with the exact v̂ lands on the flow's affine map, with DDIM's
  first-order error: measured in data units (the code divided by the map's slope √(α_1² s² +
  σ_1²)/s, which is 20 for the pixel with s = 0.05), below 0.01 at 1024 steps, a third of the
  error at 256, and far off at 2 steps. Decoding the code returns the data."""
  a1, s1 = (float(u) for u in schedules.alpha_sigma(schedules.cosine_logsnr(1.0)))
  slope = np.sqrt(a1**2 * STD**2 + s1**2) / STD
  exact = a1 * MU + slope * (np.asarray(data) - MU)
  encode = lambda n: jax.jit(lambda x: diffusion.encode_deterministic(gaussian_v, x, n))(data)
  errors = {n: float(np.max(np.abs(encode(n) - exact) / slope)) for n in (2, 256, 1024)}
  assert errors[1024] < 0.01 and errors[1024] < errors[256] / 3 and errors[2] > 0.1, errors
  x_hat = lambda z, t: diffusion.x_from_v(z, gaussian_v(z, t), schedules.cosine_logsnr(t))
  back = jax.jit(lambda z: diffusion.sample_deterministic(x_hat, z, 1024))(encode(1024))
  np.testing.assert_allclose(back, data, atol=0.02)


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_one_encoder_step_lands_on_two_teacher_steps(nets, n):  # noqa: F811
  """The defining identity of ṽ: one student encoding step s → e from ``z_s`` with ṽ lands on
  the teacher's two steps s → s' → e, each written out in float64 as Eq. 2 from
  ``x̂ = α z − σ v̂`` and ``ε̂ = σ z + α v̂`` (so the data, σ_s = 0, needs no division). Start
  times cover the data (i = 0) and the last step (i = N − 1, e = 1)."""
  w = jnp.array([0.0, 0.5, 1.0, 2.0, 3.0, 4.0])
  fn = denoiser.v_fn(nets["family"], nets["s_params"], nets["batch"]["label"], w,
                     net=nets["student"])
  i = np.array([0, n - 1, n // 2, 0, n - 1, max(n - 2, 0)])
  s = i / n
  z = nets["z"]
  v_target = np.asarray(losses.encoder_target(fn, z, jnp.asarray(s, jnp.float32), n), np.float64)

  def step(z, v, s, t):
    (a_s, s_s), (a_t, s_t) = _np_alpha_sigma(s), _np_alpha_sigma(t)
    return a_t * (a_s * z - s_s * v) + s_t * (s_s * z + a_s * v)

  s_mid, s_end = s + 0.5 / n, s + 1.0 / n
  z64 = np.asarray(z, np.float64)
  z_mid = step(z64, np.asarray(fn(z, jnp.asarray(s, jnp.float32)), np.float64), s, s_mid)
  v_mid = np.asarray(fn(jnp.asarray(z_mid, jnp.float32), jnp.asarray(s_mid, jnp.float32)),
                     np.float64)
  z_end = step(z_mid, v_mid, s_mid, s_end)
  np.testing.assert_allclose(step(z64, v_target, s, s_end), z_end, atol=3e-5, rtol=1e-5)
  # Not a fixed point: the target differs from the teacher's own v̂ at s.
  v_s = np.asarray(fn(z, jnp.asarray(s, jnp.float32)), np.float64)
  assert np.all(np.abs(v_target - v_s).reshape(len(s), -1).max(axis=1) > 1e-2)


def test_encoder_target_with_the_exact_flow_is_the_flow(data):
  """With the exact v̂ of Gaussian data and N = 1, ṽ makes one step from the data land on the
  teacher's 2-step encoding, which ``encode_deterministic(…, 2)`` computes independently."""
  s = jnp.zeros((data.shape[0],))
  v = losses.encoder_target(gaussian_v, data, s, 1)
  lam0, lam1 = schedules.cosine_logsnr(0.0), schedules.cosine_logsnr(1.0)
  one_step = diffusion.ddim_encode_step(data, v, lam0, lam1)
  np.testing.assert_allclose(one_step, diffusion.encode_deterministic(gaussian_v, data, 2),
                             atol=1e-5)


def test_weighted_v_loss_is_the_weighted_x_loss():
  """``max(α², σ²)‖Δv‖² = max(exp λ, 1)‖Δx‖²`` for x-predictions made at the same z."""
  k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
  z, v1, v2 = (jax.random.normal(k, (4, 2, 2, 1)) for k in (k1, k2, k3))
  lam = jnp.array([-6.0, -0.5, 0.5, 6.0])
  x1, x2 = diffusion.x_from_v(z, v1, lam), diffusion.x_from_v(z, v2, lam)
  np.testing.assert_allclose(losses.weighted_v_loss(v1, v2, lam),
                             losses.weighted_x_loss(x1, x2, lam), rtol=1e-4)


@pytest.fixture(scope="module")
def encoder_run(tiny_pipeline, tmp_path_factory):
  """``(config, workdir)``: a copy of the tiny pipeline's workdir, made to look started before
  configs had an encoder section (none in its manifest nor in its checkpoints' configs), with
  ``--config.stages=encoder`` run on it: encoders of 2 and 1 steps from stage one."""
  workdir = tmp_path_factory.mktemp("encoder_run") / "run"
  shutil.copytree(tiny_pipeline, workdir)
  manifest = json.loads((workdir / "manifest.json").read_text())
  del manifest["config"]["encoder"]
  manifest["config_hash"] = "0" * 16
  (workdir / "manifest.json").write_text(json.dumps(manifest))
  for saved in workdir.glob("**/checkpoints/*/config/metadata"):
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items()
                                 if k != "encoder"}))
  config = load_config("digits:runlocal")
  config.num_devices = 1  # one device compiles faster; the sharded loop is tested elsewhere
  config.stages = "encoder"
  pipeline.run(config, workdir)
  return config, workdir


def _params(config, workdir, name):
  link = next(link for link in layout.chain(config) if link.name == name)
  return jax.device_get(layout.read_final_params(config, workdir, link, pipeline.make_mesh(config)))


def test_encoder_links_learn_from_stage_one(encoder_run, caplog):
  """The first encoder starts from, and learns from, stage one (not the last halving); the next
  from it. Each trained (its parameters moved); the manifest adopted the new section, records
  both links and refuses a later change to it; a rerun trains nothing."""
  config, workdir = encoder_run
  links = layout.chain(config)
  assert [(link.name, layout.teacher_of(links, link)) for link in links if
          link.stage == "encoder"] == [("encoder/N=2", "stage_one"), ("encoder/N=1", "encoder/N=2")]
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert {"encoder/N=2", "encoder/N=1"} <= set(manifest["stages"])
  # The run's config as sampling reads it: the encoder section from the encoders' checkpoints.
  assert "encoder" not in layout._saved_config(workdir / "teacher")  # pylint: disable=protected-access
  assert layout.workdir_config(workdir).encoder.start_num_steps == 4
  assert manifest["config"]["encoder"]["start_num_steps"] == 4
  one, two, first = (_params(config, workdir, name)
                     for name in ("stage_one", "encoder/N=2", "encoder/N=1"))
  moved = lambda a, b: max(float(np.abs(x - y).max()) for x, y in
                           zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert jax.tree.structure(one) == jax.tree.structure(two)
  assert 0 < moved(one, two) < 0.1 and 0 < moved(two, first) < 0.1
  with caplog.at_level(logging.INFO):
    pipeline.run(config, workdir)
  assert "encoder/N=1 (link 2/2): complete" in caplog.text
  changed = ml_collections.ConfigDict(config.to_dict())
  changed.encoder.lr = 0.5
  with pytest.raises(ValueError, match=r"encoder\.lr: 0\.0002 -> 0\.5"):
    pipeline.run(changed, workdir)


def test_style_transfer_is_the_encoder_then_the_student(encoder_run, tmp_path):
  """``generate`` with ``source_labels`` equals DDIM encoding by the 2-step encoder under the
  source's class, then the 2-step student's DDIM under the target class, written with the
  samplers directly; the CLI writes the same images. (Every call has 6 examples: one compile.)"""
  _, workdir = encoder_run
  student = sample.load_model(workdir, "student", num_steps=2)
  encoder = sample.load_model(workdir, sample.ENCODER, num_steps=2)
  digits = load_digits()
  source = (digits.images[:6] / 8.0 - 1.0)[..., None].astype(np.float32)
  a_labels, b_labels = digits.target[:6], (digits.target[:6] + 1) % 10
  w = np.linspace(0.0, 4.0, 6).astype(np.float32)
  got = sample.generate(student, sampler="deterministic", num_steps=2, labels=b_labels, w=w,
                        seed=0, source=source, source_labels=a_labels, encoder=encoder)
  fam = student.family

  @jax.jit
  def by_hand(source, a, b, w):
    z1 = diffusion.encode_deterministic(
        denoiser.v_fn(fam, encoder.params, fam.cond_from_labels(a), w), source, 2)
    return diffusion.sample_deterministic(
        denoiser.denoise_fn(fam, student.params, fam.cond_from_labels(b), w), z1, 2)

  np.testing.assert_allclose(got, by_hand(source, a_labels, b_labels, w), atol=1e-5)
  assert np.abs(got - source).max() > 0.1
  # The CLI: one source for every example of the grid, decoded under --labels.
  Image.fromarray((digits.images[0] * 255 / 16).astype(np.uint8)).save(tmp_path / "zero.png")
  sample.main([f"--workdir={workdir}", "--num_steps=2", f"--init_image={tmp_path / 'zero.png'}",
               "--source_label=0", "--labels=1,2", "--per_row=6", "--w=1", f"--out={tmp_path}"])
  with np.load(tmp_path / "student2_deterministic_2steps_transfer0_seed0.npz") as f:
    cli = f["images"]
    assert list(f["source_labels"]) == [0] * 6 and list(f["labels"]) == [1, 2] * 3
  png = editing.read_image(tmp_path / "zero.png", size=(8, 8), channels=1)  # 8-bit levels
  want = sample.generate(student, sampler="deterministic", num_steps=2, labels=[1, 2] * 3,
                         w=1.0, seed=0, source=png, source_labels=[0] * 6, encoder=encoder)
  np.testing.assert_allclose(cli, want, atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--num_steps=4", "--source_label=0"],
     r"no distilled encoder with num_steps=4 .* available \[1, 2\] \(pass --num_steps=one of "
     r"them, or train it: --config.stages=encoder of distill.main\)"),
    (["--num_steps=2", "--source_label=0", "--strength=0.5"], "drop --mask and --strength"),
    (["--num_steps=2", "--source_label=12"], "--source_label=12 is not a class"),
])
def test_style_transfer_errors_are_one_line(encoder_run, tmp_path, args, message):
  _, workdir = encoder_run
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
  with pytest.raises(SystemExit, match=message) as info:
    sample.main([f"--workdir={workdir}", f"--init_image={tmp_path / 'black.png'}", *args])
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("override,message", [
    (dict(start_num_steps=0), "stages names encoder, but encoder.start_num_steps=0"),
    (dict(start_num_steps=6), r"encoder.start_num_steps=6 is not end_num_steps=1 times a power"),
    (dict(sample_every=5), "encoder.sample_every=5: encoders draw no progress grids"),
])
def test_encoder_config_errors(tmp_path, override, message):
  config = load_config("digits:runlocal")
  config.stages = "encoder"
  config.encoder.update(override)
  with pytest.raises(ValueError, match=message) as info:
    config_validation.validate(config, tmp_path, num_devices=1)
  assert "\n" not in str(info.value)


def test_style_transfer_bench_on_the_encoder_run(encoder_run, tmp_path):
  """bench/style_transfer.py: every method's row with its network evaluations, scores in range,
  and the figure's rows (the sources, the distilled pair, the teacher's DDIM pair)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  _, workdir = encoder_run
  path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "style_transfer.py"
  spec = importlib.util.spec_from_file_location("style_transfer_bench", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  rows = bench.main([f"--workdir={workdir}", "--steps=2", "--ddim_steps=2", "--num_sources=6",
                     "--w=1", f"--out={tmp_path}"])["rows"]
  assert [(r["method"], r["evaluations"]) for r in rows] == [
      ("distilled 2 + 2", 4), ("DDIM 2 + 2, teacher", 8), ("DDIM 2 + 2, stage one", 4)]
  assert all(0 <= r["score"] <= 1 and np.isfinite(r["fid"]) and r["rms_to_source"] > 0 and
             r["reconstruction_rms"] > 0 for r in rows)
  with Image.open(tmp_path / "style_transfer.png") as png:
    assert png.size[1] == images.grid(np.zeros((30, 8, 8, 1)), rows=3).shape[0] * 4
