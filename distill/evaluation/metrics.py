"""Sample-quality metrics: Fréchet distance, Inception Score, improved precision and recall.

* ``frechet_distance`` (Heusel et al., 2017): ``‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)``
  in float64. The trace of the matrix square root is taken from the eigenvalues of the symmetric
  positive semi-definite ``Σ₁^½ Σ₂ Σ₁^½`` (``tr √(Σ₁Σ₂)`` equals it), so rank-deficient
  covariances (fewer samples than features) need no regularising offset.
* ``inception_score`` (Salimans et al., 2016): ``exp E_x KL(p(y|x) ‖ p(y))`` per split; mean and
  standard deviation over the splits.
* ``precision_recall`` (Kynkäänniemi et al., 2019): each set's k-NN radii define a manifold;
  precision is the share of generated samples inside the real manifold, recall the share of real
  samples inside the generated one.
* ``FeatureStats`` accumulates mean and covariance batch by batch (float64 sums), so 50k samples
  never sit in memory at once; ``save``/``load`` cache reference statistics as ``.npz``.
* ``Reference`` holds the real data's side of both, computed once per evaluation and shared by
  every cell: its covariance's square root (FID) and its k-NN radii (precision). Against it,
  ``frechet_distance_to`` and ``precision_recall_to`` give what ``frechet_distance`` and
  ``precision_recall`` give, with one eigendecomposition and one radius pass less per cell.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from etils import epath

from distill import files


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _statistics(mu1, sigma1, mu2, sigma2) -> tuple[np.ndarray, ...]:
  """Both Gaussians' statistics in float64, checked to be of the same features."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma "
                     f"{sigma1.shape} vs {sigma2.shape}; pass statistics of the same features.")
  return mu1, sigma1, mu2, sigma2


def _trace_sqrt(m) -> float:
  """``tr(m^½)`` of a symmetric positive semi-definite ``m``: the sum of its eigenvalues' roots."""
  return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None))))


def _distance(mu1, sigma1, mu2, sigma2, trace_sqrt: float) -> float:
  """``‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2·tr((Σ₁^½ Σ₂ Σ₁^½)^½)``, the last trace given."""
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _frechet(mu1, sigma1, root1, mu2, sigma2) -> float:
  """The Fréchet distance, given ``root1 = Σ₁^½``."""
  return _distance(mu1, sigma1, mu2, sigma2, _trace_sqrt(root1 @ sigma2 @ root1))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (float64)."""
  mu1, sigma1, mu2, sigma2 = _statistics(mu1, sigma1, mu2, sigma2)
  return _frechet(mu1, sigma1, _psd_sqrt(sigma1), mu2, sigma2)


def inception_score(probs, num_splits: int = 10) -> tuple[float, float]:
  """``(mean, std)`` over ``num_splits`` splits of ``exp(mean_x KL(p(y|x) ‖ p(y)))``."""
  probs = np.asarray(probs, np.float64)
  if probs.ndim != 2 or len(probs) < num_splits:
    raise ValueError(f"inception_score: probs must be [N, classes] with N >= num_splits="
                     f"{num_splits}, got shape {probs.shape}.")
  scores = []
  for part in np.array_split(probs, num_splits):
    marginal = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(np.clip(part, 1e-30, None)) -
                        np.log(np.clip(marginal, 1e-30, None))), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq_dists(a: np.ndarray, b: np.ndarray, batch: int = 2048):
  """Yields ``(start, ‖a[start:start+batch] − b‖²)`` blocks."""
  b_sq = np.sum(b * b, axis=1)
  for start in range(0, len(a), batch):
    block = a[start:start + batch]
    d = np.sum(block * block, axis=1)[:, None] - 2.0 * block @ b.T + b_sq[None, :]
    yield start, np.maximum(d, 0.0)


def knn_radii(features, k: int = 3) -> np.ndarray:
  """Squared distance of every point to its k-th nearest neighbour in the same set (not itself)."""
  features = np.asarray(features, np.float64)
  radii = np.empty(len(features))
  for start, d in _pairwise_sq_dists(features, features):
    radii[start:start + len(d)] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
  return radii


def _coverage(points, centres, radii) -> float:
  inside = 0
  for _, d in _pairwise_sq_dists(points, centres):
    inside += int(np.sum(np.any(d <= radii[None, :], axis=1)))
  return inside / len(points)


def _precision_recall(real, real_radii, fake, k: int) -> tuple[float, float]:
  return _coverage(fake, real, real_radii), _coverage(real, fake, knn_radii(fake, k))


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN radii."""
  real = np.asarray(real_features, np.float64)
  return _precision_recall(real, knn_radii(real, k), np.asarray(fake_features, np.float64), k)


