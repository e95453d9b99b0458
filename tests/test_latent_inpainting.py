"""The 9-channel inpainting U-Net (paper §4.2.4; ``distill/latent/inpainting.py``) through the
latent family, the training masks, the chain and the sampler.

The teacher is the tiny SD-like fixture with its U-Net widened to SD-inpainting's 9 input
channels (latents, mask, masked image's latents), the extra input weights random so that the
condition's parts move the output: random weights check the wiring, not quality.
"""

import dataclasses
import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import layout, losses, pipeline, sample
from distill.config_utils import load_config
from distill.latent import export, inpainting, pretrained
from distill.latent import family as latent_family

from test_latent_pipeline import REPO

TINY_SD = REPO / "tests" / "fixtures" / "latent" / "tiny-sd"


def _widened_folder(root, in_channels: int):
  """tiny-sd with its U-Net's input convolution widened to ``in_channels`` (the first 4 inputs
  keep their weights, as SD-inpainting was initialised from SD)."""
  folder = root / f"tiny-sd-{in_channels}"
  shutil.copytree(TINY_SD, folder)
  net, params = pretrained.load_unet(TINY_SD / "unet")
  kernel = np.asarray(params["conv_in"]["kernel"])
  extra = np.random.default_rng(0).normal(0.0, 0.2, kernel.shape[:2] + (in_channels - 4,
                                                                       kernel.shape[3]))
  params = dict(params, conv_in=dict(params["conv_in"], kernel=np.concatenate(
      [kernel, extra.astype(np.float32)], axis=2)))
  cfg = net.config.__class__(**{**net.config.__dict__, "in_channels": in_channels})
  shutil.rmtree(folder / "unet")
  export.write_model(folder / "unet", export.unet_config(cfg), params)
  # Read as a v-prediction teacher, so that the chain needs no ε→v link (random weights either
  # way).
  scheduler = folder / "scheduler" / "scheduler_config.json"
  scheduler.write_text(json.dumps(dict(json.loads(scheduler.read_text()),
                                       prediction_type="v_prediction")))
  return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _widened_folder(tmp_path_factory.mktemp("inpaint"), 9)


def _config(folder):
  config = load_config("sd15:runlocal")
  config.teacher.pretrained = str(folder)
  config.num_devices = 1
  config.teacher_v.num_train_steps = 0  # no ε→v link: the chain is stage one and the halvings
  return config


def test_the_family_feeds_latents_mask_and_masked_image_in_that_order(folder, tmp_path):
  fam = latent_family.from_config(_config(folder))
  assert fam.inpainting and fam.x_shape[-1] == 4
  rng = np.random.default_rng(1)
  b, (h, w, c) = 2, fam.x_shape
  z = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
  t = jnp.asarray([0.3, 0.8])
  context = jnp.asarray(fam.context_table[[3, 5]])
  mask = jnp.asarray(rng.random((b, h, w, 1)) < 0.5, jnp.float32)
  masked = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
  cond = inpainting.condition(context, mask, masked)
  params = fam.models.unet_params
  got = fam.v_hat(fam.teacher, params, z, t, cond)
  # SD-inpainting's input: [noisy latents, mask, masked image latents] along channels.
  assert fam.teacher_prediction == "v_prediction"
  want = fam.teacher.apply({"params": params}, jnp.concatenate([z, mask, masked], -1),
                           fam.schedule.timestep(t), context)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  swapped = fam.v_hat(fam.teacher, params, z, t, inpainting.condition(context, mask, masked[::-1]))
  assert not np.allclose(swapped, got, atol=1e-3)  # the masked latents reach the network
  # Guidance drops the context only: both branches see the mask and the masked image.
  null = fam.null_cond(cond)
  np.testing.assert_array_equal(null["mask"], mask)
  np.testing.assert_array_equal(null["masked"], masked)
  np.testing.assert_array_equal(null["context"][0], fam.context_table[-1])
  # Any other width is refused in one line.
  odd = _widened_folder(tmp_path, 5)
  with pytest.raises(ValueError, match=r"in_channels=5, but the first stage's latents have 4 "
                                       r"channels: expected 4 .* or 9"):
    latent_family.from_config(_config(odd))


