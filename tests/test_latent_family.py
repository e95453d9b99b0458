"""The latent denoiser family (distill/latent/family.py) on the tiny fixtures' random weights.

Oracles: diffusers' own guidance-weight embedding and DDIM scheduler, the fixtures' teacher as
``LatentModels.denoise_fn`` wraps it (an independent path from the network to x̂), and the
ε/v/x algebra in float64.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import denoiser, family, guidance, layout, losses
from distill.config_utils import load_config
from distill.latent import family as latent_family
from distill.latent import teacher as teacher_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def _config(name, **overrides):
  config = load_config(f"{name}:runlocal")
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


@pytest.fixture(scope="module", params=["sd15", "ldm_cin256"])
def fam(request):
  """The runlocal chain's family: the teacher_v link makes the teacher network a v-predictor."""
  return family.of(_config(request.param))


@pytest.fixture(scope="module", params=["sd15", "ldm_cin256"])
def fam_eps(request):
  """Without teacher_v the teacher is read as the folder's ε-prediction model."""
  return family.of(_config(request.param, **{"teacher_v.num_train_steps": 0}))


def _randomised_student(fam, teacher_params, seed=1):
  params = fam.student_from_teacher(teacher_params, None)
  kernel = params["time_embedding_cond_proj"]["kernel"]
  random = jax.random.normal(jax.random.key(seed), kernel.shape) * 0.5
  return {**params, "time_embedding_cond_proj": {"kernel": random}}


def _batch(fam, b, seed=0):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.standard_normal((b,) + fam.x_shape), jnp.float32)
  cond = fam.cond_from_labels(rng.integers(0, 10, b))
  return z, cond


def test_guidance_embedding_is_diffusers():
  pipelines = pytest.importorskip("diffusers.pipelines.latent_consistency_models."
                                  "pipeline_latent_consistency_text2img")
  torch = pytest.importorskip("torch")
  w = np.array([0.0, 0.5, 2.0, 7.0, 14.0], np.float32)
  for dim in (32, 256):
    want = pipelines.LatentConsistencyModelPipeline.get_guidance_scale_embedding(
        None, torch.tensor(w), embedding_dim=dim).numpy()
    got = np.asarray(latent_family.guidance_embedding(w, dim))
    # float32 arguments up to 1000·w = 14 000 carry ~1e-3 of rounding, so sin/cos agree to that;
    # a wrong frequency, scale or [sin, cos] order is off by O(1).
    np.testing.assert_allclose(got, want, atol=5e-3)


def test_the_family_reads_the_folder(fam):
  models = fam.models
  assert fam.student.config.time_cond_proj_dim == 32 and fam.teacher.config.time_cond_proj_dim is None
  assert models.prediction_type == "epsilon" and fam.teacher_prediction == "v_prediction"
  latents = fam.encode_images(np.zeros((2, 8, 8, 1), np.float32))
  assert latents.shape[1:] == fam.x_shape
  table = fam.context_table
  assert table.shape[0] == 11  # ten classes and the null condition
  if fam.conditioning == "text":  # the null condition is the empty prompt's context
    np.testing.assert_allclose(table[-1], np.asarray(models.encode_prompt([""]))[0], atol=1e-6)
    # The table encodes eleven prompts in one batch, this one prompt alone: float32 rounding
    # that depends on the batch (1.4e-6 with XLA's YNNPACK fusions, on the suite's 8 devices).
    np.testing.assert_allclose(table[3], np.asarray(models.encode_prompt(
        ["a handwritten digit three"]))[0], atol=1e-5)
  else:  # the class embedder's rows, the null class last
    np.testing.assert_allclose(table, np.asarray(models.encode_class(np.arange(11)))[:, ],
                               atol=1e-6)


