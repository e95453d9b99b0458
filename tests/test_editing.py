"""Image-to-image (SDEdit) and inpainting by replacement, against the Gaussian oracle.

For data ``x ~ N(μ, s²)`` per pixel (independent pixels) the probability-flow ODE is linear, so
an edit has a closed form: from ``z_{t₀} = α x + σ ε`` the flow lands on
``x' = μ + s (z_{t₀} − α μ) / r`` with ``r² = α² s² + σ²`` at ``t₀``. Inpainting: the filled
pixels are independent of the kept ones, so they land where the unconstrained flow takes them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from distill import diffusion, editing, schedules
from test_diffusion import MU, STD, _np_alpha_sigma, gaussian_denoiser

B = 20000


def _flow_endpoint(z, t0):
  alpha, sigma, _ = _np_alpha_sigma(t0)
  mu, s = MU.astype(np.float64), STD.astype(np.float64)
  return mu + s * (np.asarray(z, np.float64) - alpha * mu) / np.sqrt(alpha**2 * s**2 + sigma**2)


@pytest.fixture(scope="module")
def data():
  kx, ke = jax.random.split(jax.random.key(3))
  x = MU + STD * jax.random.normal(kx, (B, 2, 2, 1))
  return x, jax.random.normal(ke, (B, 2, 2, 1))


def _edit(x, eps, t0, n, **kwargs):
  @jax.jit
  def run(x, eps):
    z = editing.stochastic_encoding(x, eps, t0, logsnr_fn=schedules.cosine_logsnr)
    return diffusion.sample_deterministic(gaussian_denoiser, z, n, t_start=t0, **kwargs)
  return np.asarray(run(x, eps), np.float64)


def test_ddim_from_t0_converges_to_the_flow_endpoint(data):
  x, eps = data
  t0 = 0.55
  z = np.asarray(editing.stochastic_encoding(x, eps, t0, logsnr_fn=schedules.cosine_logsnr))
  exact = _flow_endpoint(z, t0)
  errors = {n: np.abs(_edit(x, eps, t0, n) - exact).max() for n in (64, 512)}
  assert errors[512] < 0.01 and errors[512] < errors[64] / 4, errors  # first order in 1/N
  # From t0 -> 0 the edit is the source: nothing was noised away.
  np.testing.assert_allclose(_edit(x[:64], eps[:64], 1e-4, 2), x[:64], atol=1e-3)


@pytest.mark.parametrize("t0", [0.3, 0.7])
def test_edits_of_data_are_data_at_the_closed_form_distance_from_the_source(data, t0):
  """SDEdit's two properties: edits of samples of the data are distributed as the data, and
  their mean squared distance to the source is ``s² [(s α / r − 1)² + (σ / r)²]``."""
  x, eps = data
  edits = _edit(x, eps, t0, 256)
  mean, std = edits.mean(axis=0), edits.std(axis=0)
  np.testing.assert_array_less(np.abs(mean - MU[0]), 5 * STD[0] / np.sqrt(B) + 0.005)
  np.testing.assert_array_less(np.abs(std - STD[0]), 5 * STD[0] / np.sqrt(2 * B) + 0.005)
  alpha, sigma, _ = _np_alpha_sigma(t0)
  s = STD[0].astype(np.float64)
  r = np.sqrt(alpha**2 * s**2 + sigma**2)
  want = s**2 * ((s * alpha / r - 1) ** 2 + (sigma / r) ** 2)
  got = ((edits - np.asarray(x, np.float64)) ** 2).mean(axis=0)
  np.testing.assert_allclose(got, want, rtol=0.05, atol=2e-5)


@pytest.mark.parametrize("strength,n,want", [
    (0.75, 4, (3, 0.75)), (0.6, 4, (2, 0.5)), (0.625, 4, (3, 0.75)), (1.0, 4, (4, 1.0)),
    (0.05, 4, (1, 0.25)), (0.5, 1, (1, 1.0)), (0.3, 8, (2, 0.25))])
def test_a_student_starts_on_its_grid(strength, n, want):
  assert editing.start_on_grid(strength, n) == want


@pytest.mark.parametrize("strength", [0.0, -0.2, 1.5])
def test_strength_outside_0_1_is_refused(strength):
  with pytest.raises(ValueError, match=r"strength=.* must be in \(0, 1\]"):
    editing.start_on_grid(strength, 4)


def test_a_student_on_its_grid_takes_its_own_steps():
  """A 4-step student from strength 0.75 evaluates at t = 3/4, 2/4, 1/4: its own grid."""
  seen = []

  def recording(z, t):
    seen.append(t[0])
    return jnp.zeros_like(z)

  k, t0 = editing.start_on_grid(0.75, 4)

  def run(z):
    return diffusion.sample_deterministic(recording, z, k, t_start=t0)

  with jax.disable_jit():  # every step's time, read by running eagerly
    run(jnp.zeros((1, 2, 2, 1)))
  np.testing.assert_allclose([float(t) for t in seen], [0.75, 0.5, 0.25], atol=1e-7)


@pytest.mark.parametrize("sampler", ["deterministic", "stochastic"])
def test_inpainting_keeps_the_source_and_fills_from_the_flow(data, sampler):
  x, _ = data
  z1 = jax.random.normal(jax.random.key(5), x.shape)
  fill = np.zeros((1, 2, 2), np.float32)
  fill[0, 0, 1] = fill[0, 1, 0] = 1.0  # two of the four pixels are filled
  keep = editing.keep_at(np.broadcast_to(fill, (B, 2, 2)), x.shape)
  known = editing.known_region(x, keep, z1)
  if sampler == "deterministic":
    out = jax.jit(lambda z: diffusion.sample_deterministic(
        gaussian_denoiser, z, 512, known_fn=known))(z1)
  else:
    out = jax.jit(lambda z: diffusion.sample_stochastic(
        gaussian_denoiser, z, 512, jax.random.key(9), known_fn=known))(z1)
  out = np.asarray(out, np.float64)
  kept = np.asarray(keep[..., 0] > 0)
  assert kept.sum() == 2 * B
  np.testing.assert_array_equal(out[..., 0][kept], np.asarray(x, np.float64)[..., 0][kept])
  filled = ~kept[0]
  if sampler == "deterministic":  # the unconstrained flow's endpoint from z1, pixel for pixel
    exact = _flow_endpoint(z1, 1.0)
    assert np.abs(out - exact)[:, filled].max() < 0.02
  mean, std = out.mean(axis=0)[filled], out.std(axis=0)[filled]
  np.testing.assert_array_less(np.abs(mean - MU[0][filled]),
                               5 * STD[0][filled] / np.sqrt(B) + 0.005)
  np.testing.assert_array_less(np.abs(std - STD[0][filled]),
                               5 * STD[0][filled] / np.sqrt(2 * B) + 0.005)


def test_a_latent_cell_is_kept_only_if_all_its_pixels_are():
  fill = np.zeros((1, 8, 8), np.float32)
  fill[0, 5, 2] = 1.0  # one pixel in the cell (1, 0) of a 4 x 4 latent grid at f = 2
  keep = np.asarray(editing.keep_at(fill, (1, 4, 4, 3)))
  assert keep.shape == (1, 4, 4, 1)
  assert keep[0, 2, 1, 0] == 0 and keep.sum() == 15
  with pytest.raises(ValueError, match="does not tile"):
    editing.keep_at(np.zeros((1, 6, 6)), (1, 4, 4, 3))


def test_composite_takes_the_source_where_kept():
  rng = np.random.default_rng(0)
  decoded, source = rng.normal(size=(2, 3, 8, 8, 3)).astype(np.float32)
  fill = (rng.uniform(size=(3, 8, 8)) > 0.5).astype(np.float32)
  out = np.asarray(editing.composite(decoded, source, fill))
  np.testing.assert_array_equal(out[fill == 0], source[fill == 0])
  np.testing.assert_array_equal(out[fill == 1], decoded[fill == 1])


def test_images_and_masks_are_read_as_the_model_expects(tmp_path):
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[:8, :, :] = (255, 0, 0, 255)  # opaque red on top, transparent below
  Image.fromarray(rgba).save(tmp_path / "im.png")
  rgb = editing.read_image(tmp_path / "im.png", size=(8, 8), channels=3)
  assert rgb.shape == (8, 8, 3) and rgb.dtype == np.float32
  np.testing.assert_allclose(rgb[0, 0], [1, -1, -1])
  np.testing.assert_allclose(rgb[-1, -1], [1, 1, 1])  # transparency on white
  grey = editing.read_image(tmp_path / "im.png", size=(4, 4), channels=1)
  assert grey.shape == (4, 4, 1)
  mask = np.zeros((16, 16), np.uint8)
  mask[:, 8:] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  m = editing.read_mask(tmp_path / "mask.png", size=(4, 4))
  np.testing.assert_array_equal(m, np.repeat([[0, 0, 1, 1]], 4, axis=0))
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "black.png")
  with pytest.raises(ValueError, match="black everywhere"):
    editing.read_mask(tmp_path / "black.png", size=(4, 4))
  with pytest.raises(ValueError, match="no such image file"):
    editing.read_image(tmp_path / "missing.png", size=(4, 4), channels=1)
  (tmp_path / "text.png").write_text("not an image")
  with pytest.raises(ValueError, match="not an image"):
    editing.read_image(tmp_path / "text.png", size=(4, 4), channels=1)
