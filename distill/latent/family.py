"""The latent denoiser family (paper §4.2): a diffusers-layout teacher seen through the interface
of ``distill/family.py``.

* **Networks.** The teacher is the folder's ``UNet2DConditionModel``; the student is the same
  network with ``time_cond_proj_dim`` set, diffusers' own mechanism for a guidance-weight
  embedding (``guidance_embedding``: sinusoidal features of ``1000·w`` through a bias-free
  ``cond_proj`` layer, added to the timestep features). ``student_from_teacher`` copies every
  teacher weight and starts ``cond_proj`` at **zero**, so that at initialisation the student is
  the teacher's conditional model for every w (paper §3.1). An exported student therefore stays
  loadable by diffusers. Our w is diffusers' ``guidance_scale − 1``.
* **Prediction.** ``v_hat`` turns the network's output into v: the teacher predicts what its
  scheduler says (``epsilon``, or ``v_prediction`` after the ``teacher_v`` link: the ``teacher``
  link itself is read through ``as_folder_teacher``, ``family.of_link``), the student always
  predicts v. The network is fed the discrete timestep ``schedule.timestep(t)``.
* **Schedule.** The folder's ``DiscreteSchedule``; ``logsnr_fn = schedule.logsnr``.
* **Condition.** ``cond`` is the cross-attention context ``[B, L, D]``: a class embedder's row
  (class-conditional LDM, the null class is its last row) or the text encoder's context (SD, the
  null condition is the empty prompt ``""``). For labelled data the contexts of every class are
  computed once (``context_table``; for text, ``latent.prompt_template`` per class name).
* **Data.** ``prepare_batches`` maps the data pipeline's ``{"image", "label"}`` (or, from
  image–caption data, ``{"image", "caption"}``: the text encoder's context of each caption)
  batches to ``{"latents", "context"}`` outside the train step: images resized to the first stage's
  ``sample_size`` (channels repeated to its ``in_channels``) and encoded to the
  ``scaling_factor``-scaled posterior mean (or a VQ model's pre-quantisation latents). A batch
  stays a pure function of its step, so a resumed run reads the same latents.
* **Decode.** ``decode`` runs the first stage's decoder (host-side, its own compiled program).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from distill import attention as attention_ops
from distill import diffusion, layout, network
from distill.latent import inpainting, layers, pretrained, unet, vae

CONDITIONINGS = ("class", "text")


def guidance_embedding(w, dim: int):
  """diffusers' ``get_guidance_scale_embedding``: ``[sin, cos]`` of ``1000·w`` at frequencies
  ``exp(−log(10⁴)·k/(dim/2 − 1))``, ``k < dim/2``; ``[B] -> [B, dim]``."""
  w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (jnp.size(w),))
  return layers.timestep_embedding(1000.0 * w, dim, flip_sin_to_cos=False, freq_shift=1.0)


def _v_from_prediction(z, out, logsnr, prediction_type: str):
  """v = α ε − σ x from an ε-, v- or x-prediction (``z = α x + σ ε``, α² + σ² = 1)."""
  alpha = diffusion.per_example(jnp.sqrt(jax.nn.sigmoid(logsnr)), z, "logsnr")
  sigma = diffusion.per_example(jnp.sqrt(jax.nn.sigmoid(-logsnr)), z, "logsnr")
  if prediction_type == "v_prediction":
    return out
  if prediction_type == "epsilon":
    return (out - sigma * z) / alpha
  return (alpha * z - out) / sigma


@dataclasses.dataclass(frozen=True, eq=False)
class LatentFamily:
  """A latent teacher (``LatentModels``) and its w-conditioned student. Compared by identity:
  ``of(config)`` returns one object per folder and settings."""

  models: pretrained.LatentModels
  teacher: unet.UNet2DConditionModel
  student: unet.UNet2DConditionModel
  x_shape: tuple[int, ...]
  teacher_prediction: str  # what the teacher network predicts: "epsilon" or "v_prediction"
  conditioning: str  # "class" or "text"
  context_table: np.ndarray  # [num_classes + 1, L, D]: each class's context, the null one last
  inpainting: bool = False  # a 9-channel U-Net: cond is {"context", "mask", "masked"}
  kept_loss_weight: float = 1.0  # an inpainting U-Net's loss weight on the kept latent cells
  name: str = "latent"

  @property
  def schedule(self):
    return self.models.schedule

  @property
  def w_dim(self) -> int:
    return int(self.student.config.time_cond_proj_dim)

  def student_net(self, dropout: float = 0.0):
    if dropout:
      raise ValueError(f"dropout={dropout}: the latent U-Net has no dropout; set the stage's "
                       "dropout to 0.")
    return self.student

  def init_teacher(self, rng):
    del rng  # imported, not initialised
    return self.models.unet_params

  def student_from_teacher(self, teacher_params, rng):
    """The teacher's weights and a zero ``cond_proj``: the teacher's conditional model at every w."""
    del rng
    cfg = self.teacher.config
    kernel = jnp.zeros((self.w_dim, cfg.block_out_channels[0]), jnp.float32)
    return {**teacher_params, "time_embedding_cond_proj": {"kernel": kernel}}

  def v_hat(self, net, params, z, t, cond, w=None, *, train: bool = False, rngs=None):
    """The student (``w`` given) predicts v; the teacher predicts ``teacher_prediction``."""
    del train, rngs  # no dropout in the latent U-Net
    b = z.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    extra = {}
    if w is not None:
      extra["timestep_cond"] = guidance_embedding(jnp.broadcast_to(w, (b,)), self.w_dim)
    if self.inpainting:
      z_in, context = inpainting.unet_input(z, cond), cond["context"]
    else:
      z_in, context = z, cond
    out = network.apply(net, params, z_in, self.schedule.timestep(t), context, **extra)
    kind = "v_prediction" if w is not None else self.teacher_prediction
    return _v_from_prediction(z, out.astype(z.dtype), self.schedule.logsnr(t), kind)

  def null_cond(self, cond):
    """The null context (an inpainting condition keeps its mask and masked image)."""
    null = lambda context: jnp.broadcast_to(jnp.asarray(self.context_table[-1], jnp.float32),
                                            jnp.shape(context))
    return dict(cond, context=null(cond["context"])) if self.inpainting else null(cond)

  def logsnr_fn(self, t):
    return self.schedule.logsnr(t)

  def loss_weights(self, cond):
    """Per-cell weights of the training losses (``inpainting.loss_weights``), or None: equal
    weights."""
    if self.inpainting and self.kept_loss_weight != 1.0:
      return inpainting.loss_weights(cond, self.kept_loss_weight)
    return None

  def x_and_cond(self, batch):
    if self.inpainting:
      return batch["latents"], inpainting.condition(batch["context"], batch["mask"],
                                                    batch["masked_latents"])
    return batch["latents"], batch["context"]

  def inpainting_cond(self, context, images=None, fill_mask=None) -> dict:
    """The condition of an inpainting family for sampling: ``images`` (``[B, H, W, C]`` of
    ``image_shape``) to be filled where ``fill_mask`` (``[B, H, W]``) is 1. Without them the
    whole image is filled: the model generates (a quarter of its training masks are full)."""
    context = jnp.asarray(context, jnp.float32)
    b = context.shape[0]
    if images is None:  # one blank image encoded, the same for every example
      size, _ = self._first_stage_input
      fill = jnp.ones((1, size, size), jnp.float32)
      return inpainting.condition(
          context, jnp.broadcast_to(inpainting.latent_mask(fill, self.x_shape[0]),
                                    (b,) + self.x_shape[:2] + (1,)),
          jnp.broadcast_to(self.encode_images(jnp.zeros((1,) + tuple(self.image_shape)),
                                              fill_mask=fill), (b,) + self.x_shape))
    return inpainting.condition(context, inpainting.latent_mask(fill_mask, self.x_shape[0]),
                                self.encode_images(images, fill_mask=fill_mask))

  def cond_from_labels(self, labels):
    """Contexts of class labels (the rows of ``context_table``; the null class is its last)."""
    labels = np.asarray(labels, np.int64)
    n = self.context_table.shape[0] - 1
    if labels.size and not (labels.min() >= 0 and labels.max() <= n):
      raise ValueError(f"labels {sorted(set(labels.tolist()))} are outside [0, {n}] ({n} is the "
                       "null class).")
    return jnp.asarray(self.context_table[labels])

  def cond_from_prompts(self, prompts):
    """The text encoder's contexts of ``prompts`` (a text-conditioned teacher only)."""
    if self.conditioning != "text":
      raise ValueError(f"{self.models.path} is class-conditional: pass --labels, not prompts.")
    return jnp.asarray(self.models.encode_prompt(list(prompts)), jnp.float32)

  def decode(self, x):
    return self.models.decode_latents(x)

  def encode_images(self, images, *, fill_mask=None):
    """NHWC images in [−1, 1] at any size → scaled latents of ``x_shape``; with a ``fill_mask``
    (``[B, S, S]`` at the first stage's size ``S``, 1 = fill), of the masked images
    (``inpainting.masked_image``)."""
    size, channels = self._first_stage_input
    images = jnp.asarray(images, jnp.float32)
    b, _, _, c = images.shape
    if channels % c:
      raise ValueError(f"images with {c} channels cannot fill the first stage's {channels} "
                       "input channels (data.channels must divide them).")
    images = jax.image.resize(images, (b, size, size, c), method="bilinear")
    if c != channels:  # grayscale data for an RGB autoencoder
      images = jnp.repeat(images, channels // c, axis=-1)
    if fill_mask is not None:
      images = inpainting.masked_image(images, fill_mask)
    return self.models.encode_image(images)

  @property
  def image_shape(self) -> tuple[int, ...]:
    """HWC of the decoded images: the first stage's size and output channels."""
    fs = self.models._first_stage()  # pylint: disable=protected-access
    size = int(fs.sample_size)
    return (size, size, int(getattr(fs, "out_channels", None) or fs.in_channels))

  @property
  def _first_stage_input(self) -> tuple[int, int]:
    fs = self.models._first_stage()  # pylint: disable=protected-access
    return int(fs.sample_size), int(fs.in_channels)

  def prepare_batches(self, batches, *, seed: int = 0):
    """``{"image", "label" or "caption"}`` batches → ``{"latents", "context"}`` (see the module
    docstring); captions go through the text encoder. An inpainting family adds each example's
    training mask (``mask``, at latent resolution) and ``masked_latents``, drawn from ``seed``,
    the step and the example's row in the global batch (``inpainting.draw_mask``)."""
    def encode(step, batch):
      if "latents" in batch:  # read from the latent cache (distill/latent/cache.py)
        context = batch["context"] if "context" in batch else self.context_table[
            np.asarray(batch["label"])]
        return {"latents": batch["latents"], "context": context}
      latents = np.asarray(self.encode_images(batch["image"]), np.float32)
      if "caption" in batch:
        context = np.asarray(self.cond_from_prompts([str(c) for c in batch["caption"]]))
      else:
        context = self.context_table[np.asarray(batch["label"])]
      out = {"latents": latents, "context": context}
      if self.inpainting:
        b = len(latents)
        first = jax.process_index() * b  # this process's rows of the global batch
        size, _ = self._first_stage_input
        fill = np.stack([inpainting.draw_mask(inpainting.mask_rng(seed, step, first + i), size)
                         for i in range(b)])
        out["mask"] = np.asarray(inpainting.latent_mask(fill, self.x_shape[0]), np.float32)
        out["masked_latents"] = np.asarray(
            self.encode_images(batch["image"], fill_mask=fill), np.float32)
      return out
    return batches.map_with_index(encode)


def _context_table(models: pretrained.LatentModels, *, conditioning: str, prompt_template: str,
                   class_names: tuple, num_classes: int, shapes_only: bool = False):
  """``[num_classes + 1, L, D]``: each class's context, the null context last (with
  ``shapes_only``, zeros of that shape: nothing can be encoded without weights)."""
  if conditioning == "class":
    rows = models.class_embedder.num_classes
    if rows != num_classes + 1:
      raise ValueError(f"data.num_classes={num_classes}, but {models.path}/class_embedder has "
                       f"{rows} rows; it needs num_classes + 1 (the last row is the null class).")
    if shapes_only:
      return np.zeros(jax.eval_shape(lambda p: models.class_embedder.apply(
          {"params": p}, jnp.arange(num_classes + 1)), models.class_embedder_params).shape,
                      np.float32)
    return np.asarray(models.encode_class(np.arange(num_classes + 1)), np.float32)
  names = list(class_names) or [str(i) for i in range(num_classes)]
  if not num_classes:  # image–caption data: no classes, the null prompt alone
    names = []
  if len(names) != num_classes:
    raise ValueError(f"latent.class_names has {len(names)} entries, data.num_classes="
                     f"{num_classes}.")
  prompts = [prompt_template.format(label=name) for name in names] + [""]
  if shapes_only:
    ids = jnp.asarray(models.tokenizer(prompts))
    return np.zeros(jax.eval_shape(lambda p: models.text_encoder.apply({"params": p}, ids),
                                   models.text_encoder_params).shape, np.float32)
  return np.asarray(models.encode_prompt(prompts), np.float32)


def check_folder(path, conditioning: str) -> None:
  """One-line errors for a teacher folder that cannot serve the latent family."""
  if not path:
    raise ValueError("teacher.pretrained is empty: a latent family imports its teacher; set "
                     "--config.teacher.pretrained=FOLDER (a diffusers-layout folder; python -m "
                     "distill.latent.convert makes one from a CompVis file).")
  folder = epath.Path(path)
  if not (folder / "model_index.json").exists():
    raise ValueError(f"teacher.pretrained={path}: no model_index.json; expected a "
                     "diffusers-layout pipeline folder with unet/, scheduler/ and vae/ or vqvae/.")
  need = ["unet", "scheduler"]
  if not (folder / "scheduler" / "scheduler_config.json").exists():
    raise ValueError(f"teacher.pretrained={path}: no scheduler/scheduler_config.json.")
  need += ["class_embedder"] if conditioning == "class" else ["text_encoder", "tokenizer"]
  for part in need:
    if not (folder / part).is_dir():
      raise ValueError(f"teacher.pretrained={path}: no {part}/ (latent.conditioning="
                       f"{conditioning!r} needs {', '.join(p + '/' for p in need)}).")
  if not ((folder / "vae").is_dir() or (folder / "vqvae").is_dir()):
    raise ValueError(f"teacher.pretrained={path}: no vae/ or vqvae/ first stage.")


def folder_is_inpainting(path) -> bool:
  """Whether the folder's U-Net takes ``2·C + 1`` input channels for its first stage's ``C``
  (an inpainting U-Net, ``distill/latent/inpainting.py``); read from the config files alone."""
  folder = epath.Path(path)
  unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
  first = folder / ("vae" if (folder / "vae").is_dir() else "vqvae")
  latent = int(json.loads((first / "config.json").read_text()).get("latent_channels", 4))
  return int(unet_cfg.get("in_channels", 4)) == 2 * latent + 1


def folder_prediction_type(path) -> str:
  """What the folder's U-Net predicts (its ``scheduler_config.json``; diffusers' default ε)."""
  sched = epath.Path(path) / "scheduler" / "scheduler_config.json"
  return json.loads(sched.read_text()).get("prediction_type", "epsilon")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@functools.lru_cache(maxsize=8)
def _load(path: str, conditioning: str, prompt_template: str, class_names: tuple,
          num_classes: int, w_dim: int, v_teacher: bool, shapes_only: bool,
          dtype: str = "float32", remat: bool = False, attention: str = "auto",
          kept_loss_weight: float = 1.0) -> LatentFamily:
  check_folder(path, conditioning)
  models = pretrained.load_pretrained(path, dtype=DTYPES[dtype], remat=remat,
                                      shapes_only=shapes_only)
  if attention != "auto":
    models.unet = models.unet.clone(attention=attention)
  cfg = models.unet.config
  if w_dim is None:  # a student written by distill.export: its U-Net is the student
    if cfg.time_cond_proj_dim is None:
      raise ValueError(f"{path}: its U-Net has no time_cond_proj_dim; it is not a student "
                       "written by distill.export.")
    student = models.unet
  elif cfg.time_cond_proj_dim is not None:
    raise ValueError(f"teacher.pretrained={path}: its U-Net already has time_cond_proj_dim="
                     f"{cfg.time_cond_proj_dim}; the teacher must be a guided (two-branch) model.")
  else:
    student = unet.UNet2DConditionModel(dataclasses.replace(cfg, time_cond_proj_dim=w_dim),
                                        dtype=models.unet.dtype, remat=models.unet.remat,
                                        attention=models.unet.attention)
  table = _context_table(models, conditioning=conditioning, prompt_template=prompt_template,
                         class_names=class_names, num_classes=num_classes,
                         shapes_only=shapes_only)
  probe = _shape_probe(models)
  channels = int(probe.shape[-1])
  if cfg.in_channels not in (channels, 2 * channels + 1):
    raise ValueError(f"{path}/unet has in_channels={cfg.in_channels}, but the first stage's "
                     f"latents have {channels} channels: expected {channels} (a text-to-image "
                     f"U-Net) or {2 * channels + 1} (an inpainting one: latents, mask, masked "
                     "image).")
  inpaints = cfg.in_channels == 2 * channels + 1
  check_kept_loss_weight(kept_loss_weight, inpainting=inpaints, where=f"{path}/unet")
  return LatentFamily(models=models, teacher=models.unet, student=student,
                      x_shape=tuple(probe.shape[1:]),
                      teacher_prediction="v_prediction" if v_teacher else models.prediction_type,
                      conditioning=conditioning, context_table=table, inpainting=inpaints,
                      kept_loss_weight=kept_loss_weight)


def _shape_probe(models):
  """The shape of the first stage's latents of one image (traced, nothing computed)."""
  fs = models._first_stage()  # pylint: disable=protected-access
  images = jax.ShapeDtypeStruct((1, fs.sample_size, fs.sample_size, fs.in_channels), jnp.float32)
  if models.vae is not None:
    return jax.eval_shape(lambda p, x: models.vae.apply(
        {"params": p}, x, method=vae.AutoencoderKL.encode)[0], models.vae_params, images)
  return jax.eval_shape(lambda p, x: models.vqvae.apply(
      {"params": p}, x, method=vae.VQModel.encode), models.vqvae_params, images)


@functools.lru_cache(maxsize=8)
def as_folder_teacher(fam: LatentFamily) -> LatentFamily:
  """``fam`` with its teacher network read as its folder's scheduler says (``prediction_type``),
  whether or not the chain fine-tunes it to v: the ``teacher`` link's family
  (``family.of_link``). One object per family, so compiled samplers keyed by it are reused."""
  prediction = fam.models.prediction_type or fam.teacher_prediction
  if prediction == fam.teacher_prediction:
    return fam
  return dataclasses.replace(fam, teacher_prediction=prediction)


def from_exported(path: str, *, conditioning: str, num_classes: int,
                  prompt_template: str = "{label}", class_names: tuple = ()) -> LatentFamily:
  """The family of a student folder written by ``distill.export``: ``student`` (and
  ``teacher``) are its U-Net, with the w-embedding; its parameters are ``models.unet_params``."""
  return _load(str(path), conditioning, prompt_template, tuple(class_names), int(num_classes),
               None, True, False)


def check_kept_loss_weight(weight: float, *, inpainting: bool, where: str) -> None:
  """``latent.kept_loss_weight``: finite and positive, and other than 1 only for an inpainting
  U-Net (``where`` names the teacher in the message)."""
  if not (math.isfinite(weight) and weight > 0):
    raise ValueError(f"latent.kept_loss_weight={weight:g} must be a finite number > 0 (1: equal "
                     "weights).")
  if weight != 1.0 and not inpainting:
    raise ValueError(f"latent.kept_loss_weight={weight:g} weights the kept region of an "
                     f"inpainting U-Net's loss, and {where} is not one: set it to 1.")


def from_config(config, *, shapes_only: bool = False) -> LatentFamily:
  """The latent family of ``config`` (``teacher.pretrained`` and the ``latent`` section);
  ``teacher_prediction`` is v when the chain has a ``teacher_v`` link. ``shapes_only``: the
  folder's parameters as shapes (``load_pretrained(shapes_only=True)``) and zero contexts, to
  build and lower the training steps of a full-size teacher without its weights."""
  lat = config.latent
  if lat.conditioning not in CONDITIONINGS:
    raise ValueError(f"latent.conditioning={lat.conditioning!r} is not one of "
                     f"{list(CONDITIONINGS)}.")
  if lat.conditioning == "text" and "{label}" not in lat.prompt_template:
    raise ValueError(f"latent.prompt_template={lat.prompt_template!r} must contain {{label}}.")
  if not (lat.w_embedding_dim >= 4 and lat.w_embedding_dim % 2 == 0):
    raise ValueError(f"latent.w_embedding_dim={lat.w_embedding_dim} must be an even number "
                     ">= 4 (diffusers' default is 256).")
  if lat.get("dtype", "float32") not in DTYPES:
    raise ValueError(f"latent.dtype={lat.dtype!r} is not one of {list(DTYPES)}.")
  if lat.get("attention", "auto") not in attention_ops.IMPLEMENTATIONS:
    raise ValueError(f"latent.attention={lat.attention!r} is not one of "
                     f"{list(attention_ops.IMPLEMENTATIONS)}.")
  return _load(str(config.teacher.pretrained), str(lat.conditioning), str(lat.prompt_template),
               tuple(str(n) for n in (lat.get("class_names") or ())),
               int(config.data.num_classes), int(lat.w_embedding_dim),
               layout.has_teacher_v(config), shapes_only, str(lat.get("dtype", "float32")),
               bool(lat.get("remat", False)), str(lat.get("attention", "auto")),
               float(lat.get("kept_loss_weight", 1.0)))

