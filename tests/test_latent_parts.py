"""The parts of a text-to-image teacher trained here (distill/latent/parts.py): PyTorch names of
our parameters against files diffusers and transformers wrote, folders we write loaded by
diffusers and transformers, the BPE tokenizer against transformers' CLIPTokenizer, the losses
against closed forms, and the chain's first links on the emoji data."""

import csv
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import config_validation, denoiser, layout, losses, pipeline, sample
from distill.config_utils import load_config
from distill.latent import clip_loader, export, parts, pretrained, vae, weights
from distill.latent import tokenizer as tokenizer_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "latent"
EMOJI = f"{REPO / 'configs' / 'emoji.py'}:runlocal"


def _file_tensors(folder, prefix=""):
  tensors = weights.read_safetensors(weights.safetensors_files(folder))
  out = {}
  for key, value in tensors.items():
    if key in weights.IGNORED or prefix + key in weights.IGNORED:
      continue
    out[weights.rename_old_keys(key if key.startswith(prefix) or not prefix
                                else prefix + key)] = value
  return out


@pytest.mark.parametrize("folder,part,prefix", [
    ("tiny-sd", "vae", ""), ("tiny-sd", "unet", ""), ("tiny-sd", "text_encoder", "text_model."),
    ("tiny-cin", "vqvae", ""), ("tiny-cin", "unet", ""), ("unet-lcm", None, "")])
def test_torch_names_and_layouts_are_the_files(folder, part, prefix):
  """Every tensor of a file diffusers or transformers wrote, back from the Flax tree it loaded
  into: the same keys (current attention names) and the same values in the file's layout."""
  models = pretrained.load_pretrained(FIXTURES / folder)
  params = {"vae": models.vae_params, "unet": models.unet_params, "vqvae": models.vqvae_params,
            "text_encoder": models.text_encoder_params, None: models.unet_params}[part]
  path = FIXTURES / folder / part if part else FIXTURES / folder
  want = _file_tensors(path, prefix)
  got = weights.torch_tensors(params)
  assert set(got) == set(want)
  for key, value in want.items():
    assert got[key].shape == value.shape, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_torch_names_of_a_whole_clip():
  model = clip_loader.load(FIXTURES / "clip-tiny")
  want = _file_tensors(FIXTURES / "clip-tiny")
  got = weights.torch_tensors({**model.vision_params, **model.text_params})
  assert set(want) - set(got) == {"logit_scale"} and set(got) <= set(want)
  for key, value in got.items():
    np.testing.assert_array_equal(value, want[key], err_msg=key)


def test_an_unknown_module_name_is_refused():
  with pytest.raises(weights.WeightsError, match="no known PyTorch name for 'my_layer'"):
    weights.torch_name(("down_blocks_0_my_layer", "kernel"))


def _same_config(ours, theirs, written: dict):
  """Every field we wrote reads back in diffusers as the fixture's own config has it (diffusers'
  attention_head_dim: one number for all blocks, or one per block)."""
  for key in written:
    if key.startswith("_"):
      continue
    a, b = ours.config[key], theirs.config[key]
    if key == "attention_head_dim" and isinstance(b, int):
      b = [b] * len(theirs.config["block_out_channels"])
    a, b = (list(v) if isinstance(v, (list, tuple)) else v for v in (a, b))
    assert a == b, (key, a, b)


def _same_state(ours, theirs):
  a, b = ours.state_dict(), theirs.state_dict()
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)