def test_teacher_x_prediction_is_the_folders_denoiser(fam_eps):
  """x̂ through the family (network → v → x̂) equals LatentModels.denoise_fn (network → ε → x̂)."""
  fam = fam_eps
  assert fam.teacher_prediction == "epsilon"
  z, cond = _batch(fam, 4)
  ours = jax.jit(lambda p, z, t: denoiser.denoise_fn(fam, p, cond, net=fam.teacher)(z, t))
  for t in (0.999, 0.5, 0.02):
    got = ours(fam.models.unet_params, z, jnp.float32(t))
    want = fam.models.denoise_fn(cond)(z, jnp.full((4,), t))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_student_at_initialisation_is_the_teacher_for_every_w(fam):
  """cond_proj starts at zero: the student is the teacher's conditional model at every w; with
  a random cond_proj (the wiring this checks) the prediction depends on w."""
  teacher_params = fam.models.unet_params
  student_params = fam.student_from_teacher(teacher_params, None)
  z, cond = _batch(fam, 3)
  t = jnp.asarray([0.9, 0.5, 0.1])
  want = jax.jit(lambda p: denoiser.x_prediction(fam, fam.teacher, p, z, t, cond))(teacher_params)
  student = jax.jit(lambda p, w: denoiser.x_prediction(fam, fam.student, p, z, t, cond, w))
  for w in (0.0, 2.0, 7.0):
    got = student(student_params, jnp.full((3,), w))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  random = _randomised_student(fam, teacher_params)
  at = lambda w: student(random, jnp.full((3,), w))
  assert float(jnp.max(jnp.abs(at(0.0) - at(7.0)))) > 1e-3


def test_v_from_prediction_algebra():
  rng = np.random.default_rng(0)
  x, eps = rng.standard_normal((2, 3, 4, 4, 2))
  logsnr = np.array([-4.0, 0.3, 6.0])
  alpha = np.sqrt(1 / (1 + np.exp(-logsnr)))[:, None, None, None]
  sigma = np.sqrt(1 / (1 + np.exp(logsnr)))[:, None, None, None]
  z, v = alpha * x + sigma * eps, alpha * eps - sigma * x
  f = lambda out, kind: np.asarray(latent_family._v_from_prediction(  # pylint: disable=protected-access
      jnp.asarray(z, jnp.float32), jnp.asarray(out, jnp.float32), jnp.asarray(logsnr, jnp.float32),
      kind))
  for out, kind in ((eps, "epsilon"), (x, "sample"), (v, "v_prediction")):
    np.testing.assert_allclose(f(out, kind), v, atol=2e-5)


