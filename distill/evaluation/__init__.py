"""Evaluation: FID, Inception Score, precision/recall, feature extractors and the report."""

from distill.evaluation.metrics import (FeatureStats, frechet_distance, inception_score,
                                        precision_recall)

__all__ = ["FeatureStats", "frechet_distance", "inception_score", "precision_recall"]