def test_written_folders_load_strictly_in_diffusers_and_transformers(tmp_path):
  """vae/, unet/ and text_encoder/ written from our parameters and config dataclasses: diffusers
  and transformers load them with no missing or unexpected key, into the modules they load from
  the files they wrote themselves."""
  diffusers = pytest.importorskip("diffusers")
  transformers = pytest.importorskip("transformers")
  src = FIXTURES / "tiny-sd"
  models = pretrained.load_pretrained(src)
  vae_cfg = vae.VAEConfig.from_diffusers(json.loads((src / "vae" / "config.json").read_text()))
  export.write_model(tmp_path / "vae", export.vae_config(vae_cfg), models.vae_params)
  unet_cfg = models.unet.config
  export.write_model(tmp_path / "unet", export.unet_config(unet_cfg), models.unet_params)
  text = json.loads((src / "text_encoder" / "config.json").read_text())
  export.write_model(tmp_path / "text_encoder", export.text_encoder_config(
      models.text_encoder.config, bos=text["bos_token_id"], eos=text["eos_token_id"],
      pad=text["pad_token_id"]), models.text_encoder_params, filename=export.TRANSFORMERS_FILE)
  for cls, part in ((diffusers.AutoencoderKL, "vae"), (diffusers.UNet2DConditionModel, "unet")):
    ours, info = cls.from_pretrained(tmp_path / part, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], (part, info)
    theirs = cls.from_pretrained(src / part)
    _same_config(ours, theirs, json.loads((tmp_path / part / "config.json").read_text()))
    _same_state(ours, theirs)
  ours, info = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder",
                                                          output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  _same_state(ours, transformers.CLIPTextModel.from_pretrained(src / "text_encoder"))
  # And our own loader reads them back to the same parameters.
  again = pretrained.load_unet(tmp_path / "unet")[1]
  jax.tree.map(np.testing.assert_array_equal, again, models.unet_params)


def test_a_written_clip_folder_loads_in_transformers_and_ours(tmp_path):
  transformers = pytest.importorskip("transformers")
  src = FIXTURES / "clip-tiny"
  model = clip_loader.load(src)
  meta = json.loads((src / "config.json").read_text())
  tensors = {**model.vision_params, **model.text_params,
             "logit_scale": _file_tensors(src)["logit_scale"]}
  text = meta["text_config"]
  export.write_model(tmp_path, export.clip_config(
      model.vision.config, model.text.config, projection_dim=meta["projection_dim"],
      bos=text["bos_token_id"], eos=text["eos_token_id"], pad=text["pad_token_id"]),
                     tensors, filename=export.TRANSFORMERS_FILE)
  tokenizer_lib.copy_files(src, tmp_path)
  ours, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  _same_state(ours, transformers.CLIPModel.from_pretrained(src))
  again = clip_loader.load(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, again.text_params, model.text_params)
  jax.tree.map(np.testing.assert_array_equal, again.vision_params, model.vision_params)


@pytest.fixture(scope="module")
def emoji_captions():
  from distill import emoji_data  # pylint: disable=import-outside-toplevel
  return (emoji_data.EmojiSource(16, "train").captions,
          emoji_data.EmojiSource(16, "held_out").captions)


def test_trained_tokenizer_is_deterministic_and_read_by_transformers(tmp_path, emoji_captions):
  """The BPE tokenizer of the training captions, written twice, is the same file; transformers'
  CLIPTokenizer built from its vocab.json and merges.txt alone (not our tokenizer.json) encodes
  the held-out captions to our ids."""
  transformers = pytest.importorskip("transformers")
  train, held = emoji_captions
  for name in ("a", "b"):
    tokenizer_lib.save(tokenizer_lib.train_bpe(train, 1024), tmp_path / name, max_length=16)
  assert (tmp_path / "a" / "tokenizer.json").read_text() == \
      (tmp_path / "b" / "tokenizer.json").read_text()
  ours = tokenizer_lib.CLIPTokenizer(tmp_path / "a", 16)
  bpe_only = tmp_path / "bpe_only"
  bpe_only.mkdir()
  for name in ("vocab.json", "merges.txt"):
    (bpe_only / name).write_text((tmp_path / "a" / name).read_text(encoding="utf-8"),
                                 encoding="utf-8")
  theirs = transformers.CLIPTokenizer.from_pretrained(bpe_only)
  want = theirs(held, padding="max_length", max_length=16, truncation=True).input_ids
  np.testing.assert_array_equal(ours(held), np.asarray(want))
  assert ours.eos_id == ours.vocab_size - 1 and ours.bos_id == ours.vocab_size - 2
  assert max(int((row != ours.pad_id).sum()) for row in ours(train)) <= 16