def test_stage_two_objective_is_two_ddim_steps_of_diffusers(fam):
  """Algorithm 2 on the discrete schedule: per example, the teacher's two DDIM steps by
  diffusers' DDIMScheduler ("trailing" timesteps, v-prediction), the target x̃ solved from them
  in float64, and the objective's x_mse against that target; N = 4, so every time is an integer
  timestep."""
  diffusers = pytest.importorskip("diffusers")
  torch = pytest.importorskip("torch")
  n, b = 4, 8
  teacher_params = _randomised_student(fam, fam.models.unet_params, seed=2)
  # The student as stage two starts it (its teacher's weights), so that x_mse measures how far
  # two teacher steps are from one, and an error in the target shows.
  student_params = teacher_params
  x, cond = _batch(fam, b, seed=4)
  key = jax.random.key(7)
  objective = losses.stage_two_objective(fam, w_min=0.0, w_max=8.0, for_stochastic=False)
  _, metrics = jax.jit(objective)(student_params, {"params": teacher_params,
                                                   "num_student_steps": jnp.asarray(n)},
                                  {"latents": x, "context": cond}, key)

  # The objective's draws, replicated.
  k_t, k_eps, k_w, _ = jax.random.split(key, 4)
  t = losses.stage_two_times(k_t, b, n, for_stochastic=False)
  w = guidance.sample_w(k_w, b, 0.0, 8.0)
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  from distill import diffusion  # pylint: disable=import-outside-toplevel
  z = diffusion.diffuse(x, eps, fam.logsnr_fn(t))
  assert set(np.round(np.asarray(t) * n).astype(int)) > {2}  # several start times drawn

  # diffusers builds the schedule from the folder's scheduler_config.json itself.
  sched = diffusers.DDIMScheduler.from_pretrained(
      str(fam.models.path / "scheduler"), prediction_type="v_prediction",
      timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
  abar = sched.alphas_cumprod.numpy().astype(np.float64)
  sched.set_timesteps(2 * n)
  assert list(sched.timesteps.numpy()) == [999 - 125 * k for k in range(8)]
  v_jit = jax.jit(lambda p, zz, tt, c, ww: fam.v_hat(fam.student, p, zz, tt, c, ww))
  v_net = lambda zz, tt, c, ww: np.asarray(v_jit(teacher_params, zz, tt, c, ww))
  targets = []
  for i in range(b):
    zi, ci, wi = z[i:i + 1], cond[i:i + 1], w[i:i + 1]
    step = int(round(float(t[i]) * 1000)) - 1
    t_mid = float(t[i]) - 0.5 / n
    v1 = v_net(zi, t[i:i + 1], ci, wi)
    z_mid = sched.step(torch.tensor(v1, dtype=torch.float64), step,
                       torch.tensor(np.asarray(zi), dtype=torch.float64), eta=0.0).prev_sample
    v2 = v_net(jnp.asarray(z_mid.numpy(), jnp.float32), jnp.asarray([t_mid]), ci, wi)
    out = sched.step(torch.tensor(v2, dtype=torch.float64), step - 1000 // (2 * n), z_mid,
                     eta=0.0)
    if step - 1000 // n < 0:  # the last student step: the teacher's x̂ at t'
      targets.append(out.pred_original_sample.numpy())
      continue
    a_t, a_e = abar[step], abar[step - 1000 // n]
    ratio = np.sqrt((1 - a_e) / (1 - a_t))
    z_t = np.asarray(zi, np.float64)
    targets.append((out.prev_sample.numpy() - ratio * z_t) / (np.sqrt(a_e) - ratio * np.sqrt(a_t)))
  target = np.concatenate(targets)

  got = jax.jit(lambda p: losses.stage_two_target(denoiser.denoise_fn(fam, p, cond, w), z, t, n,
                                                  logsnr_fn=fam.logsnr_fn))(teacher_params)
  np.testing.assert_allclose(np.asarray(got), target, rtol=1e-3, atol=1e-3)
  x_pred = np.asarray(jax.jit(lambda p: denoiser.x_prediction(fam, fam.student, p, z, t, cond, w))(
      student_params))
  want = np.mean(np.mean((x_pred - target) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(float(metrics["x_mse"]), want, rtol=1e-3)


def test_teacher_v_reads_the_network_as_v(fam):
  fam_v = fam
  assert fam_v.teacher_prediction == "v_prediction"
  z, cond = _batch(fam_v, 2)
  t = jnp.asarray([0.7, 0.3])
  both = jax.jit(lambda p: (fam_v.teacher.apply({"params": p}, z, fam_v.schedule.timestep(t), cond),
                            fam_v.v_hat(fam_v.teacher, p, z, t, cond)))
  out, v = both(fam_v.models.unet_params)
  np.testing.assert_allclose(np.asarray(v), np.asarray(out), atol=1e-6)
  assert teacher_lib.check_prediction_type(fam_v.teacher_prediction)


@pytest.mark.parametrize("name", ["sd15", "ldm_cin256"])
def test_the_teacher_link_is_read_as_its_folder_says(name):
  """With a teacher_v link the chain reads the teacher network as v, but the teacher link itself
  (the imported ε-model, sampled as the report's teacher) is read as ε: x̂ = (z − σ·ε̂)/α from the
  network's raw output, by hand here."""
  config = _config(name)
  fam_v, fam_t = family.of(config), family.of_link(config, "teacher")
  assert fam_v.teacher_prediction == "v_prediction"
  assert family.of_link(config, "teacher_v") is fam_v
  assert fam_t.teacher_prediction == "epsilon"
  z, cond = _batch(fam_t, 2)
  t = jnp.asarray([0.8, 0.3])
  params = fam_t.models.unet_params
  eps = fam_t.teacher.apply({"params": params}, z, fam_t.schedule.timestep(t), cond)
  alpha2 = jax.nn.sigmoid(fam_t.schedule.logsnr(t))[:, None, None, None]
  want = (z - jnp.sqrt(1 - alpha2) * eps) / jnp.sqrt(alpha2)
  got = denoiser.x_prediction(fam_t, fam_t.teacher, params, z, t, cond)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_prepare_batches_encodes_resized_images(fam):
  from distill import input_pipeline  # pylint: disable=import-outside-toplevel
  config = _config("sd15" if fam.conditioning == "text" else "ldm_cin256")
  batches = input_pipeline.train_batches(config.data, global_batch_size=4, seed=0)
  raw, mapped = batches[0], fam.prepare_batches(batches)[0]
  images = jax.image.resize(jnp.asarray(raw["image"]), (4, 16, 16, 1), "bilinear")
  want = fam.models.encode_image(jnp.repeat(images, 3, axis=-1))
  np.testing.assert_allclose(mapped["latents"], np.asarray(want), atol=1e-5)
  np.testing.assert_array_equal(mapped["context"], fam.context_table[raw["label"]])


def _sd15_folder(root):
  """A full-size SD 1.5 folder of config files only (the published configs; no weights)."""
  from distill.latent import reference_configs as ref  # pylint: disable=import-outside-toplevel
  return pathlib.Path(ref.write_sd15_layout(
      root, tokenizer=REPO / "tests" / "fixtures" / "latent" / "tiny-sd" / "tokenizer"))


def test_full_size_sd15_builds_and_lowers_its_training_steps(tmp_path):
  """configs/sd15.py on a full-size SD 1.5 layout: the family and the stage-one and stage-two
  train steps build and lower on abstract shapes (per-chip batch 1; nothing is allocated)."""
  from distill import sharding, train  # pylint: disable=import-outside-toplevel
  config = load_config("sd15")
  config.teacher.pretrained = str(_sd15_folder(tmp_path / "sd15"))
  fam_sd = latent_family.from_config(config, shapes_only=True)
  assert fam_sd.x_shape == (64, 64, 4) and fam_sd.context_table.shape == (1, 77, 768)
  assert fam_sd.student.config.time_cond_proj_dim == 256
  teacher = fam_sd.models.unet_params
  n_params = sum(x.size for x in jax.tree.leaves(teacher))
  assert 859e6 < n_params < 860e6  # SD 1.5's U-Net
  mesh = sharding.make_mesh(1)
  batch = {"latents": jax.ShapeDtypeStruct((1, 64, 64, 4), jnp.float32),
           "context": jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)}
  w = dict(w_min=config.stage_one.w_min, w_max=config.stage_one.w_max)
  for objective, section, frozen in (
      (losses.stage_one_objective(fam_sd, **w), config.stage_one, teacher),
      (losses.stage_two_objective(fam_sd, **w), layout.halving_section(config, 4),
       {"params": jax.eval_shape(lambda p: fam_sd.student_from_teacher(p, None), teacher),
        "num_student_steps": jax.ShapeDtypeStruct((), jnp.int32)})):
    tx, schedule = train.make_optimizer(section)
    step = train.make_train_step(objective, tx, schedule, ema_decay=section.ema_decay, mesh=mesh)
    state = jax.eval_shape(lambda p, tx=tx: train.init_state(fam_sd.student_from_teacher(p, None),
                                                             tx), teacher)
    lowered = step.lower(state, frozen, batch, jax.random.key(0))
    assert lowered.cost_analysis()["flops"] > 1e12  # SD's U-Net at 64×64 latents, with gradients


def test_latent_dtype_remat_and_attention_reach_every_network():
  """``latent.dtype``, ``latent.remat`` and ``latent.attention`` build the teacher and the student
  with them; in bfloat16 the teacher's output stays within bfloat16 rounding of float32's, and
  a bad value is one line."""
  config = load_config("sd15:runlocal")
  base = latent_family.from_config(config)
  config.latent.update(dtype="bfloat16", remat=True, attention="chunked")
  fam = latent_family.from_config(config)
  for net in (fam.teacher, fam.student):
    assert (net.dtype, net.remat, net.attention) == (jnp.bfloat16, True, "chunked")
  assert fam.models.vae.dtype == jnp.bfloat16
  z = jax.random.normal(jax.random.key(0), (2, *fam.x_shape))
  ctx = jnp.broadcast_to(base.context_table[:1], (2, *base.context_table.shape[1:]))
  f32 = base.models.unet_apply(z, jnp.array([500.0, 100.0]), ctx)
  b16 = fam.models.unet_apply(z, jnp.array([500.0, 100.0]), ctx)
  scale = float(jnp.abs(f32).max())
  assert scale > 0.1 and float(jnp.abs(b16 - f32).max()) < 0.05 * scale
  config.latent.dtype = "float16"
  with pytest.raises(ValueError, match=r"^latent\.dtype='float16' is not one of \['float32', "
                                       r"'bfloat16'\]\.$"):
    latent_family.from_config(config)
