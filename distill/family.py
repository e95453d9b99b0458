"""Denoiser families: the little that the pipeline knows of a kind of teacher.

Training objectives (``losses``), the chain (``pipeline``), the samplers (``sample``) and the
evaluation see a teacher only through a ``DenoiserFamily``:

* the networks: ``teacher`` and ``student_net(dropout)`` (the student carries the w-embedding of
  paper §3.1), ``init_teacher(rng)`` and ``student_from_teacher(teacher_params, rng)``;
* the prediction ``v_hat(net, params, z, t, cond, w, *, train, rngs)``, from which
  ``x_hat = α z − σ v̂`` (``denoiser.x_prediction``);
* the null condition ``null_cond(cond)`` of classifier-free guidance;
* the teacher's schedule ``logsnr_fn(t)``;
* ``loss_weights(cond)``: per-element weights of the training losses, or None for equal ones (an
  inpainting U-Net's kept region, ``latent.kept_loss_weight``);
* the data: ``prepare_batches(batches, seed=)``, the data pipeline's ``{"image", "label"}``
  batches mapped to what the family trains on (outside the train step; ``seed`` for what it
  draws, such as an inpainting teacher's masks), ``x_and_cond(batch)``, such a
  batch turned into the diffused variable and its condition, and ``cond_from_labels(labels)``
  for sampling;
* ``decode(x)``: images in [−1, 1], run outside the compiled samplers; and ``x_shape``, one
  example's shape.

``PixelFamily`` is the pixel-space U-Net: the cosine schedule, class labels (the null label is
the extra class row), the identity as codec. ``distill.latent.family.LatentFamily`` is a
diffusers-layout teacher (paper §4.2): its U-Net on its discrete schedule, a KL or VQ
autoencoder, class-embedder or text-encoder contexts. ``config.family`` picks one. A family is
hashable, so that compiled samplers keyed by it are reused (``sample._compiled_sampler``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from distill import models, network, schedules


class DenoiserFamily(Protocol):
  """What ``losses``, ``pipeline``, ``sample`` and ``evaluate`` need of a teacher's kind."""

  name: str
  teacher: Any
  x_shape: tuple[int, ...]
  inpainting: bool  # cond carries a mask and a masked image (distill/latent/inpainting.py)

  def student_net(self, dropout: float = 0.0) -> Any: ...
  def init_teacher(self, rng) -> Any: ...
  def student_from_teacher(self, teacher_params, rng) -> Any: ...
  def v_hat(self, net, params, z, t, cond, w=None, *, train: bool = False, rngs=None): ...
  def null_cond(self, cond) -> Any: ...
  def logsnr_fn(self, t): ...
  def loss_weights(self, cond) -> Any: ...  # per-element loss weights, or None (equal)
  def prepare_batches(self, batches, *, seed: int = 0) -> Any: ...
  def x_and_cond(self, batch) -> tuple[jax.Array, Any]: ...
  def cond_from_labels(self, labels) -> Any: ...
  def decode(self, x): ...
  def encode_images(self, images): ...  # NHWC in [−1, 1] → x (editing's source)
  @property
  def image_shape(self) -> tuple[int, ...]: ...  # HWC of decoded images


FAMILIES = ("pixel", "latent")


@dataclasses.dataclass(frozen=True)
class PixelFamily:
  """The pixel-space U-Net on the cosine schedule, conditioned on class labels."""

  teacher: models.UNet
  student: models.UNet  # with the w-embedding, dropout 0 (sampling)
  x_shape: tuple[int, ...]
  inpainting: bool = False
  name: str = "pixel"

  @classmethod
  def from_config(cls, config) -> "PixelFamily":
    shape = models.model_input_shape(config)[1:]
    return cls(teacher=models.build_unet(config),
               student=models.build_unet(config, use_w_embedding=True, dropout=0.0),
               x_shape=tuple(shape))

  def student_net(self, dropout: float = 0.0) -> models.UNet:
    return self.student.clone(dropout=dropout)

  def init_teacher(self, rng):
    return models.init_params(self.teacher, rng, (1,) + self.x_shape)

  def student_from_teacher(self, teacher_params, rng):
    return models.student_params_from_teacher(
        teacher_params, models.init_params(self.student, rng, (1,) + self.x_shape))

  def v_hat(self, net, params, z, t, cond, w=None, *, train: bool = False, rngs=None):
    return network.apply(net, params, z, self.logsnr_fn(t), cond, w, train=train, rngs=rngs)

  def null_cond(self, cond):
    return jnp.full(jnp.shape(cond), self.teacher.null_label, jnp.int32)

  def logsnr_fn(self, t):
    return schedules.cosine_logsnr(t)

  def loss_weights(self, cond):
    del cond
    return None

  def prepare_batches(self, batches, *, seed: int = 0):
    del seed  # nothing drawn
    return batches

  def x_and_cond(self, batch):
    return batch["image"], batch["label"]

  def cond_from_labels(self, labels):
    return jnp.asarray(labels, jnp.int32)

  def decode(self, x):
    return x

  def encode_images(self, images):
    """NHWC images in [−1, 1] at any size → x: resized to ``x_shape``."""
    images = jnp.asarray(images, jnp.float32)
    h, w, c = self.x_shape
    if images.shape[-1] != c:
      raise ValueError(f"images with {images.shape[-1]} channels for a model of {c}.")
    if images.shape[1:3] != (h, w):
      images = jax.image.resize(images, (images.shape[0], h, w, c), method="bilinear")
    return images

  @property
  def image_shape(self) -> tuple[int, ...]:
    return self.x_shape


def name_of(config) -> str:
  name = config.get("family", "pixel")
  if name not in FAMILIES:
    raise ValueError(f"family={name!r} is not one of {list(FAMILIES)}.")
  return name


def of(config) -> DenoiserFamily:
  """The family of ``config``: ``config.family`` is ``pixel`` (default) or ``latent``."""
  if name_of(config) == "latent":
    from distill.latent import family as latent_family  # pylint: disable=import-outside-toplevel
    return latent_family.from_config(config)
  return PixelFamily.from_config(config)


def of_link(config, link_name: str) -> DenoiserFamily:
  """The family that reads the parameters of the chain's link ``link_name`` (``layout.Link``).

  ``of(config)`` reads the teacher as the students learn from it: in a latent chain with a
  ``teacher_v`` link, as a v-prediction network. The ``teacher`` link itself predicts what its
  folder's scheduler says (ε for Stable Diffusion; ``latent.scheduler.prediction_type`` for a
  teacher the chain trains from its parts), while it trains and when it is sampled;
  ``teacher_v`` starts from it and learns v."""
  fam = of(config)
  if link_name == "teacher" and name_of(config) == "latent":
    from distill.latent import family as latent_family  # pylint: disable=import-outside-toplevel
    return latent_family.as_folder_teacher(fam)
  return fam