def test_contrastive_loss_closed_form():
  """Two orthogonal unit pairs at temperature s: log(1 + e^−s) when matched, log(1 + e^s)
  when the captions are swapped."""
  s = 2.5
  img = jnp.asarray([[3.0, 0.0], [0.0, 0.5]])
  matched = jnp.asarray([[1.0, 0.0], [0.0, 2.0]])
  loss, acc = parts.contrastive_loss(img, matched, jnp.log(s))
  np.testing.assert_allclose(loss, np.log1p(np.exp(-s)), rtol=1e-5)
  assert acc == 1.0
  loss, acc = parts.contrastive_loss(img, matched[::-1], jnp.log(s))
  np.testing.assert_allclose(loss, np.log1p(np.exp(s)), rtol=1e-5)
  assert acc == 0.0
  clipped, _ = parts.contrastive_loss(img, matched, jnp.log(1000.0))
  np.testing.assert_allclose(clipped, np.log1p(np.exp(-100.0)), atol=1e-30)


def test_kl_term_is_the_gaussian_kl():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  mean, logvar = rng.normal(size=(3, 2, 2, 4)), rng.normal(size=(3, 2, 2, 4))
  want = torch.distributions.kl_divergence(
      torch.distributions.Normal(torch.tensor(mean), torch.tensor(np.exp(0.5 * logvar))),
      torch.distributions.Normal(0.0, 1.0)).numpy().mean(axis=(1, 2, 3))
  np.testing.assert_allclose(parts.kl_to_standard_normal(jnp.asarray(mean), jnp.asarray(logvar)),
                             want, rtol=1e-5)


def test_psnr():
  x = np.zeros((2, 4, 4, 3))
  y = x.copy()
  y[0] += 0.2  # [−1, 1] → [0, 1]: an error of 0.1, MSE 0.01, 20 dB
  y[1] += 0.02  # 40 dB
  np.testing.assert_allclose(parts.psnr_of(x, y), 30.0, rtol=1e-9)


def test_the_chain_trains_the_parts_then_the_teacher_from_them(emoji_run):
  """configs/emoji.py:runlocal: the autoencoder, the two CLIPs and the tokenizer are trained and
  written; parts/ holds them as one diffusers-layout folder with the U-Net at its
  initialisation, the teacher trains from it, and a rerun trains nothing."""
  config, workdir = emoji_run
  mesh = pipeline.make_mesh(config)
  links = {link.name: link for link in layout.chain(config)}
  assert [name for name in links][:4] == ["autoencoder", "clip", "clip_eval", "teacher"]
  final = lambda name: jax.device_get(layout.read_final_params(config, workdir, links[name],
                                                               mesh))
  folder = pretrained.load_pretrained(workdir / "parts")
  jax.tree.map(np.testing.assert_array_equal, folder.vae_params, final("autoencoder"))
  clip, clip_eval = final("clip"), final("clip_eval")
  text = {k: v for k, v in clip["text"].items() if k != "text_projection"}
  jax.tree.map(np.testing.assert_array_equal, folder.text_encoder_params, text)
  assert not np.allclose(clip["text"]["text_projection"]["kernel"],
                         clip_eval["text"]["text_projection"]["kernel"])  # another seed
  # The evaluator is a whole CLIP folder with the same tokenizer.
  evaluator = clip_loader.load(workdir / "clip_eval" / "model")
  jax.tree.map(np.testing.assert_array_equal, evaluator.vision_params, clip_eval["vision"])
  prompts = ["grinning face", "flag: japan"]
  np.testing.assert_array_equal(evaluator.tokenizer(prompts), folder.tokenizer(prompts))
  assert folder.tokenizer(prompts).shape == (2, config.clip.max_length)
  # The VAE's scaling factor makes the training images' latents unit-variance.
  from distill import input_pipeline  # pylint: disable=import-outside-toplevel
  train = input_pipeline.source(config.data, "train")
  images = np.stack([train[i]["image"] for i in range(512)])
  np.testing.assert_allclose(np.std(np.asarray(folder.encode_image(images))), 1.0, rtol=1e-4)
  metrics = json.loads((workdir / "autoencoder" / "metrics.json").read_text())
  assert metrics["held_out_images"] == 392 and 0 < metrics["psnr_held_out"] < 60
  # The latent cache holds the trained parts' encoding of the training split.
  from distill.latent import cache  # pylint: disable=import-outside-toplevel
  cached = cache.CachedSource(workdir)
  assert len(cached) == len(train)
  np.testing.assert_allclose(cached[7]["latents"], folder.encode_image(train[7]["image"][None])[0],
                             atol=1e-5)
  np.testing.assert_allclose(cached[7]["context"],
                             folder.encode_prompt([train[7]["caption"]])[0], atol=1e-5)
  # The teacher: a v-model (latent.scheduler.prediction_type) on the scaled_linear schedule,
  # trained from parts/unet.
  assert folder.prediction_type == "v_prediction"
  assert layout.workdir_config(workdir).teacher.pretrained == str(workdir / "parts")
  teacher = final("teacher")
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), teacher, folder.unet_params)
  assert 0 < max(jax.tree.leaves(moved)) < 1.0
  # teacher_v's progress grid: a row per teacher_v.sample_w, a column per latent.sample_prompts;
  # 16-pixel tiles with a 1-pixel pad, upscaled 4x.
  from PIL import Image  # pylint: disable=import-outside-toplevel
  step = config.teacher_v.num_train_steps
  grid = Image.open(workdir / "teacher_v" / "samples" / f"step_{step:08d}.png")
  rows, cols = len(config.teacher_v.sample_w), len(config.latent.sample_prompts)
  assert grid.size == ((cols * 17 + 1) * 4, (rows * 17 + 1) * 4)
  record = json.loads((workdir / "manifest.json").read_text())
  assert {"autoencoder", "clip", "clip_eval", "latent_cache", "teacher", "teacher_v",
          "stage_one", "stage_two/N=1"} <= set(record["stages"])
  before = (workdir / "parts" / "unet" / export.DIFFUSERS_FILE).stat().st_mtime_ns
  pipeline.run(config, str(workdir))  # a rerun: everything is complete
  assert (workdir / "parts" / "unet" / export.DIFFUSERS_FILE).stat().st_mtime_ns == before


