"""Feature extractors for the metrics: the project's digits classifier (digits-FID).

An extractor maps images in [−1, 1] to ``(features [N, D], class probabilities [N, C])``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from etils import epath

from distill import input_pipeline
from distill.evaluation import digits_classifier
from distill.evaluation.metrics import FeatureStats

Extractor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
FEATURES = ("digits",)


def make_extractor(config, workdir) -> tuple[Extractor, dict]:
  """``(extract, info)`` for ``config.eval.features``; ``info`` describes the extractor."""
  name = config.eval.features
  if name == "digits":
    clf = digits_classifier.load_or_train(
        epath.Path(workdir) / "report" / "classifier", seed=config.eval.classifier_seed,
        steps=config.eval.classifier_steps)
    extract = lambda x: (clf.features(x), clf.probs(x))
    return extract, {"features": "digits CNN penultimate layer (128-d)",
                     "classifier_held_out_accuracy": clf.held_out_accuracy}
  raise ValueError(f"eval.features={name!r} is not one of {list(FEATURES)}.")


def real_features(config, extract: Extractor, split: str, batch: int = 1000):
  """Features and labels of a real split (digits: all of it)."""
  x, y = input_pipeline.digits_arrays(split)
  feats = np.concatenate([extract(x[i:i + batch])[0] for i in range(0, len(x), batch)])
  return feats, y


def reference_stats(config, extract: Extractor, directory):
  """Mean and covariance of the training split's features, cached as ``.npz``."""
  path = epath.Path(directory) / f"reference_{config.data.name}_{config.eval.features}.npz"
  if not path.exists():
    feats, _ = real_features(config, extract, "train")
    stats = FeatureStats(feats.shape[1])
    stats.update(feats)
    stats.save(path)
  return FeatureStats.load(path)
