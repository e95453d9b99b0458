"""The sampling CLI and its library functions on the tiny pipeline's workdir."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import family, sample, sharding
from distill.config_utils import load_config


def test_cli_writes_grid_and_npz(tiny_pipeline, tmp_path):
  sample.main([f"--workdir={tiny_pipeline}", "--model=student", "--num_steps=2",
               "--sampler=stochastic", "--w=0,2", "--per_row=3", f"--out={tmp_path}"])
  data = np.load(tmp_path / "student2_stochastic_4steps_seed0.npz")
  assert data["images"].shape == (6, 8, 8, 1)
  np.testing.assert_array_equal(data["w"], [0, 0, 0, 2, 2, 2])
  np.testing.assert_array_equal(data["labels"], [0, 1, 2, 0, 1, 2])
  assert (tmp_path / "student2_stochastic_4steps_seed0.png").is_file()


def test_sampling_and_evaluation_do_not_import_tensorflow():
  """clu's metric writers import TensorFlow (about 4 s of every start-up): only a process that
  trains imports them, not one that samples or evaluates."""
  code = ("import sys; import distill.main, distill.pipeline, distill.sample, "
          "distill.evaluation.evaluate; print(sorted(m for m in sys.modules "
          "if m.split('.')[0] in ('tensorflow', 'clu')))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=True)
  assert result.stdout.strip() == "[]", result.stdout[:500]


def test_samples_do_not_depend_on_batching(tiny_pipeline):
  loaded = sample.load_model(tiny_pipeline, "teacher")
  labels, w = np.arange(7) % 10, np.linspace(0, 3, 7)
  a = sample.generate(loaded, sampler="deterministic", num_steps=3, labels=labels, w=w, seed=5,
                      batch_size=7)
  b = sample.generate(loaded, sampler="deterministic", num_steps=3, labels=labels, w=w, seed=5,
                      batch_size=3)
  np.testing.assert_allclose(a, b, atol=1e-5)
  c = sample.generate(loaded, sampler="deterministic", num_steps=3, labels=labels, w=w, seed=6,
                      batch_size=7)
  assert not np.allclose(a, c)
  # DPM-Solver++ (2M) takes its first and last steps at first order: at 2 steps it is DDIM; at 3
  # its middle step is second order.
  dpm = lambda n: sample.generate(loaded, sampler="dpm_solver", num_steps=n, labels=labels, w=w,
                                  seed=5, batch_size=7)
  ddim2 = sample.generate(loaded, sampler="deterministic", num_steps=2, labels=labels, w=w,
                          seed=5, batch_size=7)
  np.testing.assert_allclose(dpm(2), ddim2, atol=1e-5)
  assert np.abs(dpm(3) - a).max() > 1e-3


@pytest.mark.parametrize("args,message", [
    (["--model=student", "--num_steps=3"], "no stage-two student with num_steps=3 .* available "
                                           r"\[1, 2, 4\]"),
    (["--model=teacher"], "--num_steps is required for model=teacher"),
    (["--num_steps=2", "--sampler=dpm_solver"], "--sampler=dpm_solver solves the teacher's"),
    (["--labels=12", "--num_steps=1"], r"--labels \[12\] are outside \[0, 10\)"),
])
def test_cli_errors_are_one_line(tiny_pipeline, args, message, capsys):
  with pytest.raises(SystemExit, match=message) as info:
    sample.main([f"--workdir={tiny_pipeline}", *args])
  assert "\n" not in str(info.value)


def test_empty_workdir_and_w_outside_range(tmp_path, tiny_pipeline, caplog):
  with pytest.raises(SystemExit, match="holds no trained stage"):
    sample.main([f"--workdir={tmp_path}"])
  sample.main([f"--workdir={tiny_pipeline}", "--num_steps=1", "--w=9", "--per_row=1",
               f"--out={tmp_path}"])
  assert "outside the trained range [0.0, 4.0]" in caplog.text


def test_samples_split_over_devices_match_one_device(tiny_pipeline):
  """``generate`` splits each batch over the model's mesh (the eval stage uses the run's): the
  suite's eight devices give the samples of one, to float32 rounding. A batch of 12 is padded to
  16; the stochastic sampler's re-noising is drawn for the whole batch, so it compares batches of
  one shape (16)."""
  mesh = sharding.make_mesh(8)
  labels, w = np.arange(20) % 10, np.linspace(0, 4, 20)
  for kind, steps, sampler, batch in (("teacher", 3, "deterministic", 12),
                                      ("student", 2, "stochastic", 16)):
    one = sample.load_model(tiny_pipeline, kind, num_steps=steps if kind == "student" else None)
    eight = sample.load_model(tiny_pipeline, kind, num_steps=one.num_steps, mesh=mesh)
    args = dict(sampler=sampler, num_steps=steps, labels=labels, w=w, seed=3, batch_size=batch)
    a, b = sample.generate(one, **args), sample.generate(eight, **args)
    assert a.shape == b.shape == (20, 8, 8, 1)
    np.testing.assert_allclose(b, a, atol=1e-5, err_msg=f"{kind} {sampler}")


def test_sampler_on_eight_cpu_devices_matches_one():
  """This process has eight CPU devices and the options the package chose for them at import
  (XLA's YNNPACK fusions on): a 12-step guided sampler over the eight, 100 samples each, gives
  one device's samples. With the package's one-device option instead, the first four samples of
  each device's shard came out wrong here, by up to 0.14 (distill/xla_cpu.py;
  tests/test_xla_cpu.py checks that ``split_host`` chooses the same way). One device computes
  only the first eight and the last four samples of each shard: each sample depends on its own
  noise, label and w alone."""
  from distill import family  # pylint: disable=import-outside-toplevel
  from distill.config_utils import load_config  # pylint: disable=import-outside-toplevel
  config = load_config("digits:runlocal")
  fam = family.of(config)
  # A teacher whose every parameter is non-zero (a fresh one has zero output layers).
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape),
                        fam.init_teacher(jax.random.key(0)))
  z = np.asarray(jax.random.normal(jax.random.key(1), (800,) + fam.x_shape))
  labels, w = np.arange(800) % 10, np.full(800, 1.0, np.float32)
  rows = np.concatenate([np.r_[s:s + 8, s + 96:s + 100] for s in range(0, 800, 100)])
  out = []
  for n, idx in ((8, np.arange(800)), (1, rows)):
    mesh = sharding.make_mesh(n)
    loaded = sample.LoadedModel("teacher", fam, sharding.replicate(mesh, params), config, None,
                                mesh)
    inputs = jax.device_put((z[idx], fam.cond_from_labels(labels[idx]), w[idx]),
                            sharding.batch_sharded(mesh))
    out.append(np.asarray(sample.make_sampler(loaded, "deterministic", 12)(
        *inputs, jax.random.key(2))))
  np.testing.assert_allclose(out[0][rows], out[1], atol=1e-4)


def _digit_files(directory):
  """A digit from the embedded data set as a 32 x 32 PNG (the model's 8 x 8 after resizing), and
  a mask that fills its right half."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digit = load_digits().images[3]  # a "3", values 0..16
  Image.fromarray((digit * 255 / 16).astype(np.uint8)).resize((32, 32), Image.NEAREST).save(
      directory / "digit.png")
  mask = np.zeros((32, 32), np.uint8)
  mask[:, 16:] = 255
  Image.fromarray(mask).save(directory / "mask.png")


def test_img2img_is_the_sampler_from_the_noised_source(tiny_pipeline, tmp_path, monkeypatch):
  """Through the CLI, with paths relative to the working directory: a 4-step student at strength
  0.75 takes 3 of its steps from the source noised to t0 = 3/4 with the noise of each example's
  seed; the same computed here from the library's parts gives the same edits."""
  from distill import denoiser, diffusion, editing  # pylint: disable=import-outside-toplevel
  _digit_files(tmp_path)
  monkeypatch.chdir(tmp_path)
  sample._main([f"--workdir={tiny_pipeline}", "--model=student", "--num_steps=4",  # pylint: disable=protected-access
                "--init_image=digit.png", "--strength=0.75", "--labels=3", "--w=0,2",
                "--per_row=2", "--out=edits"])
  name = "student4_deterministic_3steps_img2img0.75_seed0"
  with np.load(tmp_path / "edits" / f"{name}.npz") as f:
    got, source = f["images"], f["source"]
  assert got.shape == (4, 8, 8, 1) and source.shape == (8, 8, 1)
  assert (tmp_path / "edits" / f"{name}.png").is_file()

  loaded = sample.load_model(tiny_pipeline, "student", num_steps=4)
  fam = loaded.family
  eps = np.stack([jax.random.normal(jax.random.fold_in(jax.random.key(0), j), fam.x_shape)
                  for j in range(4)])
  fn = denoiser.denoise_fn(fam, loaded.params, fam.cond_from_labels([3] * 4),
                           jnp.asarray([0.0, 0.0, 2.0, 2.0]))
  z = diffusion.diffuse(source[None], eps, fam.logsnr_fn(0.75))
  want = jax.jit(lambda z: diffusion.sample_deterministic(fn, z, 3, t_start=0.75,
                                                          logsnr_fn=fam.logsnr_fn))(z)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # A gentle edit stays near the source, a strong one moves away from it.
  near = sample.generate(loaded, sampler="deterministic", num_steps=4, labels=[3], w=[0.0],
                         seed=0, source=source, strength=0.25)
  far = sample.generate(loaded, sampler="deterministic", num_steps=4, labels=[3], w=[0.0],
                        seed=0, source=source, strength=1.0)
  assert np.abs(near - source).mean() < 0.5 * np.abs(far - source).mean()
  assert editing.start_on_grid(0.25, 4) == (1, 0.25)


def test_inpainting_keeps_the_source_outside_the_mask(tiny_pipeline, tmp_path):
  _digit_files(tmp_path)
  sample._main([f"--workdir={tiny_pipeline}", "--model=student", "--num_steps=2",  # pylint: disable=protected-access
                f"--init_image={tmp_path / 'digit.png'}", f"--mask={tmp_path / 'mask.png'}",
                "--labels=3,5", "--w=1", f"--out={tmp_path / 'out'}"])
  with np.load(tmp_path / "out" / "student2_deterministic_2steps_inpaint1_seed0.npz") as f:
    got, source, mask = f["images"], f["source"], f["mask"]
  np.testing.assert_array_equal(mask, np.repeat([[0] * 4 + [1] * 4], 8, axis=0))
  np.testing.assert_array_equal(got[:, :, :4], np.broadcast_to(source[:, :4], got[:, :, :4].shape))
  assert np.abs(got[:, :, 4:] - source[:, 4:]).max() > 0.1  # the filled half is new
  # The first example from the library's parts: the known half put back after every step.
  from distill import denoiser, diffusion, editing  # pylint: disable=import-outside-toplevel
  student = sample.load_model(tiny_pipeline, "student", num_steps=2)
  fam = student.family
  eps = jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), (1,) + fam.x_shape)
  keep = editing.keep_at(mask[None], eps.shape)
  fn = denoiser.denoise_fn(fam, student.params, fam.cond_from_labels([3]), jnp.ones((1,)))
  want = diffusion.sample_deterministic(
      fn, diffusion.diffuse(source[None], eps, fam.logsnr_fn(1.0)), 2, logsnr_fn=fam.logsnr_fn,
      known_fn=editing.known_region(source[None], keep, eps))
  np.testing.assert_allclose(got[:1], want, atol=2e-5)
  # The teacher with DPM-Solver++ inpaints too.
  loaded = sample.load_model(tiny_pipeline, "teacher")
  x = sample.generate(loaded, sampler="dpm_solver", num_steps=3, labels=[3], w=[1.0], seed=0,
                      source=source, fill_mask=mask)
  np.testing.assert_array_equal(x[0, :, :4], source[:, :4])