def _x_by_hand(fam, params, z, t, cond, prediction_type):
  """x̂ from the teacher network's raw output, read as ``prediction_type`` (float32 algebra)."""
  out = fam.teacher.apply({"params": params}, z, fam.schedule.timestep(t), cond)
  alpha2 = jax.nn.sigmoid(fam.schedule.logsnr(t))[:, None, None, None]
  alpha, sigma = jnp.sqrt(alpha2), jnp.sqrt(1 - alpha2)
  if prediction_type == "epsilon":
    return (z - sigma * out) / alpha
  return alpha * z - sigma * out  # v = α·ε − σ·x


def _with_prediction_type(folder, out, prediction_type):
  """A copy of the diffusers-layout ``folder`` whose scheduler says ``prediction_type``."""
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(folder, out)
  path = out / "scheduler" / "scheduler_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": prediction_type}))
  return out


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_the_teacher_predicts_what_its_folder_says_and_teacher_v_reads_v(
    emoji_run, tmp_path, monkeypatch, prediction_type):
  """The teacher link predicts what its parts folder's scheduler says when it is sampled (x̂ from
  the network's raw output, by hand here) and when it trains: v for the emoji default
  (latent.scheduler.prediction_type), ε for its ``epsilon`` variant (the folder rewritten here).
  teacher_v, which starts from its network, always trains it as a v-model (paper §4.2)."""
  config, workdir = emoji_run
  assert pretrained.load_pretrained(workdir / "parts").prediction_type == "v_prediction"
  filled = layout.fill_trained_parts(config, workdir)
  filled.teacher.pretrained = str(_with_prediction_type(workdir / "parts", tmp_path / "parts",
                                                        prediction_type))
  loaded = sample.load_model(workdir, "teacher", config=filled)
  fam, params = loaded.family, loaded.params
  folder = pretrained.load_pretrained(filled.teacher.pretrained)
  z = jnp.asarray(np.random.default_rng(0).standard_normal((3,) + fam.x_shape), jnp.float32)
  cond = jnp.asarray(folder.encode_prompt(["red heart", "rocket", ""]))
  t = jnp.asarray([0.9, 0.5, 0.1])
  got = denoiser.x_prediction(fam, fam.teacher, params, z, t, cond)
  want = _x_by_hand(fam, params, z, t, cond, prediction_type)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)

  seen = []

  class Stop(Exception):
    pass

  def objective_of(link_fam, **kwargs):
    del kwargs
    seen.append(link_fam.teacher_prediction)
    raise Stop  # before anything compiles or writes
  monkeypatch.setattr(losses, "teacher_objective", objective_of)
  links = {link.name: link for link in layout.chain(config)}
  for name in ("teacher", "teacher_v"):
    with pytest.raises(Stop):
      pipeline.train_link(filled, workdir, links[name], pipeline.make_mesh(config), None)
  assert seen == [prediction_type, "v_prediction"]


