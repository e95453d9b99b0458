"""U-Net shapes, sizes, conditioning wiring, the student-from-teacher helper and sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.flatten_util import ravel_pytree

from distill import denoiser, family, models, schedules, sharding
from distill.config_utils import load_config
from distill.models.factory import param_count

PIXEL = family.of(load_config("digits:runlocal"))  # the nets of the `tiny` fixture's config
_x_prediction = jax.jit(denoiser.x_prediction, static_argnums=(0, 1))
_guided_x_prediction = jax.jit(denoiser.guided_x_prediction, static_argnums=0)


def x_prediction(net, *args):
  return _x_prediction(PIXEL, net, *args)


def guided_x_prediction(teacher, *args):
  assert teacher == PIXEL.teacher
  return _guided_x_prediction(PIXEL, *args)

ALL_CONFIGS = ["digits", "digits:runlocal", "cifar10", "cifar10:runlocal", "imagenet64",
               "imagenet64:runlocal"]


def _randomise(params, seed):
  """Random values in every leaf, so zero-initialised layers cannot hide a wiring bug."""
  flat, unravel = ravel_pytree(params)
  return unravel(0.2 * jax.random.normal(jax.random.key(seed), flat.shape, flat.dtype))


@pytest.fixture(scope="module")
def tiny():
  config = load_config("digits:runlocal")
  teacher = models.build_unet(config)
  student = models.build_unet(config, use_w_embedding=True)
  params = _randomise(models.init_params(teacher, jax.random.key(0), (2, 8, 8, 1)), seed=1)
  fresh = models.init_params(student, jax.random.key(5), (2, 8, 8, 1))
  k1, k2 = jax.random.split(jax.random.key(3))
  batch = dict(z=jax.random.normal(k1, (8, 8, 8, 1)),
               t=jax.random.uniform(k2, (8,), minval=0.05, maxval=0.95),
               labels=jnp.arange(8) % 10)
  return config, teacher, student, params, batch, fresh


# Exact parameter counts (teacher, student with the w-embedding). README states the teachers:
# digits 0.76 M, CIFAR-10 53.7 M, ImageNet 64 277 M; BENCHMARKS the students: CIFAR-10 55.0 M,
# ImageNet 64 277.9 M.
PARAM_COUNTS = {"digits": (756_417, 777_153), "digits:runlocal": (191_073, 196_321),
                "cifar10": (53_705_987, 55_018_755), "cifar10:runlocal": (191_651, 196_899),
                "imagenet64": (277_189_827, 277_928_643),
                "imagenet64:runlocal": (255_011, 260_259)}
STATED_COUNTS = {"digits": ("0.76", None), "cifar10": ("53.7", "55.0"),
                 "imagenet64": ("277", "277.9")}  # in M, at the precision the documents use


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_builds_with_expected_shapes(name):
  config = load_config(name)
  for use_w in (False, True):
    net = models.build_unet(config, use_w_embedding=use_w)
    shape = models.model_input_shape(config, batch_size=2)
    params = jax.eval_shape(lambda k: models.init_params(net, k, shape), jax.random.key(0))
    w = jnp.zeros((2,)) if use_w else None
    out = jax.eval_shape(
        lambda p: net.apply({"params": p}, jnp.zeros(shape), jnp.zeros((2,)),
                            jnp.zeros((2,), jnp.int32), w), params)
    assert out.shape == shape and out.dtype == jnp.float32
    leaves = jax.tree.leaves(params)
    assert all(x.dtype == jnp.float32 for x in leaves)  # bfloat16 configs: activations only
    count = param_count(params)
    print(f"{name} use_w_embedding={use_w}: {count:,} parameters")
    assert ("w_embed" in params) == use_w
    assert count == sum(int(np.prod(x.shape)) for x in leaves)
    assert count == PARAM_COUNTS[name][use_w]
    stated = STATED_COUNTS.get(name, (None, None))[use_w]
    if stated is not None:
      decimals = len(stated.split(".")[1]) if "." in stated else 0
      assert f"{count / 1e6:.{decimals}f}" == stated


def test_forward_shape_and_finite(tiny):
  config, teacher, _, params, batch, _ = tiny
  v = jax.jit(teacher.apply)({"params": params}, batch["z"],
                             schedules.cosine_logsnr(batch["t"]), batch["labels"])
  assert v.shape == batch["z"].shape
  assert np.all(np.isfinite(v))


def test_student_from_teacher_equals_teacher_conditional_for_every_w(tiny):
  _, teacher, student, params, batch, fresh = tiny
  student_params = models.student_params_from_teacher(params, fresh)
  x_teacher = x_prediction(teacher, params, batch["z"], batch["t"], batch["labels"])
  for w in (0.0, 0.3, 1.0, 4.0, jnp.linspace(0.0, 4.0, 8)):
    x_student = x_prediction(student, student_params, batch["z"], batch["t"],
                                      batch["labels"], jnp.broadcast_to(w, (8,)))
    np.testing.assert_allclose(x_student, x_teacher, atol=1e-5)
  # Every teacher parameter was copied; only the w-embedding is the student's own.
  flat_t = traverse_util.flatten_dict(params, sep="/")
  flat_s = traverse_util.flatten_dict(student_params, sep="/")
  for path, value in flat_t.items():
    np.testing.assert_array_equal(flat_s[path], value)
  assert {p for p in flat_s if p not in flat_t} == {
      p for p in flat_s if p.startswith("w_embed/")}


def test_w_embedding_conditions_the_student_once_trained(tiny):
  _, _, student, params, batch, fresh = tiny
  sp = models.student_params_from_teacher(params, _randomise(fresh, seed=9))  # w_embed now non-zero
  x0 = x_prediction(student, sp, batch["z"], batch["t"], batch["labels"], jnp.zeros(8))
  x4 = x_prediction(student, sp, batch["z"], batch["t"], batch["labels"],
                             jnp.full(8, 4.0))
  assert np.abs(x0 - x4).max() > 1e-3


def test_null_label_changes_a_random_teacher(tiny):
  _, teacher, _, params, batch, _ = tiny
  cond = x_prediction(teacher, params, batch["z"], batch["t"], batch["labels"])
  null = x_prediction(teacher, params, batch["z"], batch["t"],
                               jnp.full((8,), teacher.null_label))
  assert teacher.null_label == 10
  assert np.abs(cond - null).max() > 1e-3


def test_guided_prediction_in_one_pass_equals_two_passes(tiny):
  _, teacher, _, params, batch, _ = tiny
  w = jnp.linspace(0.0, 4.0, 8)
  one_pass = guided_x_prediction(teacher, params, batch["z"], batch["t"],
                                          batch["labels"], w)
  cond = x_prediction(teacher, params, batch["z"], batch["t"], batch["labels"])
  uncond = x_prediction(teacher, params, batch["z"], batch["t"], jnp.full((8,), 10))
  expected = (1 + w[:, None, None, None]) * cond - w[:, None, None, None] * uncond
  np.testing.assert_allclose(one_pass, expected, atol=1e-4)


def test_architecture_mismatch_names_first_differing_path(tiny):
  _, _, _, params, _, fresh = tiny
  other = traverse_util.flatten_dict(params, sep="/")
  other["class_embed/embedding"] = jnp.zeros((11, 128))  # e.g. a teacher with ch = 32
  other["time_dense_0/kernel"] = jnp.zeros((32, 128))
  other = traverse_util.unflatten_dict(other, sep="/")
  with pytest.raises(ValueError, match=r"mismatch at class_embed/embedding: teacher shape "
                                       r"\(11, 128\) vs student shape \(11, 64\)"):
    models.student_params_from_teacher(other, fresh)
  extra = dict(params, extra_layer={"kernel": jnp.zeros((2, 2))})
  with pytest.raises(ValueError, match="mismatch at extra_layer/kernel"):
    models.student_params_from_teacher(extra, fresh)


def test_w_without_embedding_and_missing_w_are_errors(tiny):
  _, teacher, student, params, batch, fresh = tiny
  with pytest.raises(ValueError, match="no w-embedding"):
    x_prediction(teacher, params, batch["z"], batch["t"], batch["labels"], jnp.zeros(8))
  with pytest.raises(ValueError, match="pass w"):
    x_prediction(student, fresh, batch["z"], batch["t"], batch["labels"])


@pytest.mark.parametrize("field,value,message", [
    ("model.attn_resolutions", (3,), "model.attn_resolutions contains \\[3\\]"),
    ("data.image_size", 7, "data.image_size=7 is not divisible"),
    ("model.num_groups", 5, "model.num_groups=5"),
    ("model.head_dim", 24, "model.head_dim=24"),
    ("model.dtype", "float16", "model.dtype"),
])
def test_impossible_model_sizes_are_refused(field, value, message):
  config = load_config("digits:runlocal")
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    models.build_unet(config)


def test_bfloat16_activations_and_remat_keep_results(tiny):
  config, teacher, _, params, batch, _ = tiny
  logsnr = schedules.cosine_logsnr(batch["t"])

  def loss(p, net):
    return jnp.mean(net.apply({"params": p}, batch["z"], logsnr, batch["labels"]) ** 2)

  remat_cfg = config.copy_and_resolve_references()
  remat_cfg.model.remat = True
  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g_ref = grad(params, teacher)
  g_remat = grad(params, models.build_unet(remat_cfg))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               g_ref, g_remat)

  bf_cfg = config.copy_and_resolve_references()
  bf_cfg.model.dtype = "bfloat16"
  apply = jax.jit(lambda net, p: net.apply({"params": p}, batch["z"], logsnr, batch["labels"]),
                  static_argnums=0)
  v32 = apply(teacher, params)
  v16 = apply(models.build_unet(bf_cfg), params)
  assert v16.dtype == jnp.float32
  scale = np.abs(v32).max()
  assert np.abs(v16 - v32).max() < 0.05 * scale


def test_forward_sharded_over_eight_devices_equals_one_device(tiny):
  assert jax.device_count() >= 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
  _, teacher, _, params, batch, _ = tiny
  logsnr = schedules.cosine_logsnr(batch["t"])
  fwd = jax.jit(lambda p, z, l, y: teacher.apply({"params": p}, z, l, y))
  single = fwd(params, batch["z"], logsnr, batch["labels"])
  mesh = sharding.make_mesh(8)
  sharded_inputs = [jax.device_put(x, sharding.batch_sharded(mesh))
                    for x in (batch["z"], logsnr, batch["labels"])]
  out = fwd(sharding.replicate(mesh, params), *sharded_inputs)
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(out, single, atol=1e-5)
