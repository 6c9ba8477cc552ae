"""Catch-up bids: how the default schedule lifts a cluster that has fallen far below its minimum.

The ascent step of the default schedule is measured in units of ``g``, the mean gap between a
sample's best and second-best biased score (:mod:`streamcoke.core.schedule`). That is the right
scale for the many clusters near their share, but not for one whose center has moved away from
the data, as running-mean centers do over epochs: such a cluster can need a dual tens of ``g``
above its own before it wins its share, and at the ascent rate its dual climbs there over several
epochs while the cluster stays below its minimum the whole time.

So, after a batch's ascent step, a cluster that is *behind* also bids: one that has received
less than ``SHARE`` of its minimum share of the epoch so far, and at least ``BEHIND`` batch
quotas and ``MIN_ROWS`` rows less (at most ``MAX_BIDDERS`` a batch, the furthest behind). The bid is read off the scores the batch was assigned with: the ``q``-th smallest
margin ``best_i - (s_ik + rho_k - mu_k)`` over the batch's rows (``best_i`` the row's winning
biased score, ``q`` the cluster's quota of the batch rounded up) is how far its net dual would
have had to rise to win ``q`` of them, the price it would pay in an auction (Bertsekas's auction
algorithm). Where that price is at least ``LEVEL`` gaps ``g`` (beyond what the ascent reaches in
a few steps), the net dual ``rho_k - mu_k`` rises at least ``THETA`` of the way there. A bid
never lowers a dual, and clusters near their share never bid, so the ascent alone steers them.

The estimators (:class:`streamcoke.OnlineConstrainedKMeans` and the several-clusterings one)
bid with the default schedule only; a constant ``dual_lr`` keeps CoKe's plain ascent, and the
one-sample-at-a-time river learner the ascent alone. ``benchmarks/bench_catch_up.py`` measures
both sides: on fixed centers the bids keep the objective against the exact optimum within the
noise of ``tests/test_optimality.py``'s grid; on the long-tailed mixture of
``examples/curate_balanced.py`` with running-mean centers (K = 200, 8 epochs, batch 1024) the
last epoch has 3 clusters below the minimum, against 32 with the ascent alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

SHARE = 0.9  # a cluster bids while it holds less than this part of its prorated minimum ...
BEHIND = 2.0  # ... and is behind it by more than this many quotas of the batch
LEVEL = 5.0  # bids below this many score gaps are left to the ascent
THETA = 0.5  # part of the way to the winning level a bid goes
MIN_ROWS = 2.0  # nor while it is behind by fewer rows than this (a quota can be a small fraction of a row)
MAX_BIDDERS = 128  # bidders a batch at most, which bounds the cost of a batch's bids


def behind(lower: Tensor, epoch_counts: Tensor, epoch_weight: float, batch_weight: float, n_rows: int) -> Tensor:
    """Stacked indices of the centers that bid after this batch: below ``SHARE`` of their minimum
    share of the epoch so far, and behind it by more than ``BEHIND`` quotas of the batch and
    more than ``MIN_ROWS`` rows' weight. ``epoch_counts`` and ``epoch_weight`` include the
    batch. At most ``MAX_BIDDERS``, the furthest behind for their share, in index order."""
    if lower.device.type == "cpu":  # the same float32 / float64 operations, at numpy's per-call cost
        return torch.from_numpy(_behind_numpy(lower.numpy(), epoch_counts.numpy(), epoch_weight, batch_weight,
                                              n_rows))
    return _behind_torch(lower, epoch_counts, epoch_weight, batch_weight, n_rows)


def _behind_torch(lower: Tensor, epoch_counts: Tensor, epoch_weight: float, batch_weight: float,
                  n_rows: int) -> Tensor:
    share = lower * epoch_weight
    slack = torch.clamp(lower * (BEHIND * batch_weight), min=MIN_ROWS * batch_weight / n_rows)
    columns = torch.nonzero(epoch_counts < torch.minimum(share - slack, share * SHARE)).flatten()
    if columns.numel() > MAX_BIDDERS:
        held = epoch_counts.index_select(0, columns) / share.index_select(0, columns)
        columns = columns[torch.sort(held, stable=True).indices[:MAX_BIDDERS]].sort().values
    return columns


def _behind_numpy(lower: np.ndarray, epoch_counts: np.ndarray, epoch_weight: float, batch_weight: float,
                  n_rows: int) -> np.ndarray:
    f32 = lower.dtype.type
    share = lower * f32(epoch_weight)
    slack = np.maximum(lower * f32(BEHIND * batch_weight), f32(MIN_ROWS * batch_weight / n_rows))
    columns = np.flatnonzero(epoch_counts < np.minimum(share - slack, share * f32(SHARE)))
    if columns.size > MAX_BIDDERS:
        held = epoch_counts[columns] / share[columns]
        columns = np.sort(columns[np.argsort(held, kind="stable")[:MAX_BIDDERS]])
    return columns


def quota_rows(min_size_ratio: float, n_clusters: int, n_rows: int) -> int:
    """A cluster's quota of a batch of ``n_rows`` rows, rounded up: between 1 and ``n_rows``."""
    return min(n_rows, max(1, math.ceil(min_size_ratio * n_rows / n_clusters)))


def smallest_margins(Z: Tensor, alpha: float, terms: Tensor, best: Tensor, columns: Tensor, q: int) -> Tensor:
    """The ``q`` smallest margins ``best_i - (alpha Z_ik + terms_k)`` over the rows of ``Z`` for
    every stacked center ``k`` in ``columns``, ascending, shape ``(q, len(columns))``; ``+inf``
    below the last row where the batch has fewer than ``q``.

    ``Z``, ``alpha`` and ``terms`` as for :func:`streamcoke.core.assign.biased_argmax`, with the
    terms of the duals the batch was assigned with; ``best`` (n, len(columns)) or (n, 1): each
    row's winning score in the head of each column. Members have margin 0, so a center that won
    ``q`` rows has a level of 0.
    """
    biased = Z.index_select(1, columns)
    if alpha != 1.0:
        biased.mul_(alpha)
    margins = torch.sub(best, biased.add_(terms.index_select(0, columns))).clamp_(min=0)
    k = min(q, margins.shape[0])
    out = margins.topk(k, dim=0, largest=False).values
    if k < q:
        out = torch.cat([out, out.new_full((q - k, out.shape[1]), math.inf)])
    return out


def raised_duals(rho: Tensor, mu: Tensor, bias_used: Tensor, columns: Tensor, levels: Tensor,
                 min_levels: float | Tensor) -> Tensor:
    """``rho`` after the bids of ``columns``: where a column's level (the rise of its net dual
    that wins its quota) is at least ``min_levels`` (``LEVEL`` score gaps of its head), its net
    dual becomes at least ``bias_used + THETA * level``; a bid never lowers a dual."""
    levels = torch.nan_to_num(levels.to(rho.dtype), posinf=0.0)  # a new tensor: the input stays
    levels.masked_fill_(levels < min_levels, 0.0)
    want = (bias_used + mu).index_select(0, columns).add_(levels, alpha=THETA)
    return rho.index_copy(0, columns, torch.maximum(rho.index_select(0, columns), want))