def test_a_teacher_trained_here_predicts_what_a_teacher_network_may():
  config = load_config(f"{EMOJI},epsilon")
  assert parts.scheduler_config(config)["prediction_type"] == "epsilon"
  config.latent.scheduler.prediction_type = "x"
  with pytest.raises(ValueError, match=r"latent.scheduler.prediction_type='x'"):
    config_validation.check_parts(config)


def test_the_report_scores_with_the_evaluator_clip(emoji_run):
  """The eval stage of the emoji chain: FID on clip_eval's image features, its CLIP score of the
  held-out captions, the autoencoder's PSNR, and the side-by-side picture of those captions."""
  config, workdir = emoji_run
  report = workdir / "report"
  table = (report / "table.md").read_text()
  assert f"with {workdir / 'clip_eval' / 'model'}" in table  # never the conditioning CLIP
  metrics = json.loads((workdir / "autoencoder" / "metrics.json").read_text())
  assert (f"autoencoder trained here: held-out PSNR {metrics['psnr_held_out']:.2f} dB over 392 "
          "images") in table
  with open(report / "table.csv") as f:
    rows = {(r["method"], r["steps"]): r for r in csv.DictReader(f)}
  assert set(rows) == {("teacher", "4"), ("dpm_solver", "3"), ("student", "1")}
  for r in rows.values():
    assert 0.0 <= float(r["clip_score_mean"]) <= 100.0 and float(r["fid_mean"]) > 0, r
  from distill import input_pipeline  # pylint: disable=import-outside-toplevel
  held_out = input_pipeline.source(config.data, "held_out")
  with np.load(report / "heads" / "student_steps1_w4.npz") as head:
    assert list(head["conditions"]) == [held_out[i]["caption"] for i in range(6)]
  assert (report / "fid_clip_tradeoff.png").is_file()
  assert (report / "side_by_side_w4.png").is_file()


def test_prompts_to_images_through_distill_sample(emoji_run, tmp_path, monkeypatch):
  """distill.sample's command line (in this process) with --prompt and --prompts_file, run from
  another directory with a relative workdir: the prompts in order, a row per w, images that
  depend on the prompt."""
  _, workdir = emoji_run
  (tmp_path / "prompts.txt").write_text("red heart\n\ncat face\n")
  monkeypatch.chdir(tmp_path)
  sample._main([f"--workdir={os.path.relpath(workdir, tmp_path)}", "--model=student",  # pylint: disable=protected-access
                "--num_steps=1", "--prompt=rocket", "--prompts_file=prompts.txt", "--w=2,8",
                "--out=samples",
                f"--compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"])
  with np.load(tmp_path / "samples" / "student1_deterministic_1steps_seed0.npz") as f:
    assert f["images"].shape == (8, 16, 16, 3)  # decoded by the trained autoencoder
    assert list(f["prompts"][:4]) == ["rocket", "red heart", "cat face", "rocket"]
    assert list(f["w"]) == [2] * 4 + [8] * 4
    assert np.isfinite(f["images"]).all()
    assert not np.allclose(f["images"][0], f["images"][1])  # a prompt changes the image
  with pytest.raises(ValueError, match="trained on image–caption data: pass --prompt"):
    sample._main([f"--workdir={workdir}", "--model=student", "--num_steps=1",  # pylint: disable=protected-access
                  f"--out={tmp_path / 'refused'}",
                  f"--compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"])


