"""The FID Inception-v3: its layout against torchvision's known sizes, and the weight loader
against a NumPy transcription of the first layer and the classifier on a random file."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.evaluation import inception


def test_layout_matches_the_published_architecture():
  layout = inception.torch_layout()
  assert layout["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
  assert layout["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
  assert layout["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
  assert layout["Mixed_7c.branch3x3dbl_3b.conv.weight"] == (384, 384, 3, 1)
  assert layout["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
  assert layout["fc.weight"] == (1008, 2048)
  # torchvision's inception_v3 has 27,161,264 parameters, of which 3,326,696 are the auxiliary
  # classifier FID does not use; FID's classifier has 1008 rather than 1000 outputs (+16,392).
  learnable = sum(int(np.prod(s)) for k, s in layout.items() if "running_" not in k)
  assert learnable == 27_161_264 - 3_326_696 + 16_392


@pytest.fixture(scope="module")
def weights(random_inception_weights):
  return random_inception_weights


def test_loader_maps_torch_layout_exactly(weights):
  path, arrays = weights
  variables = inception.load_variables(path)
  # First layer, written out in NumPy: conv (OIHW, stride 2, no padding), BN (ε = 1e-3), ReLU.
  x = np.random.default_rng(1).normal(size=(2, 9, 9, 3)).astype(np.float32)
  w = arrays["Conv2d_1a_3x3.conv.weight"]
  patches = np.stack([x[:, i:i + 7:2, j:j + 7:2, :] for i in range(3) for j in range(3)], axis=-1)
  conv = np.einsum("bhwcK,ocK->bhwo", patches, w.reshape(32, 3, 9))
  bn = ((conv - arrays["Conv2d_1a_3x3.bn.running_mean"])
        / np.sqrt(arrays["Conv2d_1a_3x3.bn.running_var"] + 1e-3)
        * arrays["Conv2d_1a_3x3.bn.weight"] + arrays["Conv2d_1a_3x3.bn.bias"])
  layer = {"params": variables["params"]["Conv2d_1a_3x3"],
           "batch_stats": variables["batch_stats"]["Conv2d_1a_3x3"]}
  got = inception.BasicConv(32, (3, 3), (2, 2)).apply(layer, jnp.asarray(x))
  np.testing.assert_allclose(got, np.maximum(bn, 0.0), atol=2e-4)
  feats = np.random.default_rng(2).normal(size=(3, 2048)).astype(np.float32)
  logits = nn_dense(variables["params"]["fc"], feats)
  np.testing.assert_allclose(logits, feats @ arrays["fc.weight"].T + arrays["fc.bias"],
                             rtol=1e-4, atol=1e-3)


def nn_dense(params, x):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return nn.Dense(inception.NUM_LOGITS).apply({"params": params}, jnp.asarray(x))


def test_extractor_gives_features_and_probabilities(weights):
  path, _ = weights
  extract = inception.make_extractor(path, batch_size=2)
  images = np.asarray(jax.random.uniform(jax.random.key(0), (3, 8, 8, 1), minval=-1, maxval=1))
  feats, probs = extract(images)
  assert feats.shape == (3, 2048) and probs.shape == (3, 1008)
  assert np.all(np.isfinite(feats)) and np.allclose(probs.sum(axis=1), 1.0)
  # The third image, zero-padded into the last batch, gets the features it gets in a full batch
  # (eval-mode batch norm: each image's result is its own), from the same compiled program.
  again, _ = extract(images[[2, 0, 1]])
  np.testing.assert_allclose(again[[1, 2, 0]], feats, rtol=1e-5, atol=1e-5)
  assert np.std(feats[:, :8], axis=0).max() > 0  # the images are told apart


def test_wrong_files_are_one_line_errors(tmp_path, weights):
  _, arrays = weights
  partial = dict(arrays)
  del partial["Mixed_6a.branch3x3.bn.running_mean"]
  with pytest.raises(ValueError, match="lack 1 tensor"):
    inception.variables_from_torch_arrays(partial)
  wrong = dict(arrays, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ValueError, match=r"'fc.weight' has shape \(1000, 2048\), expected "
                                       r"\(1008, 2048\)") as info:
    inception.variables_from_torch_arrays(wrong)
  assert "\n" not in str(info.value)
