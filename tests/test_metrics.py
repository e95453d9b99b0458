"""FID, IS and precision/recall against closed forms and a second implementation."""

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance

from distill.evaluation import (FeatureStats, Reference, frechet_distance, frechet_distance_to,
                                inception_score, precision_recall, precision_recall_to)


def test_frechet_distance_of_commuting_gaussians_is_the_closed_form():
  # Diagonal covariances commute: FD = ‖μ1 − μ2‖² + Σ (√a − √b)².
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
  # Rank-deficient (zeros on the diagonal): still exact, no regularising offset needed.
  a[:2], b[1:3] = 0.0, 0.0
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
  assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_of_full_covariances_matches_scipy_sqrtm():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(8, 8)), rng.normal(size=(3, 8))  # the second is rank 3
  s1, s2 = x @ x.T / 8, y.T @ y / 3
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  root = scipy.linalg.sqrtm(s1 @ s2).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
  assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("n", [3, 5, 12, 40])
def test_frechet_distance_from_fewer_samples_than_dimensions_matches_scipy_sqrtm(n):
  # With the samples given, n <= d takes the trace term from their n × n Gram matrix; n > d the
  # d × d path. Either way the distance of the samples' own mean and covariance.
  rng = np.random.default_rng(n)
  d = 12
  real = rng.normal(size=(60, d)) @ rng.normal(size=(d, d)) + 0.5
  fake = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
  reference = Reference.of(real.mean(axis=0), np.cov(real, rowvar=False), real)
  mu, sigma = fake.mean(axis=0), np.cov(fake, rowvar=False).reshape(d, d)
  root = scipy.linalg.sqrtm(reference.sigma @ sigma).real
  expected = (np.sum((reference.mu - mu) ** 2)
              + np.trace(reference.sigma + sigma - 2 * root))
  got = frechet_distance_to(reference, mu, sigma, features=fake)
  assert got == pytest.approx(expected, rel=1e-7)
  assert got == pytest.approx(frechet_distance_to(reference, mu, sigma), rel=1e-6)


def test_frechet_distance_refuses_mismatched_shapes():
  with pytest.raises(ValueError, match="shapes differ"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_extremes():
  classes = 10
  one_hot = np.eye(classes)[np.arange(1000) % classes]  # confident, uniform marginal
  mean, std = inception_score(one_hot, num_splits=10)
  assert mean == pytest.approx(classes, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
  same = np.tile(np.random.default_rng(0).dirichlet(np.ones(classes)), (500, 1))
  mean, _ = inception_score(same, num_splits=5)
  assert mean == pytest.approx(1.0, abs=1e-9)


def test_precision_recall_on_point_clouds_with_known_overlap():
  rng = np.random.default_rng(0)
  real = rng.uniform(0.0, 1.0, size=(2000, 2))
  # Half of the generated points lie inside the real square, half far outside it.
  fake = np.concatenate([rng.uniform(0.0, 1.0, size=(1000, 2)),
                         rng.uniform(5.0, 6.0, size=(1000, 2))])
  precision, recall = precision_recall(real, fake, k=3)
  assert precision == pytest.approx(0.5, abs=0.03)
  assert recall > 0.9  # the in-square half covers the real square
  # Generated points on only the left half of the square: full precision, about half recall.
  left = rng.uniform([0.0, 0.0], [0.5, 1.0], size=(1000, 2))
  precision, recall = precision_recall(real, left, k=3)
  assert precision > 0.97 and recall == pytest.approx(0.5, abs=0.05)


def test_a_reference_gives_the_metrics_of_its_real_data():
  """FID against a ``Reference`` (its covariance's root computed once) is scipy's, with the real
  data as either Gaussian; precision and recall against it are a brute-force count: a point is
  inside a set's manifold if it lies within some member's distance to that member's k-th nearest
  neighbour in the set."""
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(8, 8)), rng.normal(size=(3, 8))  # the cell's covariance is rank 3
  s_real, s_cell = x @ x.T / 8, y.T @ y / 3
  mu_real, mu_cell = rng.normal(size=8), rng.normal(size=8)
  real, fake = rng.normal(size=(300, 8)), rng.normal(1.2, 1.0, size=(200, 8))
  reference = Reference.of(mu_real, s_real, real, k=3)
  expected = (np.sum((mu_real - mu_cell) ** 2) +
              np.trace(s_real + s_cell - 2 * scipy.linalg.sqrtm(s_cell @ s_real).real))
  assert frechet_distance_to(reference, mu_cell, s_cell) == pytest.approx(expected, rel=1e-6)
  with pytest.raises(ValueError, match="shapes differ"):
    frechet_distance_to(reference, np.zeros(3), np.eye(3))

  def inside(points, centres, k):
    radii = np.sort(scipy.spatial.distance.cdist(centres, centres), axis=1)[:, k]
    return np.mean(np.any(scipy.spatial.distance.cdist(points, centres) <= radii, axis=1))

  want = (inside(fake, real, 3), inside(real, fake, 3))
  assert 0.1 < want[0] < 0.9 and 0.1 < want[1] < 0.9  # neither count is trivial
  assert precision_recall_to(reference, fake) == pytest.approx(want, abs=1e-12)
  assert precision_recall(real, fake, k=3) == pytest.approx(want, abs=1e-12)


def test_feature_stats_accumulate_in_batches(tmp_path):
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(1000, 6)) @ rng.normal(size=(6, 6)) + 3.0
  stats = FeatureStats(6)
  for chunk in np.array_split(feats, 7):
    stats.update(chunk)
  np.testing.assert_allclose(stats.mean, feats.mean(axis=0), rtol=1e-10)
  np.testing.assert_allclose(stats.cov, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-10)
  stats.save(tmp_path / "ref.npz")
  mu, sigma, count = FeatureStats.load(tmp_path / "ref.npz")
  assert count == 1000 and np.array_equal(mu, stats.mean) and np.array_equal(sigma, stats.cov)
