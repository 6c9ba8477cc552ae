"""Estimators: online constrained k-means for one clustering or several at once."""

from .multi import MultiOnlineConstrainedKMeans
from .online_kmeans import OnlineConstrainedKMeans

__all__ = ["OnlineConstrainedKMeans", "MultiOnlineConstrainedKMeans"]
