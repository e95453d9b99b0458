"""The U-Net's layers against flax.linen's: same parameters, same outputs, same gradients."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from distill import models
from distill.config_utils import load_config
from distill.models import layers, unet

FLAX_LAYERS = layers.FLAX_LAYERS


def _perturbed(params, seed):
  """Parameters moved off their initial values (ones, zeros) so every gradient term matters."""
  flat, unravel = ravel_pytree(params)
  return unravel(flat + 0.3 * jax.random.normal(jax.random.key(seed), flat.shape))


def _value_and_vjp(module, params, x, seed=11):
  """Output, and the pull-back of a random cotangent to (params, x)."""
  y, pull = jax.vjp(lambda p, x: module.apply(p, x), params, x)
  cot = jax.random.normal(jax.random.key(seed), y.shape, jnp.float32).astype(y.dtype)
  return y, pull(cot)


def _assert_close_trees(a, b, rtol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
    np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * np.abs(u).max())


LAYER_CASES = [
    ("conv3x3", lambda m: m.Conv(12, (3, 3), name="c"), (2, 6, 6, 5)),
    ("conv_stride2", lambda m: m.Conv(7, (3, 3), strides=(2, 2), name="c"), (2, 8, 8, 4)),
    ("conv1x1", lambda m: m.Conv(6, (1, 1), name="c"), (3, 4, 4, 8)),
    ("dense_tokens", lambda m: m.Dense(9, name="d"), (2, 10, 6)),
    ("dense_vectors", lambda m: m.Dense(5, name="d"), (4, 7)),
    ("group_norm", lambda m: m.GroupNorm(4, name="n"), (3, 5, 6, 16)),
    ("group_norm_one_group", lambda m: m.GroupNorm(1, name="n"), (2, 3, 3, 6)),
]


@pytest.mark.parametrize("name,make,shape", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_layer_matches_flax(name, make, shape):
  del name
  ours, ref = make(layers), make(nn)
  x = 2.0 * jax.random.normal(jax.random.key(1), shape) + 0.7
  p_ours = ours.init(jax.random.key(0), x)
  p_ref = ref.init(jax.random.key(0), x)
  # Same names, shapes and initial values: flax checkpoints load unchanged.
  _assert_close_trees(p_ref, p_ours, rtol=0)
  p = _perturbed(p_ref, seed=2)
  y_ref, g_ref = _value_and_vjp(ref, p, x)
  y_ours, g_ours = _value_and_vjp(ours, p, x)
  assert y_ours.shape == y_ref.shape and y_ours.dtype == y_ref.dtype
  _assert_close_trees(y_ref, y_ours, rtol=2e-5)
  _assert_close_trees(g_ref, g_ours, rtol=2e-5)


@pytest.mark.parametrize("make", [lambda m: m.Conv(8, (3, 3), dtype=jnp.bfloat16),
                                  lambda m: m.Dense(8, dtype=jnp.bfloat16),
                                  lambda m: m.GroupNorm(2, dtype=jnp.bfloat16)],
                         ids=["conv", "dense", "group_norm"])
def test_bfloat16_activations_match_flax(make):
  """With ``dtype=bfloat16`` (the TPU setting) outputs and gradients keep flax's dtypes."""
  x = jax.random.normal(jax.random.key(1), (2, 4, 4, 8)).astype(jnp.bfloat16)
  ours, ref = make(layers), make(nn)
  p = _perturbed(ref.init(jax.random.key(0), x), seed=3)
  y_ref, g_ref = _value_and_vjp(ref, p, x)
  y_ours, g_ours = _value_and_vjp(ours, p, x)
  assert y_ours.dtype == y_ref.dtype == jnp.bfloat16
  assert jax.tree.map(lambda a: a.dtype, g_ours) == jax.tree.map(lambda a: a.dtype, g_ref)
  _assert_close_trees(y_ref, y_ours, rtol=3e-2)
  _assert_close_trees(g_ref, g_ours, rtol=3e-2)


