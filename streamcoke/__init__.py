"""streamcoke: online clustering of data streams under cluster-size constraints.

The estimators follow scikit-learn's API and run on torch (CPU or GPU)::

    from streamcoke import OnlineConstrainedKMeans
    km = OnlineConstrainedKMeans(n_clusters=1000, min_size_ratio=0.4)
    for X in stream:
        km.partial_fit(X)
    km.end_epoch()
"""

from .cluster import MultiOnlineConstrainedKMeans, OnlineConstrainedKMeans

__version__ = "0.1.0"

__all__ = ["OnlineConstrainedKMeans", "MultiOnlineConstrainedKMeans", "__version__"]
