"""A small CNN classifier of the embedded digits data: the feature extractor of digits-FID.

Trained by the project on the digits training split (deterministic by seed) and cached in the
workdir. Its penultimate layer (``FEATURE_DIM`` features) gives **digits-FID** and precision /
recall, its softmax an Inception-Score analogue and the **class accuracy** of samples (the share
classified as their conditioning label). Its held-out accuracy is reported with it.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import serialization

from distill import files, input_pipeline

FEATURE_DIM = 128


class DigitsCNN(nn.Module):
  """Conv 32 → conv 64 (stride 2) → dense 128 (features) → dense 10 (logits)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    h = nn.relu(nn.Conv(32, (3, 3), name="conv_0")(x))
    h = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2), name="conv_1")(h))
    h = h.reshape(h.shape[0], -1)
    h = nn.Dropout(0.3, deterministic=not train)(h)
    features = nn.relu(nn.Dense(FEATURE_DIM, name="features")(h))
    logits = nn.Dense(self.num_classes, name="logits")(
        nn.Dropout(0.3, deterministic=not train)(features))
    return features, logits


def _shift(images, key):
  """Random translations by up to one pixel (edge-padded), a light augmentation."""
  pad = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 3)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), images.shape[1:])
  return jax.vmap(crop)(pad, offsets)


def train_classifier(*, seed: int = 0, steps: int = 2000, batch_size: int = 128):
  """Trains the CNN on the digits training split; returns ``(params, held_out_accuracy)``."""
  x, y = input_pipeline.digits_arrays("train")
  x_held, y_held = input_pipeline.digits_arrays("held_out")
  model = DigitsCNN()
  key = jax.random.key(seed)
  params = model.init(jax.random.fold_in(key, 0), jnp.zeros((1, 8, 8, 1)))["params"]
  tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
  x, y = jnp.asarray(x), jnp.asarray(y)

  @jax.jit
  def classifier_step(params, opt_state, i):
    k_idx, k_shift, k_drop = jax.random.split(jax.random.fold_in(key, i + 1), 3)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x.shape[0])

    def loss_fn(p):
      _, logits = model.apply({"params": p}, _shift(x[idx], k_shift), train=True,
                              rngs={"dropout": k_drop})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

    updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # A Python loop of one compiled step: XLA:CPU runs convolutions inside a lax loop far slower.
  opt_state = tx.init(params)
  for i in range(steps):
    params, opt_state = classifier_step(params, opt_state, i)
  accuracy = float(np.mean(DigitsClassifier(params).predict(x_held) == y_held))
  return params, accuracy


class DigitsClassifier:
  """Features, class probabilities and predictions of a trained ``DigitsCNN``."""

  def __init__(self, params, accuracy: float | None = None):
    self.params, self.held_out_accuracy = params, accuracy
    self._apply = jax.jit(lambda p, x: DigitsCNN().apply({"params": p}, x))

  def _outputs(self, images, batch: int = 1000):
    feats, logits = [], []
    images = np.asarray(images, np.float32)
    for start in range(0, len(images), batch):
      f, l = self._apply(self.params, images[start:start + batch])
      feats.append(np.asarray(f))
      logits.append(np.asarray(l))
    return np.concatenate(feats), np.concatenate(logits)

  def features(self, images) -> np.ndarray:
    return self._outputs(images)[0]

  def probs(self, images) -> np.ndarray:
    return np.asarray(jax.nn.softmax(self._outputs(images)[1]))

  def predict(self, images) -> np.ndarray:
    return np.argmax(self._outputs(images)[1], axis=-1)


def load_or_train(directory, *, seed: int = 0, steps: int = 2000) -> DigitsClassifier:
  """The classifier cached in ``directory`` for ``(seed, steps)``, trained and cached if absent."""
  directory = epath.Path(directory)
  weights = directory / f"digits_cnn_seed{seed}_steps{steps}.msgpack"
  info = directory / f"digits_cnn_seed{seed}_steps{steps}.json"
  template = DigitsCNN().init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
  if weights.exists() and info.exists():
    params = serialization.from_bytes(template, weights.read_bytes())
    return DigitsClassifier(params, json.loads(info.read_text())["held_out_accuracy"])
  params, accuracy = train_classifier(seed=seed, steps=steps)
  if jax.process_index() == 0:
    files.write_atomic(weights, serialization.to_bytes(params))
    files.write_atomic(info, json.dumps({"seed": seed, "steps": steps,
                                         "held_out_accuracy": accuracy}))
  return DigitsClassifier(params, accuracy)