def test_training_masks():
  size, draws = 32, 2000
  masks = np.stack([inpainting.draw_mask(inpainting.mask_rng(7, 0, i), size)
                    for i in range(draws)])
  assert set(np.unique(masks)) <= {0.0, 1.0}
  full = masks.reshape(draws, -1).min(axis=1) == 1.0
  share = full.mean()  # binomial(2000, 0.25): standard deviation 0.0097
  assert abs(share - inpainting.FULL_MASK_SHARE) < 4 * 0.0097, share
  partial = masks[~full].reshape(-1, size * size).mean(axis=1)
  assert partial.min() >= (size // 8) ** 2 / size ** 2 and partial.max() < 1.0
  # A function of (seed, step, row): the same triple gives the same mask, another row another.
  again = inpainting.draw_mask(inpainting.mask_rng(7, 0, 5), size)
  np.testing.assert_array_equal(again, masks[5])
  assert not all(np.array_equal(masks[5], m) for m in masks[6:10])
  # Latent resolution: cell (i, j) takes pixel (4i, 4j) of a 32 → 8 mask, as torch's nearest
  # interpolation does.
  fill = masks[:3]
  small = np.asarray(inpainting.latent_mask(fill, 8))
  for i in range(8):
    for j in range(8):
      np.testing.assert_array_equal(small[:, i, j, 0], fill[:, 4 * i, 4 * j])
  images = np.random.default_rng(0).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
  out = np.asarray(inpainting.masked_image(images, fill))
  np.testing.assert_array_equal(out[fill == 1], 0.0)
  np.testing.assert_array_equal(out[fill == 0], images[fill == 0])


def test_batches_carry_masks_drawn_by_global_row(folder, monkeypatch):
  fam = latent_family.from_config(_config(folder))
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (4, 8, 8, 1)).astype(np.float32)
  labels = np.arange(4, dtype=np.int32)
  whole = grain.MapDataset.source([{"image": images, "label": labels}] * 3)
  step = 2
  batch = fam.prepare_batches(whole, seed=11)[step]
  size = fam.image_shape[0]
  fills = np.stack([inpainting.draw_mask(inpainting.mask_rng(11, step, row), size)
                    for row in range(4)])
  np.testing.assert_allclose(batch["masked_latents"], fam.encode_images(images, fill_mask=fills),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(batch["mask"], inpainting.latent_mask(fills, fam.x_shape[0]))
  np.testing.assert_allclose(batch["latents"], fam.encode_images(images), rtol=1e-6, atol=1e-6)
  # Process 1 of 2 holds rows 2 and 3 of the global batch: their masks.
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  half = grain.MapDataset.source([{"image": images[2:], "label": labels[2:]}] * 3)
  second = fam.prepare_batches(half, seed=11)[step]
  np.testing.assert_array_equal(second["mask"], batch["mask"][2:])
  np.testing.assert_allclose(second["masked_latents"], batch["masked_latents"][2:], atol=1e-6)


class _LinearInpaintingFamily(latent_family.LatentFamily):
  """The inpainting family with a linear stand-in for its U-Net (``v`` from the noisy latents, the
  masked latents and ``w``): every objective's own arithmetic, without a U-Net to compile."""

  def v_hat(self, net, params, z, t, cond, w=None, *, train: bool = False, rngs=None):
    del net, train, rngs
    t = jnp.reshape(jnp.asarray(t, jnp.float32), (-1, 1, 1, 1))
    w = 0.0 if w is None else jnp.reshape(jnp.asarray(w, jnp.float32), (-1, 1, 1, 1))
    return params["a"] * z + params["b"] * (1.0 + t + 0.1 * w) * cond["masked"]


def test_the_kept_loss_weight_weights_the_kept_cells(folder, tmp_path):
  """``latent.kept_loss_weight = k``: every link's per-cell squared errors count k times where the
  mask keeps the image. Oracles: with the whole image kept each loss is k times the plain one,
  with the whole image to fill it is the plain one, in between it is linear in k where the loss
  is a sum over cells, and the teacher's ε-loss recomputed by hand; the same kept share in other
  cells gives another loss (the weights are per cell, not per example)."""
  def fam_with(weight):
    config = _config(folder)
    config.latent.kept_loss_weight = weight
    fam = latent_family.from_config(config)
    return _LinearInpaintingFamily(**{f.name: getattr(fam, f.name)
                                      for f in dataclasses.fields(fam)})

  weights = (1.0, 2.0, 3.0)
  fams = [fam_with(k) for k in weights]
  assert fams[0].loss_weights({"mask": jnp.zeros((1, 1, 1, 1))}) is None
  assert fams[2].kept_loss_weight == 3.0
  rng = np.random.default_rng(3)
  b, shape = 8, fams[0].x_shape
  batch = {"latents": jnp.asarray(rng.normal(size=(b,) + shape), jnp.float32),
           "context": jnp.asarray(fams[0].context_table[np.arange(b) % 4]),
           "masked_latents": jnp.asarray(rng.normal(size=(b,) + shape), jnp.float32)}
  teacher, student = {"a": 0.7, "b": 0.2}, {"a": 0.6, "b": 0.3}
  two = {"params": teacher, "num_student_steps": jnp.asarray(2, jnp.int32)}
  w = dict(w_min=0.0, w_max=4.0)

  def losses_of(fam, mask):
    batch_m, key = dict(batch, mask=jnp.asarray(mask)), jax.random.key(5)
    # Condition dropout replaces the context only: the mask, and so the weights, stay.
    teacher_loss = lambda weighting: losses.teacher_objective(
        fam, p_uncond=0.5, weighting=weighting)(teacher, None, batch_m, key)[0]
    return np.array([
        teacher_loss("snr_trunc"), teacher_loss("eps"), teacher_loss("snr_plus_one"),
        losses.stage_one_objective(fam, **w)(student, teacher, batch_m, key)[0],
        losses.stage_two_objective(fam, **w)(student, two, batch_m, key)[0],
        losses.encoder_objective(fam, **w)(student, two, batch_m, key)[0]])

  mixed = (rng.random((b,) + shape[:2] + (1,)) < 0.5).astype(np.float32)
  kept = [losses_of(f, np.zeros_like(mixed)) for f in fams]
  fill = [losses_of(f, np.ones_like(mixed)) for f in fams]
  mix = [losses_of(f, mixed) for f in fams]
  assert np.all(kept[0] > 0) and np.all(np.isfinite(kept[0]))
  for k, got in zip(weights, kept):
    np.testing.assert_allclose(got, k * kept[0], rtol=1e-5)
  for got in fill:
    np.testing.assert_allclose(got, fill[0], rtol=1e-5)
  # Linear in k where a loss is one sum over cells (all but the first, the max of two such sums),
  # and between the plain loss and k times it.
  np.testing.assert_allclose((mix[2] - mix[0])[1:], 2 * (mix[1] - mix[0])[1:], rtol=1e-4)
  assert np.all(mix[2] > mix[0] * 1.05) and np.all(mix[2] < 3 * mix[0] / 1.05)
  # The ε-loss by hand (float64): t and ε are the objective's first two keys' draws, ε̂ = σz + αv.
  k_t, k_eps = jax.random.split(jax.random.key(5), 4)[:2]
  t = np.asarray(jax.random.uniform(k_t, (b,)), np.float64)
  eps = np.asarray(jax.random.normal(k_eps, (b,) + shape, jnp.float32), np.float64)
  lam = np.asarray(fams[0].logsnr_fn(jnp.asarray(t, jnp.float32)), np.float64)[:, None, None, None]
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  x, m = np.asarray(batch["latents"], np.float64), np.asarray(batch["masked_latents"], np.float64)
  z = alpha * x + sigma * eps
  v = teacher["a"] * z + teacher["b"] * (1 + t[:, None, None, None]) * m
  err = np.square(sigma * z + alpha * v - eps)
  np.testing.assert_allclose(mix[2][1], np.mean((1 + 2 * (1 - mixed)) * err), rtol=1e-4)
  # The same kept share per example in other cells: a per-example weight would not see it.
  moved = np.stack([np.roll(m_b, 1, axis=(0, 1)) for m_b in mixed])
  assert np.array_equal(moved.sum(axis=(1, 2, 3)), mixed.sum(axis=(1, 2, 3)))
  np.testing.assert_allclose(losses_of(fams[0], moved), mix[0], rtol=1e-6)  # plain: no mask
  assert np.all(np.abs(losses_of(fams[2], moved) / mix[2] - 1) > 1e-3)
  # A text-to-image U-Net has no kept region, and a weight must be positive: one line each.
  config = _config(TINY_SD)
  config.latent.kept_loss_weight = 2.0
  with pytest.raises(ValueError, match=r"^latent\.kept_loss_weight=2 weights the kept region "
                                       r"of an inpainting U-Net's loss, and .* is not one: set "
                                       r"it to 1\.$"):
    latent_family.from_config(config)
  config.latent.kept_loss_weight = 0.0
  with pytest.raises(ValueError, match=r"^latent\.kept_loss_weight=0 must be a finite number > 0"):
    latent_family.from_config(config)
  # A chain refuses it before anything trains (the text-to-image default trains its parts first).
  for weight, message in ((2.0, r"\(latent\.inpainting=False\) is not one"),
                          (float("inf"), "must be a finite number")):
    config = load_config("emoji")
    config.latent.kept_loss_weight = weight
    with pytest.raises(ValueError, match=r"^latent\.kept_loss_weight=.*" + message):
      pipeline.run(config, tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_chain_distils_it_and_the_student_inpaints_from_its_condition(folder, tmp_path,
                                                                           monkeypatch):
  config = _config(folder)
  config.stages = "stage_one,stage_two"
  config.stage_one.num_train_steps = 2
  config.stage_two.train_steps_per_halving = 2
  config.stage_two.start_num_steps = 2  # one halving, 2 -> 1
  for name in ("stage_one", "stage_two"):
    config[name].sample_every = 0
  pipeline.run(config, tmp_path)
  assert layout.available_students(tmp_path) == [1]
  student = sample.load_model(tmp_path, "student", num_steps=1, config=config)
  fam = student.family
  assert fam.inpainting and "conv_in" in student.params
  assert student.params["conv_in"]["kernel"].shape[2] == 9
  size = fam.image_shape[0]
  source = np.random.default_rng(3).uniform(-1, 1, (size, size, fam.image_shape[2]))
  fill = np.zeros((size, size), np.float32)
  fill[: size // 2] = 1.0  # fill the top half
  args = dict(sampler="deterministic", num_steps=None, labels=[3, 3], w=[0.0, 2.0], seed=0,
              source=source.astype(np.float32), fill_mask=fill)
  x = sample.generate(student, **args)
  assert x.shape == (2,) + tuple(fam.image_shape) and np.isfinite(x).all()
  # Not inpainting by replacement: the kept half is the network's decoding, not the source's
  # pixels.
  assert not np.allclose(x[:, size // 2:], source[size // 2:], atol=1e-3)
  # The masked source is part of the condition: another source in the kept half, another sample.
  other = source.copy()
  other[size // 2:] *= -1.0
  y = sample.generate(student, **dict(args, source=other.astype(np.float32)))
  assert not np.allclose(x, y, atol=1e-4)
  # Without a mask the whole image is filled: a generation, as with a full mask over any source.
  plain = sample.generate(student, **dict(args, source=None, fill_mask=None))
  full = sample.generate(student, **dict(args, fill_mask=np.ones_like(fill)))
  np.testing.assert_allclose(plain, full, rtol=1e-5, atol=1e-5)
  assert not np.allclose(plain, x, atol=1e-4)
  _editing_bench_on_the_chain(tmp_path, student, monkeypatch)


def _editing_bench_on_the_chain(workdir, student, monkeypatch):
  """``bench/editing.py`` on the 9-channel chain's workdir: it inpaints through the condition
  (the kept pixels are the network's decoding, not the source's), and its two latent references
  are the ones recomputed here from the library's parts: the source's latents kept
  (``rms_kept_exact_latents``) and the masked image's, the network's input
  (``rms_kept_input_latents``). Two stand-ins: the held-out digits are brought to the fixture
  autoencoder's 16 × 16 RGB (as ``encode_images`` brings training images), and the report's
  features are a fixed random projection (FID itself is not what this checks)."""
  from distill.evaluation import features  # pylint: disable=import-outside-toplevel
  from test_bench import _script  # pylint: disable=import-outside-toplevel
  fam = student.family
  size, channels = fam.image_shape[0], fam.image_shape[2]
  bench = _script("editing")
  held_out_sources = bench.common.held_out_sources

  def to_model(x):
    """Images at the model's size and channels (the data's 8 × 8 digits resized and repeated)."""
    if x.shape[1:] != tuple(fam.image_shape):
      x = jax.image.resize(x, (len(x), size, size, x.shape[-1]), method="bilinear")
      x = np.repeat(np.asarray(x), channels // x.shape[-1], axis=-1)
    return np.reshape(np.asarray(x, np.float32), (len(x), size, size, channels))

  def sources(config, limit):
    x, labels = held_out_sources(config, limit)
    return to_model(x), labels

  proj = np.random.default_rng(0).normal(size=(2, size * size * channels, 10))
  project = lambda x, i: np.reshape(to_model(x), (len(x), -1)) @ proj[i]
  monkeypatch.setattr(bench.common, "held_out_sources", sources)
  monkeypatch.setattr(features, "make_extractor", lambda config, workdir: (
      lambda x: (project(x, 0), np.asarray(jax.nn.softmax(project(x, 1)))),
      {"features": "a random projection", "class_accuracy": True}))
  n, w = 4, 2.0
  out = workdir / "editing"
  results = bench.main([f"--workdir={workdir}", f"--num_sources={n}", "--students=1",
                        "--teacher_steps=1", f"--w={w}", f"--out={out}"])
  assert [(r["method"], r["steps"]) for r in results["inpaint"]] == [
      ("student 1", 1), ("DDIM 2x1", 1), ("teacher 2x1", 1)]
  assert json.loads((out / "editing.json").read_text())["mechanism"] == (
      "the inpainting U-Net's condition")
  assert "RMS kept, input's latents kept" in (out / "editing.md").read_text()
  # The student's row again, from the same sources, seed and w.
  src, labels = sources(layout.workdir_config(workdir), n)
  fill = np.zeros((size, size), np.float32)
  fill[size // 4:size - size // 4, size // 4:size - size // 4] = 1.0  # the centre half-square
  x = sample.generate(student, sampler="deterministic", num_steps=None, labels=labels,
                      w=np.full(n, w), seed=0, source=src, fill_mask=fill)
  kept = fill == 0
  row = results["inpaint"][0]
  assert row["kept_max_change"] > 0  # not by replacement
  np.testing.assert_allclose(row["rms_kept"], np.sqrt(np.mean((x - src)[:, kept] ** 2)),
                             rtol=1e-5)
  cells = fam.x_shape[0]
  hole = np.zeros((1, cells, cells, 1), bool)  # the centre half of the latent cells too
  hole[:, cells // 4:cells - cells // 4, cells // 4:cells - cells // 4] = True
  own = np.asarray(fam.encode_images(x))
  given = np.asarray(fam.encode_images(src, fill_mask=np.broadcast_to(fill, (n, size, size))))
  for key, latents in (("rms_kept_exact_latents", np.asarray(fam.encode_images(src))),
                       ("rms_kept_input_latents", given)):
    decoded = np.asarray(fam.decode(np.where(hole, own, latents)))
    np.testing.assert_allclose(row[key], np.sqrt(np.mean((decoded - src)[:, kept] ** 2)),
                               rtol=1e-4, err_msg=key)
  assert row["rms_kept_input_latents"] != row["rms_kept_exact_latents"]


def test_the_emoji_variant_and_the_cache(folder, tmp_path):
  from distill.latent import parts  # pylint: disable=import-outside-toplevel
  config = load_config("emoji:inpaint")
  assert config.latent.inpainting and not config.latent.cache
  assert parts.unet_config(config).in_channels == 2 * 4 + 1
  assert parts.unet_config(load_config("emoji")).in_channels == 4
  with pytest.raises(ValueError, match=r"variants are \['runlocal', 'inpaint', 'epsilon'\]"):
    load_config("emoji:inpainting")
  # Each step draws new masked images: a cache of encoded images cannot serve the chain.
  config = _config(folder)
  config.stages = "stage_one"
  config.latent.cache = True
  with pytest.raises(ValueError, match=r"latent\.cache=True: the inpainting teacher .* set "
                                       r"--config\.latent\.cache=False\.$"):
    pipeline.run(config, tmp_path)
  assert not any(tmp_path.iterdir())  # refused before anything ran or was written
  config = load_config("emoji:inpaint")
  config.latent.cache = True
  with pytest.raises(ValueError, match=r"\(latent\.inpainting=True\) is trained on a mask"):
    pipeline.run(config, tmp_path)
