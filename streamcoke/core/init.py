"""Initial centers: k-means++ seeding or random samples, drawn from the first batch."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import kmeans_plusplus
from torch import Tensor


def initial_centers(X: Tensor, n_clusters: int, method: str, rng: np.random.RandomState,
                    weights: Tensor | None = None) -> Tensor:
    """Pick ``n_clusters`` starting centers among the prepared rows of ``X``.

    ``"k-means++"`` uses scikit-learn's seeding (greedy, with several local trials); it runs once,
    on the host, on the first batch only. ``"random"`` draws distinct rows uniformly (or in
    proportion to ``weights``).
    """
    n = X.shape[0]
    if n < n_clusters:
        raise ValueError(
            f"n_samples={n} should be >= n_clusters={n_clusters}: the first batch initialises the "
            "centers, so it needs at least n_clusters samples (or pass init=array of shape "
            "(n_clusters, n_features))."
        )
    w = None if weights is None else weights.detach().double().cpu().numpy()
    if method == "k-means++":
        X_host = X.detach().double().cpu().numpy()
        _, idx = kmeans_plusplus(X_host, n_clusters, sample_weight=w, random_state=rng)
    elif method == "random":
        p = None if w is None else w / w.sum()
        idx = rng.choice(n, size=n_clusters, replace=False, p=p)
    else:  # pragma: no cover - validated by the estimator
        raise ValueError(f"unknown init method {method!r}")
    return X[torch.as_tensor(idx, device=X.device)].clone()