@dataclasses.dataclass(frozen=True)
class Reference:
  """The real data's side of FID and of precision and recall, for every cell of an evaluation:
  Gaussian statistics ``mu``, ``sigma`` with ``sigma_sqrt = Σ^½``, and the precision and recall
  ``features`` with their k-NN ``radii`` (``k``)."""
  mu: np.ndarray
  sigma: np.ndarray
  sigma_sqrt: np.ndarray
  features: np.ndarray
  radii: np.ndarray
  k: int

  @classmethod
  def of(cls, mu, sigma, features, *, k: int = 3) -> Reference:
    mu, sigma, _, _ = _statistics(mu, sigma, mu, sigma)
    features = np.asarray(features, np.float64)
    return cls(mu=mu, sigma=sigma, sigma_sqrt=_psd_sqrt(sigma), features=features,
               radii=knn_radii(features, k), k=k)


def frechet_distance_to(reference: Reference, mu, sigma, *, features=None) -> float:
  """``frechet_distance(reference.mu, reference.sigma, mu, sigma)`` (the distance is
  symmetric).

  ``features``: the ``[n, d]`` samples whose mean and covariance (``n − 1`` in the denominator)
  ``mu`` and ``sigma`` are. With ``n ≤ d`` the trace term comes from their ``n × n`` Gram matrix
  instead of a ``d × d`` one: with ``X`` the centred features and ``A = X Σ₁^½ / √(n − 1)``,
  ``Σ₁^½ Σ₂ Σ₁^½ = AᵀA`` has the nonzero eigenvalues of ``AAᵀ = X Σ₁ Xᵀ / (n − 1)``. The same
  distance, for a cell of a few hundred samples of 2048 Inception features in milliseconds
  instead of seconds."""
  mu1, sigma1, mu2, sigma2 = _statistics(reference.mu, reference.sigma, mu, sigma)
  if features is not None and 1 < len(features) <= len(mu1):
    x = np.asarray(features, np.float64).reshape(len(features), -1)
    x = x - x.mean(axis=0)
    return _distance(mu1, sigma1, mu2, sigma2, _trace_sqrt(x @ sigma1 @ x.T / (len(x) - 1)))
  return _frechet(mu1, sigma1, reference.sigma_sqrt, mu2, sigma2)


def precision_recall_to(reference: Reference, fake_features) -> tuple[float, float]:
  """``precision_recall(reference.features, fake_features, k=reference.k)``."""
  return _precision_recall(reference.features, reference.radii,
                           np.asarray(fake_features, np.float64), reference.k)


class FeatureStats:
  """Running mean and covariance of feature vectors, accumulated in float64."""

  def __init__(self, dim: int):
    self.count = 0
    self.total = np.zeros(dim)
    self.outer = np.zeros((dim, dim))

  def update(self, features) -> None:
    f = np.asarray(features, np.float64).reshape(len(features), -1)
    self.count += len(f)
    self.total += f.sum(axis=0)
    self.outer += f.T @ f

  @property
  def mean(self) -> np.ndarray:
    return self.total / self.count

  @property
  def cov(self) -> np.ndarray:
    mean = self.mean
    return (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)

  def save(self, path) -> None:
    """Writes ``mu``, ``sigma`` and ``count`` to an ``.npz`` (atomically)."""
    buffer = io.BytesIO()
    np.savez(buffer, mu=self.mean, sigma=self.cov, count=self.count)
    files.write_atomic(path, buffer.getvalue())

  @staticmethod
  def load(path) -> tuple[np.ndarray, np.ndarray, int]:
    with epath.Path(path).open("rb") as f:
      data = np.load(f)
      return data["mu"], data["sigma"], int(data["count"])
