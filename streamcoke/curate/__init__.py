"""Data curation from cluster labels: cluster-balanced subsets of large data sets."""

from .balanced import ClusterBalancedSampler
from .subset import balanced_subset

__all__ = ["ClusterBalancedSampler", "balanced_subset"]
