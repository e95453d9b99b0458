"""ε→v fine-tuning stage (``distill.latent.finetune``) and the U-Net export it writes."""

from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from distill import checkpoints, config_utils, input_pipeline
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
  config = config_utils.load_config("latent_v:runlocal")
  config.v_finetune.num_train_steps = 30
  config.v_finetune.checkpoint_every = 30
  for key, value in overrides.items():
    parts = key.split(".")
    section = config
    for p in parts[:-1]:
      section = section[p]
    section[parts[-1]] = value
  return config


def _digest(folder: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("v")
  config = _config()
  out = finetune.run(config, workdir)
  return config, workdir, pathlib.Path(out)


def test_finetuned_teacher_folder(finetuned):
  config, workdir, out = finetuned
  src = pathlib.Path(config.pretrained)
  sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
  assert sched.pop("prediction_type") == "v_prediction"
  src_sched = json.loads((src / "scheduler" / "scheduler_config.json").read_text())
  assert src_sched.pop("prediction_type") == "epsilon" and sched == src_sched
  # Every other part is the source's, byte for byte.
  for part in ("vqvae", "class_embedder"):
    assert _digest(out / part) == _digest(src / part)
  models = load_pretrained(out)
  assert models.prediction_type == "v_prediction"
  source = load_pretrained(src)
  step, trained = checkpoints.read_params(workdir / "v_finetune" / "checkpoints",
                                    jax.eval_shape(lambda: source.unet_params), what="v_finetune")
  assert step == 30
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


def test_finetuning_lowers_the_v_loss(finetuned):
  """On held-out batches (fixed keys), the fine-tuned U-Net's v-objective is below the
  ε-teacher's, whose output is not a v-prediction."""
  config, _, out = finetuned
  source, tuned = load_pretrained(config.pretrained), load_pretrained(out)
  objective = jax.jit(finetune.make_objective(source, config))
  frozen = {"first_stage": source.vqvae_params,
            "contexts": jnp.asarray(finetune.context_table(source, config))}
  images, labels = input_pipeline.digits_arrays("held_out")
  losses = {"before": [], "after": []}
  for i in range(4):
    batch = {"image": jnp.asarray(images[64 * i:64 * (i + 1)]),
             "label": jnp.asarray(labels[64 * i:64 * (i + 1)])}
    key = jax.random.key(100 + i)
    losses["before"].append(float(objective(source.unet_params, frozen, batch, key)[0]))
    losses["after"].append(float(objective(tuned.unet_params, frozen, batch, key)[0]))
  assert np.mean(losses["after"]) < 0.8 * np.mean(losses["before"]), losses


def test_rerun_returns_the_finished_teacher(finetuned):
  config, workdir, out = finetuned
  before = _digest(workdir)
  assert pathlib.Path(finetune.run(config, workdir)) == out
  assert _digest(workdir) == before


def test_context_tables():
  config = _config()
  cin = load_pretrained(config.pretrained)
  table = finetune.context_table(cin, config)
  assert table.shape == (11, 1, 12)
  np.testing.assert_array_equal(table[10, 0], np.asarray(cin.class_embedder_params["embedding"]["embedding"])[10])
  sd = load_pretrained(FIXTURES / "tiny-sd")
  text = _config(conditioning="text", class_names=tuple(f"digit {i}" for i in range(10)))
  table = finetune.context_table(sd, text)
  assert table.shape[0] == 11
  np.testing.assert_allclose(table[3], np.asarray(sd.encode_prompt(["a photo of a digit 3"]))[0],
                             atol=1e-5)
  np.testing.assert_allclose(table[10], np.asarray(sd.encode_prompt([""]))[0], atol=1e-5)


def test_config_errors(finetuned, tmp_path):
  _, _, out = finetuned
  cases = [
      (dict(pretrained=""), "pretrained is empty"),
      (dict(pretrained=str(tmp_path)), "no model_index.json"),
      (dict(pretrained=str(out)), "prediction_type is 'v_prediction'"),
      (dict(conditioning="clip"), "conditioning='clip'"),
      (dict(weighting="mse"), "weighting='mse'"),
      (dict(p_uncond=1.0), "p_uncond=1.0"),
      (dict(**{"v_finetune.batch_size": 12}), "batch_size"),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      finetune.check_config(_config(**overrides), num_devices=8)
  cin = load_pretrained(_config().pretrained)
  with pytest.raises(ValueError, match="data.num_classes=9, but the class embedder has 11 rows"):
    finetune.context_table(cin, _config(**{"data.num_classes": 9}))
  with pytest.raises(ValueError, match="conditioning='text' but .* no text_encoder"):
    finetune.context_table(cin, _config(conditioning="text"))


def test_text_conditioned_objective_on_a_kl_autoencoder():
  """The SD path: a KL-VAE posterior draw and text contexts. With ``p_uncond = 1`` every
  example gets the empty prompt's context, so the loss cannot depend on the labels."""
  sd = load_pretrained(FIXTURES / "tiny-sd")
  images, labels = input_pipeline.digits_arrays("held_out")
  batch = {"image": jnp.asarray(images[:4]), "label": jnp.asarray(labels[:4])}
  other = dict(batch, label=(batch["label"] + 1) % 10)
  values = {}
  for p_uncond in (0.0, 1.0 - 1e-7):
    config = _config(conditioning="text", p_uncond=p_uncond)
    frozen = {"first_stage": sd.vae_params,
              "contexts": jnp.asarray(finetune.context_table(sd, config))}
    fn = jax.jit(jax.value_and_grad(lambda p, b, c=config, f=frozen: finetune.make_objective(
        sd, c)(p, f, b, jax.random.key(0))[0]))
    (loss, grads), (loss_other, _) = fn(sd.unet_params, batch), fn(sd.unet_params, other)
    assert np.isfinite(float(loss)) and float(optax.tree.norm(grads)) > 0
    values[p_uncond] = (float(loss), float(loss_other))
  assert values[0.0][0] != values[0.0][1]
  assert values[1.0 - 1e-7][0] == values[1.0 - 1e-7][1]