def test_bad_parts_configs_give_one_line_errors(tmp_path):
  from distill import config_validation  # pylint: disable=import-outside-toplevel
  config = load_config(EMOJI)
  bad = config.copy_and_resolve_references()
  bad.data.image_size = 18
  with pytest.raises(ValueError, match="data.image_size=18 must be a multiple"):
    config_validation.validate(bad, str(tmp_path), num_devices=1)
  bad = config.copy_and_resolve_references()
  bad.teacher.pretrained = str(FIXTURES / "tiny-sd")
  with pytest.raises(ValueError, match="teacher.pretrained is set, but the config trains"):
    config_validation.validate(bad, str(tmp_path), num_devices=1)
  bad = load_config(f"{REPO / 'configs' / 'sd15.py'}:runlocal")
  bad.stages = "clip,teacher_v"
  with pytest.raises(ValueError, match="stages names clip, but the config trains no parts"):
    config_validation.validate(bad, str(tmp_path), num_devices=1)
  bad = load_config(f"{REPO / 'configs' / 'sd15.py'}:runlocal")  # no CLIP of its own
  bad.data.name, bad.data.num_classes, bad.stages = "emoji", 0, "teacher_v,eval"
  with pytest.raises(ValueError, match=r"reports CLIP scores: pass --config\.eval\.clip_model"):
    config_validation.validate(bad, str(tmp_path), num_devices=1)


