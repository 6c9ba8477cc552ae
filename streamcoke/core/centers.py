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

from . import cpu


def member_sums(X: Tensor, rows: Tensor, weights: Tensor | None, n_centers: int, n_heads: int = 1) -> Tensor:
    """Weighted sum of the members of every center, shape (n_centers, n_features).

    ``rows`` are the flat, head-major center indices of :func:`streamcoke.core.assign.flat_labels`
    (``n_heads`` blocks of ``len(X)``), so one scatter serves every head.
    """
    Xw = X if weights is None else X * weights.unsqueeze(1)
    if n_heads > 1:
        Xw = Xw.repeat(n_heads, 1)
    return scatter_sum(Xw, rows, n_centers)


def scatter_sum(values: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """``out[r] = sum of values[i] with rows[i] == r``, the same bits on every run.

    On the CPU ``index_add_`` adds in order. On CUDA it adds with atomics, in an order that
    changes from run to run, and so would the last bits of the centers, breaking the promise
    that a saved model continues exactly as an uninterrupted one; accumulating ``index_put_``
    sorts the rows first and sums in a fixed order there.
    """
    out = torch.zeros((n_rows,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device)
    if values.device.type == "cpu":
        return out.index_add_(0, rows, values)
    return out.index_put_((rows,), values, accumulate=True)


def _divide_rows(candidate: Tensor, denominators: Tensor, has_members: Tensor) -> Tensor:
    """``candidate[k] / denominators[k]`` for centers with members, ``candidate[k]`` unchanged
    (divided by exactly 1) for the others: one pass over the (K, d) matrix."""
    one = torch.ones((), dtype=denominators.dtype, device=denominators.device)
    return candidate / torch.where(has_members, denominators, one).to(candidate.dtype).unsqueeze(1)


def _row_norms(X: Tensor, eps: float = 1e-12) -> Tensor:
    return torch.linalg.vector_norm(X, dim=1).clamp_min(eps)


def running_mean_update(centers: Tensor, epoch_sums: Tensor, epoch_counts: Tensor, batch_sums: Tensor,
                        metric: str) -> tuple[Tensor, Tensor]:
    """Fold a batch's member sums into the epoch's running means; returns (centers, epoch_sums).

    ``epoch_counts`` already include the batch. With the cosine metric the mean's length does
    not matter (it is re-normalised), so the sums are normalised directly. A center without
    members this epoch keeps its previous value exactly.
    """
    epoch_sums = epoch_sums + batch_sums
    has_members = epoch_counts > 0
    denominators = _row_norms(epoch_sums) if metric == "cosine" else epoch_counts
    # Dividing by infinity zeroes the rows of centers without members; adding the old centers
    # there (and 0 times them elsewhere) puts them back without a separate select pass.
    inf = torch.full((), torch.inf, dtype=denominators.dtype, device=denominators.device)
    centers_new = epoch_sums / torch.where(has_members, denominators, inf).to(epoch_sums.dtype).unsqueeze(1)
    return centers_new.addcmul_(centers, (~has_members).to(centers.dtype).unsqueeze(1)), epoch_sums


def running_mean_step(X: Tensor, rows: Tensor, weights: Tensor | None, centers: Tensor, epoch_sums: Tensor,
                      epoch_counts: Tensor, n_heads: int, metric: str) -> tuple[Tensor, Tensor]:
    """:func:`member_sums` of a batch folded into :func:`running_mean_update` in one call;
    ``epoch_counts`` already include the batch. On the CPU one fused pass over the centers."""
    kernels = cpu.kernels() if X.device.type == "cpu" and X.dtype == torch.float32 else None
    if kernels is not None:
        w = torch.empty(0) if weights is None else weights.float().contiguous()
        return tuple(kernels.running_mean_update(X.contiguous(), rows.contiguous(), w, epoch_sums.contiguous(),
                                                 epoch_counts.double().contiguous(), centers.contiguous(),
                                                 metric == "cosine"))
    sums = member_sums(X, rows, weights, centers.shape[0], n_heads)
    return running_mean_update(centers, epoch_sums, epoch_counts, sums, metric)


def ema_update(centers: Tensor, batch_sums: Tensor, batch_counts: Tensor, momentum: float,
               metric: str) -> Tensor:
    """Move every center that received members toward their mean: ``c <- m c + (1 - m) mean``."""
    has_members = batch_counts > 0
    mean = _divide_rows(batch_sums, batch_counts, has_members)
    # A per-row weight of 1 on the old center leaves a center without members exactly in place.
    one = torch.ones((), dtype=centers.dtype, device=centers.device)
    weight = torch.where(has_members, torch.full((), momentum, dtype=centers.dtype, device=centers.device), one)
    candidate = torch.lerp(mean, centers, weight.unsqueeze(1))
    if metric == "cosine":
        return _divide_rows(candidate, _row_norms(candidate), has_members)
    return candidate