def test_scale_shift_gradient_matches_autodiff():
  h = jax.random.normal(jax.random.key(0), (3, 4, 5, 6))
  s, t = jax.random.normal(jax.random.key(1), (2, 3, 6))
  cot = jax.random.normal(jax.random.key(2), h.shape)
  y, pull = jax.vjp(layers.scale_shift, h, s, t)
  y_ref, pull_ref = jax.vjp(FLAX_LAYERS.scale_shift, h, s, t)
  _assert_close_trees(y_ref, y, rtol=1e-6)
  _assert_close_trees(pull_ref(cot), pull(cot), rtol=1e-5)


def test_sum_positions_is_a_matrix_product_on_cpu():
  a = jax.random.normal(jax.random.key(0), (3, 50, 7))
  np.testing.assert_allclose(layers.sum_positions(a), a.sum(axis=1), rtol=1e-5, atol=1e-5)
  hlo = jax.jit(layers.sum_positions).lower(a).compile().as_text()
  assert " dot(" in hlo and " reduce(" not in hlo, hlo


@pytest.fixture(scope="module")
def unet_pair():
  """The digits:runlocal U-Net built from these layers and from flax.linen's."""
  config = load_config("digits:runlocal")
  model = models.build_unet(config, use_w_embedding=True)
  shape = models.model_input_shape(config, 4)

  def build(lay):
    unet.layers = lay
    try:
      params = models.init_params(model, jax.random.key(0), shape)
      p = _perturbed(params, seed=4)
      z = jax.random.normal(jax.random.key(1), shape)
      logsnr = jnp.linspace(-4.0, 4.0, 4)
      labels = jnp.array([0, 3, 10, 7])
      w = jnp.array([0.0, 1.0, 2.5, 4.0])

      def loss(p, z):
        out = model.apply({"params": p}, z, logsnr, labels, w)
        return jnp.sum(out * jnp.cos(out)), out

      (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(p, z)
      return params, out, grads
    finally:
      unet.layers = layers

  return build(FLAX_LAYERS), build(layers)


def test_unet_same_parameters_as_with_flax_layers(unet_pair):
  (p_ref, _, _), (p_ours, _, _) = unet_pair
  _assert_close_trees(p_ref, p_ours, rtol=0)


def test_unet_same_output_and_gradients_as_with_flax_layers(unet_pair):
  (_, out_ref, g_ref), (_, out_ours, g_ours) = unet_pair
  _assert_close_trees(out_ref, out_ours, rtol=1e-5)
  _assert_close_trees(g_ref, g_ours, rtol=1e-4)


@pytest.mark.parametrize("make, name, bad", [
    (lambda: layers.Dense(3), "kernel", (5, 3)),
    (lambda: layers.Conv(3, (3, 3)), "bias", (4,)),
    (lambda: layers.GroupNorm(2), "scale", (2,)),
])
def test_parameters_of_another_shape_are_refused(make, name, bad):
  """Existing parameters are read without flax's re-trace of their initialiser; the shape check
  that re-trace made is kept, naming the parameter."""
  x = jnp.ones((2, 4, 4, 4))
  module = make()
  params = module.init(jax.random.key(0), x)["params"]
  assert np.isfinite(module.apply({"params": params}, x)).all()
  wrong = dict(params, **{name: jnp.zeros(bad)})
  with pytest.raises(ValueError, match=rf"^parameter {name} has shape {re.escape(str(bad))}, "
                                       r"this model's has \(.*\): parameters of another model"):
    module.apply({"params": wrong}, x)
  # Inside a model the parameter's path is named.
  wrapped = nn.Sequential([make()])
  nested = wrapped.init(jax.random.key(0), x)["params"]
  nested["layers_0"] = dict(nested["layers_0"], **{name: jnp.zeros(bad)})
  with pytest.raises(ValueError, match=rf"^parameter layers_0/{name} has shape"):
    wrapped.apply({"params": nested}, x)
