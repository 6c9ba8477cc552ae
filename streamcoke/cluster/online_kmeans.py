"""The online constrained k-means estimator (CoKe) for one clustering of a stream."""

from __future__ import annotations

from numbers import Integral

import numpy as np
from sklearn.utils._param_validation import Interval
from torch import Tensor

from ._base import BaseOnlineConstrainedKMeans
from ._inputs import InputKind


class OnlineConstrainedKMeans(BaseOnlineConstrainedKMeans):
    """Online k-means whose clusters cannot starve: every cluster receives a minimum share.

    Mini-batches arrive one at a time. Each sample goes to the center that maximises its
    similarity plus the center's dual variable; the duals rise for clusters that received less
    than their minimum share and fall back to zero once they catch up, so an online stream
    reaches an assignment close to the best one that gives every cluster at least
    ``min_size_ratio * N / n_clusters`` of ``N`` samples (Online Constrained K-Means, Qian et al.,
    CVPR 2022). Only the minimum is enforced unless ``max_size_ratio`` is set, so clusters still
    grow to follow the data, while the degenerate solution of one huge cluster is ruled out.

    Centers and duals live on the GPU when there is one. Numpy input gives numpy results; torch
    tensors give tensors on their own device, with no copy to the host.

    Parameters
    ----------
    n_clusters : int, default=8
        Number of clusters ``K``.
    min_size_ratio : float in [0, 1], default=0.4
        Each cluster receives at least ``min_size_ratio / n_clusters`` of the samples of an
        epoch. 0 disables the bound (plain online k-means); 1 asks for exact balance.
    max_size_ratio : float >= 1 or None, default=None
        Each cluster receives at most ``max_size_ratio / n_clusters`` of the samples.
    metric : {"cosine", "euclidean"}, default="cosine"
        Cosine similarity on L2-normalised rows, or negative squared Euclidean distance.
    center_update : {"mean", "ema", "none"}, default="mean"
        ``"mean"``: each center is the running mean of its members in the current epoch;
        ``"ema"``: exponential moving average (for never-ending or drifting streams);
        ``"none"``: centers stay as initialised.
    ema_momentum : float in [0, 1], default=0.99
        With ``center_update="ema"``: ``center <- m * center + (1 - m) * batch mean``.
    dual_lr : float >= 0 or None, default=None
        Step size of the dual ascent per sample of a batch (a batch of ``b`` samples moves the
        duals by ``dual_lr * b * (share deficit)``): CoKe's plain projected ascent. None uses
        the library's default schedule (:mod:`streamcoke.core.schedule`), which measures its
        steps in the stream's own score gaps and lets a cluster far below its minimum bid for
        rows (:mod:`streamcoke.core.catch_up`).
    init : {"k-means++", "random"} or array of shape (n_clusters, n_features), default="k-means++"
        How the first batch seeds the centers.
    batch_size : int, default=1024
        Mini-batch size used by :meth:`fit` (``partial_fit`` takes the batches it is given).
    n_epochs : int, default=10
        Passes over the data made by :meth:`fit`.
    shuffle : bool, default=True
        Whether :meth:`fit` visits the samples in a new random order each epoch.
    device : str, torch.device or None, default=None
        Where centers and duals live; None picks CUDA when available, else the CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds the initialisation and :meth:`fit`'s shuffling.
    verbose : bool, default=False
        Show a progress bar during :meth:`fit`.

    Attributes
    ----------
    cluster_centers_ : array or tensor of shape (n_clusters, n_features)
        Current centers, updated after every batch.
    published_centers_ : array or tensor of shape (n_clusters, n_features)
        Centers as of the last :meth:`end_epoch`.
    duals_ : array or tensor of shape (n_clusters,)
        The minimum-size duals ``rho``.
    upper_duals_ : array or tensor of shape (n_clusters,)
        The maximum-size duals ``mu``.
    labels_ : array or tensor
        Constrained labels of the last batch (``partial_fit``) or of the last epoch (``fit``).
    assigned_similarity_ : array or tensor, float32, shaped as ``labels_``
        Each of those samples' similarity to its assigned center (cosine similarity, or minus
        the squared Euclidean distance) as the center stood when the sample was assigned,
        before the step moved it: the score the assignment used, without the duals.
    cluster_sizes_, last_epoch_cluster_sizes_ : array or tensor of shape (n_clusters,)
        Samples assigned to each cluster in the current and in the last completed epoch.
    epoch_objective_, epoch_dual_bound_, duality_gap_ : float
        The duality certificate of the current epoch (see ``duality_gap_``).
    n_features_in_, n_samples_seen_, n_steps_, n_epochs_completed_ : int

    See Also
    --------
    MultiOnlineConstrainedKMeans : several clusterings of one stream in one pass.
    sklearn.cluster.MiniBatchKMeans : unconstrained mini-batch k-means.

    Examples
    --------
    >>> import numpy as np
    >>> from streamcoke import OnlineConstrainedKMeans
    >>> rng = np.random.default_rng(0)
    >>> X = np.concatenate([rng.normal(size=(3600, 2)) + [5, 5], rng.normal(size=(400, 2)) - [5, 5]])
    >>> X = X[rng.permutation(len(X))]          # 90% of the stream in one blob, 10% in another
    >>> km = OnlineConstrainedKMeans(n_clusters=4, min_size_ratio=0.8, metric="euclidean",
    ...                              random_state=0)
    >>> for batch in np.array_split(X, 80):
    ...     _ = km.partial_fit(batch)
    >>> floor = 0.8 * len(X) / 4                # every cluster is owed at least 800 samples
    >>> bool(km.cluster_sizes_.min() >= 0.9 * floor), int(km.cluster_sizes_.sum())
    (True, 4000)
    >>> km.predict(X[:3]).shape
    (3,)
    """

    _parameter_constraints: dict = {
        **BaseOnlineConstrainedKMeans._parameter_constraints,
        "n_clusters": [Interval(Integral, 1, None, closed="left")],
        "init": [str, "array-like", Tensor],
    }

    def __init__(self, n_clusters=8, *, min_size_ratio=0.4, max_size_ratio=None, metric="cosine",
                 center_update="mean", ema_momentum=0.99, dual_lr=None, init="k-means++",
                 batch_size=1024, n_epochs=10, shuffle=True, device=None, random_state=None,
                 verbose=False):
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
        return (int(self.n_clusters),)

    def _init_arrays(self):
        return None if isinstance(self.init, str) else [self.init]

    def _heads_out(self, t: Tensor):
        return self._out(t)

    def _labels_out(self, labels: Tensor, kind: InputKind):
        return kind.out(labels[:, 0])

    def _scalar_heads(self, values: np.ndarray):
        return float(values[0])
