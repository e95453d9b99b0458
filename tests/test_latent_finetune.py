"""ε→v fine-tuning alone (``distill.latent.finetune``: the chain's ``teacher_v`` link) and the
diffusers-layout folder it exports."""

from __future__ import annotations

import hashlib
import json
import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from distill import config_utils, denoiser, family, input_pipeline, layout, losses, pipeline
from distill.latent import finetune, load_pretrained, weights

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "latent"


@pytest.mark.parametrize("folder,part", [("tiny-sd", "unet"), ("tiny-sd", "vae"),
                                         ("tiny-sd", "text_encoder"), ("unet-inpaint", None),
                                         ("tiny-cin", "vqvae"), ("unet-bf16", None)])
def test_export_like_gives_back_the_source_file(folder, part):
  """Loading then exporting returns every tensor of the file under its own key and layout
  (4-D convs, 1×1-conv attention stored as Linear, old attention names, bf16 → float32)."""
  models = load_pretrained(FIXTURES / folder)
  attr = part or "unet"
  params = getattr(models, f"{attr}_params")
  src = weights.safetensors_files(FIXTURES / folder / (part or ""))
  want = weights.read_safetensors(src)
  got = weights.export_like(params, src, what=attr,
                            key_prefix="text_model." if attr == "text_encoder" else "")
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def _config(**overrides):
  config = config_utils.load_config("ldm_cin256:runlocal")
  config.num_devices = 1
  config.teacher_v.num_train_steps = 30
  config.teacher_v.checkpoint_every = 30
  config.teacher_v.sample_every = 0
  for key, value in overrides.items():
    *sections, field = key.split(".")
    holder = config
    for section in sections:
      holder = holder[section]
    holder[field] = value
  return config


def _digest(folder: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _teacher_v_params(config, workdir):
  link = next(link for link in layout.chain(config) if link.name == "teacher_v")
  return jax.device_get(layout.read_final_params(config, workdir, link,
                                                 pipeline.make_mesh(config)))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("v")
  config = _config()
  out = finetune.run(config, str(workdir))
  return config, workdir, pathlib.Path(out)


def test_exported_teacher_folder(finetuned):
  config, workdir, out = finetuned
  assert out == workdir / "teacher_v" / "diffusers"
  manifest = json.loads((workdir / "manifest.json").read_text())
  assert sorted(manifest["stages"]) == ["teacher_v"]  # only the link; the teacher is imported
  src = pathlib.Path(config.teacher.pretrained)
  sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
  assert sched.pop("prediction_type") == "v_prediction"
  src_sched = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
  assert src_sched.pop("prediction_type") == "epsilon" and sched == src_sched
  # Every other part is the source's, byte for byte.
  for part in ("vqvae", "class_embedder"):
    assert _digest(out / part) == _digest(src / part)
  models, source = load_pretrained(out), load_pretrained(src)
  assert models.prediction_type == "v_prediction"
  trained = _teacher_v_params(config, workdir)
  for a, b in zip(jax.tree.leaves(models.unet_params), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Every parameter moved, except those a one-token context leaves without gradient: the
  # cross-attention softmax over one key is 1, so attn2's query/key and norm2 (feeding only the
  # query) cannot change the output.
  new, old = (traverse_util.flatten_dict(p) for p in (models.unet_params, source.unet_params))
  unchanged = {"/".join(k[-2:]) for k in new if np.array_equal(new[k], old[k])}
  moved = {"/".join(k[-2:]) for k in new if not np.array_equal(new[k], old[k])}
  assert unchanged == {"to_q/kernel", "to_k/kernel", "norm2/scale", "norm2/bias"}
  assert all(k[-3] == "attn2" or k[-2] == "norm2" for k in new if np.array_equal(new[k], old[k]))
  assert {"to_q/kernel", "to_k/kernel", "to_v/kernel", "conv_in/kernel"} <= moved  # attn1's


def test_the_export_is_the_chains_v_teacher(finetuned):
  """Imported as ``teacher.pretrained`` without a teacher_v link, the folder is read as a
  v-prediction teacher whose x̂ is the chain's fine-tuned teacher's."""
  config, workdir, out = finetuned
  chain_fam = family.of(config)
  reimported = _config(**{"teacher.pretrained": str(out), "teacher_v.num_train_steps": 0,
                          "stages": "teacher,stage_one,stage_two"})
  from distill import config_validation  # pylint: disable=import-outside-toplevel
  config_validation.validate(reimported, str(workdir / "next"), num_devices=1)
  fam = family.of(reimported)
  assert fam.teacher_prediction == "v_prediction" and fam is not chain_fam
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((4,) + fam.x_shape), jnp.float32)
  cond = fam.cond_from_labels(rng.integers(0, 10, 4))
  params = _teacher_v_params(config, workdir)
  for t in (0.9, 0.4, 0.05):
    got = denoiser.denoise_fn(fam, fam.init_teacher(None), cond, net=fam.teacher)(z, t)
    want = denoiser.denoise_fn(chain_fam, params, cond, net=chain_fam.teacher)(z, t)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_finetuning_lowers_the_v_loss(finetuned):
  """On held-out batches (fixed keys), the fine-tuned U-Net's v-objective is below the
  ε-teacher's, whose output is not a v-prediction."""
  config, workdir, _ = finetuned
  fam = family.of(config)
  objective = jax.jit(losses.teacher_objective(fam, p_uncond=0.1))
  images, labels = input_pipeline.digits_arrays("held_out")
  batches = fam.prepare_batches(grain.MapDataset.source(
      [{"image": images[64 * i:64 * (i + 1)], "label": labels[64 * i:64 * (i + 1)]}
       for i in range(4)]))
  tuned = _teacher_v_params(config, workdir)
  values = {"before": [], "after": []}
  for i in range(4):
    key = jax.random.key(100 + i)
    values["before"].append(float(objective(fam.models.unet_params, None, batches[i], key)[0]))
    values["after"].append(float(objective(tuned, None, batches[i], key)[0]))
  assert np.mean(values["after"]) < 0.8 * np.mean(values["before"]), values


def test_rerun_returns_the_finished_teacher(finetuned):
  config, workdir, out = finetuned
  before = _digest(workdir)
  assert pathlib.Path(finetune.run(config, str(workdir))) == out
  assert _digest(workdir) == before


def test_config_errors(tmp_path):
  pixel = config_utils.load_config("digits:runlocal")
  with pytest.raises(ValueError, match="must be a latent config with a teacher_v section"):
    finetune.run(pixel, str(tmp_path))
  with pytest.raises(ValueError, match="must be a latent config with a teacher_v section"):
    finetune.run(_config(**{"teacher_v.num_train_steps": 0}), str(tmp_path))
  with pytest.raises(ValueError, match="teacher_v.weighting='mse'"):
    finetune.run(_config(**{"teacher_v.weighting": "mse"}), str(tmp_path))
  assert not list(tmp_path.iterdir())  # refused before anything was written
