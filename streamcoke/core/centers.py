"""Center updates from a batch's constrained assignment.

Three rules, chosen by the estimator's ``center_update``:

* running mean within an epoch (CoKe): each center is the mean of the members assigned to it so
  far in the current epoch; a center with no member yet this epoch keeps its previous value;
* exponential moving average, for never-ending or drifting streams;
* none: centers stay where they were initialised.

With the cosine metric every center is re-projected onto the unit sphere after the update.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .similarity import normalize_rows


def member_sums(X: Tensor, rows: Tensor, weights: Tensor | None, n_centers: int, n_heads: int = 1) -> Tensor:
    """Weighted sum of the members of every center, shape (n_centers, n_features).

    ``rows`` are the flat, head-major center indices of :func:`streamcoke.core.assign.flat_labels`
    (``n_heads`` blocks of ``len(X)``), so one scatter serves every head.
    """
    Xw = X if weights is None else X * weights.unsqueeze(1)
    if n_heads > 1:
        Xw = Xw.repeat(n_heads, 1)
    return torch.zeros(n_centers, X.shape[1], dtype=X.dtype, device=X.device).index_add_(0, rows, Xw)


def _finish(centers: Tensor, candidate: Tensor, has_members: Tensor, metric: str) -> Tensor:
    if metric == "cosine":
        candidate = normalize_rows(candidate)
    return torch.where(has_members.unsqueeze(1), candidate, centers)


def running_mean_update(centers: Tensor, epoch_sums: Tensor, epoch_counts: Tensor, batch_sums: Tensor,
                        metric: str) -> tuple[Tensor, Tensor]:
    """Fold a batch's member sums into the epoch's running means; returns (centers, epoch_sums).

    ``epoch_counts`` already include the batch. With the cosine metric the mean's length does
    not matter (it is re-normalised), so the sums are normalised directly.
    """
    epoch_sums = epoch_sums + batch_sums
    has_members = epoch_counts > 0
    if metric == "cosine":
        return _finish(centers, epoch_sums, has_members, metric), epoch_sums
    mean = epoch_sums / epoch_counts.clamp(min=1e-12).to(epoch_sums.dtype).unsqueeze(1)
    return _finish(centers, mean, has_members, metric), epoch_sums


def ema_update(centers: Tensor, batch_sums: Tensor, batch_counts: Tensor, momentum: float,
               metric: str) -> Tensor:
    """Move every center that received members toward their mean: ``c <- m c + (1 - m) mean``."""
    has_members = batch_counts > 0
    mean = batch_sums / batch_counts.clamp(min=1e-12).to(batch_sums.dtype).unsqueeze(1)
    return _finish(centers, torch.lerp(mean, centers, momentum), has_members, metric)