@pytest.mark.parametrize("args,message", [
    (["--mask=m.png"], "--mask, --strength and --source_label/--source_prompt edit an image: "
                       "pass --init_image"),
    (["--init_image=missing.png"], "missing.png: no such image file"),
    (["--init_image=digit.png", "--strength=1.5"], r"strength=1\.5 must be in \(0, 1\]"),
])
def test_editing_errors_are_one_line(tiny_pipeline, tmp_path, monkeypatch, args, message):
  _digit_files(tmp_path)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit, match=message) as info:
    sample.main([f"--workdir={tiny_pipeline}", "--num_steps=1", *args])
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("args", [["--init_image=nope.png"],
                                  ["--init_image=digit.png", "--mask=nope.png"]])
def test_a_missing_image_is_refused_before_the_model_is_read(tmp_path, monkeypatch, args):
  def read(*unused_args, **unused_kwargs):
    raise AssertionError("the model was read before the image files were checked")

  _digit_files(tmp_path)
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sample, "load_model", read)
  with pytest.raises(SystemExit, match=r"^error: nope\.png: no such image file\.$"):
    sample.main([f"--workdir={tmp_path}", *args])


def test_an_exported_pixel_student_samples_as_in_its_workdir(tiny_pipeline, tmp_path):
  """distill.export writes a pixel student's Flax parameters, config and distill.json;
  distill.sample --pretrained draws the workdir's samples from it, bit for bit."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from distill import export  # pylint: disable=import-outside-toplevel
  export.main([f"--workdir={tiny_pipeline}", "--model=student", "--num_steps=2",
               f"--out={tmp_path / 'student2'}"])
  info = json.loads((tmp_path / "student2" / "distill.json").read_text())
  assert (info["family"], info["model"], info["num_steps"]) == ("pixel", "student", 2)
  assert info["t_grid"] == [1.0, 0.5] and (info["w_min"], info["w_max"]) == (0.0, 4.0)
  loaded = sample.load_model(tiny_pipeline, "student", num_steps=2)
  flat = load_file(str(tmp_path / "student2" / export.PIXEL_FILE))
  assert len(flat) == len(jax.tree.leaves(loaded.params))
  sample.main([f"--pretrained={tmp_path / 'student2'}", "--w=0,2", "--per_row=3",
               f"--out={tmp_path / 'a'}"])
  sample.main([f"--workdir={tiny_pipeline}", "--model=student", "--num_steps=2", "--w=0,2",
               "--per_row=3", f"--out={tmp_path / 'b'}"])
  name = "student2_deterministic_2steps_seed0.npz"
  with np.load(tmp_path / "a" / name) as a, np.load(tmp_path / "b" / name) as b:
    np.testing.assert_array_equal(a["images"], b["images"])
  with pytest.raises(SystemExit, match="pass --workdir=DIR .* or --pretrained=FOLDER"):
    sample.main([f"--workdir={tiny_pipeline}", f"--pretrained={tmp_path / 'student2'}"])


def test_the_ddim_and_stochastic_samplers_are_one_program_for_every_step_count():
  """The eval stage's cells of one model and sampler share a compiled program; DPM-Solver++'s
  steps are part of its program (tests/test_diffusion.py checks the traced step count's grid)."""
  fam = family.of(load_config("digits:runlocal"))
  for sampler in ("deterministic", "stochastic"):
    (run2, n2), (run4, n4) = (sample.sampler_program(fam, guided=True, sampler=sampler, steps=n)
                              for n in (2, 4))
    assert run2 is run4 and (n2, n4) == (2, 4)
  dpm2, dpm3 = (sample.sampler_program(fam, guided=True, sampler="dpm_solver", steps=n)[0]
                for n in (2, 3))
  assert dpm2 is not dpm3
  with pytest.raises(ValueError, match="num_steps"):
    sample.sampler_program(fam, guided=True, sampler="deterministic", steps=0)
