"""Evaluation: FID, Inception Score, precision/recall, feature extractors and the report."""

from distill.evaluation.metrics import (FeatureStats, Reference, frechet_distance,
                                        frechet_distance_to, inception_score, precision_recall,
                                        precision_recall_to)

__all__ = ["FeatureStats", "Reference", "frechet_distance", "frechet_distance_to",
           "inception_score", "precision_recall", "precision_recall_to"]
