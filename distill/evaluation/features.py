"""Feature extractors for the metrics, and features of real data.

An extractor maps images in [−1, 1] to ``(features [N, D], class probabilities [N, C])``:

* ``digits``: the project's digits classifier (digits-FID; its probabilities are over the data
  set's own classes, so they also give the class accuracy of samples);
* ``inception``: the FID Inception-v3 with weights from ``eval.inception_weights``
  (``evaluation/inception.py``); its 1008 classes are not the data set's labels, so there is no
  class accuracy;
* ``clip``: the image embeddings of the CLIP in ``eval.clip_model`` (``evaluation/clip_score.py``);
  no class probabilities, so neither Inception Score nor class accuracy.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from etils import epath

from distill import input_pipeline, processes
from distill.latent import clip_loader
from distill.evaluation import clip_score, digits_classifier, inception, metrics
from distill.evaluation.metrics import FeatureStats

Extractor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
FEATURES = ("digits", "inception", "clip")


def make_extractor(config, workdir) -> tuple[Extractor, dict]:
  """``(extract, info)`` for ``config.eval.features``; ``info`` describes the extractor."""
  name = config.eval.features
  if name == "digits":
    clf = digits_classifier.load_or_train(
        epath.Path(workdir) / "report" / "classifier", seed=config.eval.classifier_seed,
        steps=config.eval.classifier_steps)
    extract = lambda x: (clf.features(x), clf.probs(x))
    return extract, {"features": "digits CNN penultimate layer (128-d)",
                     "classifier_held_out_accuracy": clf.held_out_accuracy,
                     "class_accuracy": True}
  if name == "inception":
    extract = inception.make_extractor(config.eval.inception_weights,
                                       batch_size=config.eval.batch_size)
    return extract, {"features": f"FID Inception-v3 pool3 (2048-d), weights "
                                 f"{config.eval.inception_weights}", "class_accuracy": False}
  if name == "clip":
    model = clip_loader.load(config.eval.clip_model)
    extract = lambda x: (clip_score.image_embeddings(model, x,
                                                     batch_size=config.eval.batch_size), None)
    return extract, {"features": f"CLIP image embeddings ({model.vision.projection_dim}-d) of "
                                 f"{config.eval.clip_model}", "class_accuracy": False}
  raise ValueError(f"eval.features={name!r} is not one of {list(FEATURES)}.")


def real_images(config, split: str, limit: int, batch: int = 1000):
  """Yields batches of the first ``limit`` images of a split, in [−1, 1]."""
  source = input_pipeline.source(config.data, split)
  n = min(len(source), int(limit))
  for start in range(0, n, batch):
    items = [source[i] for i in range(start, min(start + batch, n))]
    yield np.stack([item["image"] for item in items]).astype(np.float32)


def shared_features(extract: Extractor, x) -> np.ndarray:
  """``extract(x)[0]`` with the work split over the processes (every one holds all of ``x``):
  each extracts its share of the rows (``processes.share``) and all get every row's features."""
  rows = processes.share(len(x))
  return processes.gather_rows(rows, extract(x[np.maximum(rows, 0)])[0], len(x))


def real_features(config, extract: Extractor, split: str, limit: int) -> np.ndarray:
  return np.concatenate([shared_features(extract, x)
                         for x in real_images(config, split, limit)])


def real_stats(config, extract: Extractor, split: str, directory) -> tuple:
  """Mean, covariance and count of a split's features (up to ``eval.reference_samples``
  images), cached as ``.npz`` in ``directory`` (written by process 0)."""
  limit = int(config.eval.reference_samples)
  name = config.eval.features
  if name == "clip":
    name += "-" + epath.Path(config.eval.clip_model).name
  path = epath.Path(directory) / f"stats_{config.data.name}_{split}_{name}_{limit}.npz"
  if processes.agree(path.exists()):
    return FeatureStats.load(path)
  stats = None
  for x in real_images(config, split, limit):
    feats = shared_features(extract, x)
    stats = stats or FeatureStats(feats.shape[1])
    stats.update(feats)
  if processes.is_writer():
    stats.save(path)
  return stats.mean, stats.cov, stats.count


def real_reference(config, extract: Extractor, directory) -> metrics.Reference:
  """The training split's side of every cell's metrics (``metrics.Reference``): its statistics
  (``real_stats``) and the features of its first ``eval.pr_samples`` images."""
  mu, sigma, _ = real_stats(config, extract, "train", directory)
  return metrics.Reference.of(mu, sigma, real_features(config, extract, "train",
                                                       int(config.eval.pr_samples)))
