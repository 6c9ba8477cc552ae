"""Clustering quality against known classes: ACC (Hungarian matching), NMI and ARI."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix


def clustering_accuracy(y_true, y_pred) -> float:
    """Accuracy after matching each cluster to at most one class so that agreement is maximal.

    With more clusters than classes, unmatched clusters count as errors (the usual convention
    of the deep-clustering literature).
    """
    C = contingency_matrix(np.asarray(y_true), np.asarray(y_pred))
    rows, cols = linear_sum_assignment(C, maximize=True)
    return float(C[rows, cols].sum() / C.sum())


def clustering_scores(y_true, y_pred) -> dict[str, float]:
    """ACC, NMI and ARI of a clustering against the true classes."""
    return {
        "ACC": clustering_accuracy(y_true, y_pred),
        "NMI": float(normalized_mutual_info_score(y_true, y_pred)),
        "ARI": float(adjusted_rand_score(y_true, y_pred)),
    }