def test_text_guided_edits_of_an_emoji(emoji_run, tmp_path, monkeypatch):
  """Image-to-image with a prompt through distill.sample (stage one at strength 0.5, 4 steps), and
  inpainting with the one-step student: its known latent cells are put back after the step, and
  the decoded image keeps the source's pixels outside the mask; style transfer from the source's
  caption to a prompt with stage one. The student's edit and the transfer equal the ones computed
  here from the library's parts."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from distill import denoiser, diffusion, editing, input_pipeline  # pylint: disable=import-outside-toplevel
  config, workdir = emoji_run
  item = input_pipeline.source(config.data, "train")[3]
  Image.fromarray(((np.asarray(item["image"]) + 1) * 127.5).round().astype(np.uint8)).save(
      tmp_path / "source.png")
  mask = np.zeros((16, 16), np.uint8)
  mask[4:12, 4:12] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  monkeypatch.chdir(tmp_path)
  cache = f"--compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"
  sample._main([f"--workdir={workdir}", "--model=stage_one", "--num_steps=4",  # pylint: disable=protected-access
                "--init_image=source.png", "--strength=0.5", "--prompt=red heart", "--w=2",
                "--per_row=2", "--out=edits", cache])
  with np.load(tmp_path / "edits" / "stage_one_deterministic_4steps_img2img0.5_seed0.npz") as f:
    assert f["images"].shape == (2, 16, 16, 3) and f["source"].shape == (16, 16, 3)
    assert list(f["prompts"]) == ["red heart"] * 2 and np.isfinite(f["images"]).all()

  sample._main([f"--workdir={workdir}", "--model=student", "--num_steps=1",  # pylint: disable=protected-access
                "--init_image=source.png", "--mask=mask.png", "--prompt=red heart", "--w=4",
                "--per_row=1", "--out=edits", cache])
  with np.load(tmp_path / "edits" / "student1_deterministic_1steps_inpaint1_seed0.npz") as f:
    got, source, fill = f["images"], f["source"], f["mask"]
  kept = fill == 0
  np.testing.assert_array_equal(got[0][kept], source[kept])
  loaded = sample.load_model(workdir, "student", num_steps=1)
  fam = loaded.family
  x = fam.encode_images(source[None])
  eps = jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), x.shape)
  keep = editing.keep_at(fill[None], x.shape)
  assert x.shape == (1, 4, 4, 4) and float(keep.sum()) == 12  # the centre 2 x 2 of 4 x 4 cells
  fn = denoiser.denoise_fn(fam, loaded.params, fam.cond_from_prompts(["red heart"]),
                           jnp.full((1,), 4.0))
  latents = diffusion.sample_deterministic(
      fn, diffusion.diffuse(x, eps, fam.logsnr_fn(1.0)), 1, logsnr_fn=fam.logsnr_fn,
      known_fn=editing.known_region(x, keep, eps))
  np.testing.assert_array_equal(np.asarray(latents)[np.asarray(keep[..., 0]) > 0],
                                np.asarray(x)[np.asarray(keep[..., 0]) > 0])
  want = editing.composite(fam.decode(latents), source[None], fill[None])
  np.testing.assert_allclose(got, want, atol=1e-4)

  # Style transfer (paper §4.3) with a prompt: stage one encodes the source under its own
  # caption (DDIM, 2 steps from the data) and decodes under "red heart", as written here.
  sample._main([f"--workdir={workdir}", "--model=stage_one", "--num_steps=2",  # pylint: disable=protected-access
                "--init_image=source.png", f"--source_prompt={item['caption']}",
                "--prompt=red heart", "--w=2", "--per_row=1", "--out=edits", cache])
  with np.load(tmp_path / "edits" / "stage_one_deterministic_2steps_transfer_seed0.npz") as f:
    got, source = f["images"], f["source"]
    assert list(f["source_prompts"]) == [item["caption"]]
  one = sample.load_model(workdir, "stage_one")
  w = jnp.full((1,), 2.0)
  code = diffusion.encode_deterministic(
      denoiser.v_fn(fam, one.params, fam.cond_from_prompts([item["caption"]]), w),
      fam.encode_images(source[None]), 2, logsnr_fn=fam.logsnr_fn)
  want = fam.decode(diffusion.sample_deterministic(
      denoiser.denoise_fn(fam, one.params, fam.cond_from_prompts(["red heart"]), w), code, 2,
      logsnr_fn=fam.logsnr_fn))
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_an_exported_student_samples_the_same_images_in_diffusers(emoji_run, tmp_path):
  """distill.export writes the one-step student as a diffusers folder: its U-Net loads strictly,
  and diffusers' own StableDiffusionPipeline (its DDIM scheduler from the folder, its guidance
  embedding of guidance_scale − 1, its VAE decoder) turns the same noise and prompt context into
  the images distill.sample draws from the workdir; so does distill.sample --pretrained."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from distill import export as distill_export  # pylint: disable=import-outside-toplevel
  config, workdir = emoji_run
  out = tmp_path / "student1"
  distill_export.main([f"--workdir={workdir}", "--model=student", "--num_steps=1",
                       f"--out={out}"])
  info = json.loads((out / "distill.json").read_text())
  assert info["num_steps"] == 1 and info["timesteps"] == [999.0]
  assert (info["w_min"], info["w_max"]) == (config.stage_one.w_min, config.stage_one.w_max)
  unet_torch, loading = diffusers.UNet2DConditionModel.from_pretrained(
      out, subfolder="unet", output_loading_info=True)
  assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
  assert unet_torch.config.time_cond_proj_dim == info["w_embedding"]["dim"]

  loaded = sample.load_model(workdir, "student", num_steps=1)
  fam = loaded.family
  prompts, w = ["red heart", "cat face"], 3.0
  ours = sample.generate(loaded, sampler="deterministic", num_steps=None, prompts=prompts,
                         w=np.full(2, w), seed=4)
  z1 = np.stack([jax.random.normal(jax.random.fold_in(jax.random.key(4), j), fam.x_shape)
                 for j in range(2)])
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
  for n in (1, 4):  # "trailing" timesteps: our grid k/N, as 1000·k/N − 1
    pipe.scheduler.set_timesteps(n)
    assert [int(t) for t in pipe.scheduler.timesteps] == [1000 * k // n - 1 for k in range(n, 0, -1)]
  context = torch.from_numpy(np.array(fam.cond_from_prompts(prompts)))
  theirs = pipe(prompt_embeds=context, latents=torch.from_numpy(z1.transpose(0, 3, 1, 2)),
                num_inference_steps=1, guidance_scale=1.0 + w, output_type="np").images
  np.testing.assert_allclose(theirs, np.clip((ours + 1) / 2, 0, 1), atol=2e-3)
  # distill.sample reads the folder back: the workdir's images.
  sample._main([f"--pretrained={out}", "--prompt=red heart", "--prompt=cat face", "--w=3",  # pylint: disable=protected-access
                "--seed=4", f"--out={tmp_path / 'again'}",
                f"--compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"])
  with np.load(tmp_path / "again" / "student1_deterministic_1steps_seed4.npz") as f:
    np.testing.assert_allclose(f["images"][:2], ours, atol=1e-5)
  with pytest.raises(ValueError, match="no distill.json; pass a folder written by"):
    sample._main([f"--pretrained={workdir / 'parts'}", "--prompt=a", f"--out={tmp_path}"])  # pylint: disable=protected-access
