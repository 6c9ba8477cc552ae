"""Several clusterings of one stream, assigned in one batched pass (CoKe's K = 3000, 4000, 5000)."""

from __future__ import annotations


import numpy as np
from torch import Tensor

from ._base import BaseOnlineConstrainedKMeans, split_heads
from ._inputs import InputKind


class MultiOnlineConstrainedKMeans(BaseOnlineConstrainedKMeans):
    """Several online constrained k-means clusterings of the same features at once.

    The centers of all clusterings are stacked into one matrix, so a batch costs a single
    matrix multiply; each clustering keeps its own duals, centers, sizes and labels. Results
    come per clustering: ``labels_``, ``assigned_similarity_`` and :meth:`predict` have one
    column per clustering, ``cluster_centers_`` and the other per-cluster attributes are lists.

    Parameters
    ----------
    n_clusters : sequence of int, default=(3000, 4000, 5000)
        Number of clusters of each clustering.
    init : {"k-means++", "random"} or list of arrays, default="k-means++"
        Seeding method, or one (n_clusters[h], n_features) array per clustering.
    **other parameters** : as :class:`OnlineConstrainedKMeans`; the size bounds apply to
        every clustering, each relative to its own number of clusters.

    Examples
    --------
    >>> import numpy as np
    >>> from streamcoke import MultiOnlineConstrainedKMeans
    >>> X = np.random.default_rng(0).normal(size=(512, 16)).astype(np.float32)
    >>> km = MultiOnlineConstrainedKMeans(n_clusters=(5, 10), random_state=0).partial_fit(X)
    >>> km.labels_.shape, [c.shape for c in km.cluster_centers_]
    ((512, 2), [(5, 16), (10, 16)])
    """

    _parameter_constraints: dict = {
        **BaseOnlineConstrainedKMeans._parameter_constraints,
        "n_clusters": ["array-like"],
        "init": [str, list, tuple],
    }

    def __init__(self, n_clusters=(3000, 4000, 5000), *, min_size_ratio=0.4, max_size_ratio=None,
                 metric="cosine", center_update="mean", ema_momentum=0.99, dual_lr=None,
                 init="k-means++", batch_size=1024, n_epochs=10, shuffle=True, device=None,
                 random_state=None, verbose=False):
        self.n_clusters = n_clusters
        self.min_size_ratio = min_size_ratio
        self.max_size_ratio = max_size_ratio
        self.metric = metric
        self.center_update = center_update
        self.ema_momentum = ema_momentum
        self.dual_lr = dual_lr
        self.init = init
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.shuffle = shuffle
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _head_sizes(self) -> tuple[int, ...]:
        sizes = tuple(int(k) for k in np.atleast_1d(np.asarray(self.n_clusters)))
        if not sizes or any(k < 1 for k in sizes) or any(k != v for k, v in zip(sizes, np.atleast_1d(self.n_clusters))):
            raise ValueError(f"n_clusters must be a non-empty sequence of positive integers, got {self.n_clusters!r}")
        return sizes

    def _init_arrays(self):
        if isinstance(self.init, str):
            return None
        if len(self.init) != len(self._head_sizes()):
            raise ValueError(f"init has {len(self.init)} arrays for {len(self._head_sizes())} clusterings")
        return list(self.init)

    @classmethod
    def _init_is_list(cls) -> bool:
        return True

    def _heads_out(self, t: Tensor):
        return [self._out(b) for b in split_heads(t, self._head_sizes())]

    def _labels_out(self, labels: Tensor, kind: InputKind):
        return kind.out(labels)

    def _scalar_heads(self, values: np.ndarray):
        return [float(v) for v in values]
