"""Duality certificates: how far an assignment can be from the constrained optimum.

For fixed centers the size-constrained assignment of ``N`` samples is a linear program. Its
Lagrangian dual gives, for any duals ``rho >= 0`` (minimum sizes ``L_k``) and ``mu >= 0``
(maximum sizes ``U_k``), the upper bound on the optimal objective

    D(rho, mu) = sum_i max_k (s_ik + rho_k - mu_k) - sum_k rho_k L_k + sum_k mu_k U_k.

Any feasible assignment scores at most ``D``; the gap ``D - objective`` therefore bounds how much
an assignment could still gain.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu
from .similarity import row_offset


def dual_bound(S: Tensor, rho: Tensor, min_sizes: Tensor, mu: Tensor | None = None,
               max_sizes: Tensor | None = None) -> Tensor:
    """Exact ``D(rho, mu)`` for a full score matrix ``S`` of shape (N, K)."""
    net = rho if mu is None else rho - mu
    bound = (S + net).max(dim=1).values.to(torch.float64).sum() - (rho.double() * min_sizes).sum()
    if mu is not None and max_sizes is not None:
        bound = bound + (mu.double() * max_sizes).sum()
    return bound


def streaming_bound_correction(reference: Tensor, current: Tensor, sizes) -> Tensor:
    """Per-head, per-sample slack that turns a batch's row maxima under ``current`` duals into a bound
    under the fixed ``reference`` duals: ``max_k (reference_k - current_k)``.

    It follows from ``s + r = (s + c) + (r - c) <= max(s + c) + max(r - c)``, so the bound stays
    valid while the duals move during the epoch, at a cost of O(K) per batch.
    """
    diff = reference - current
    if len(sizes) == 1:
        return diff.max().reshape(1)
    return torch.stack([block.max() for block in torch.split(diff, list(sizes))])


def batch_terms(best: Tensor, X: Tensor, metric: str, weights: Tensor | None, counts: Tensor, bias: Tensor,
                reference: Tensor, sizes) -> Tensor:
    """One batch's contribution to the epoch's certificate, per head: float64 ``(3 * n_heads,)``
    holding the objective (the summed winning scores less the bias they contain), the summed
    winning scores (row maxima) and the per-sample :func:`streaming_bound_correction`.

    ``best`` (n, n_heads) are the winning biased scores without the row constant that
    :func:`streamcoke.core.similarity.score_terms` leaves out (``-||x||^2`` for Euclidean),
    ``counts`` (float64) the weight each center received and ``bias`` the ``rho - mu`` used;
    the bias paid is ``counts . bias``, so no per-sample gather is needed.
    """
    kernel = cpu.kernels() if best.device.type == "cpu" and best.dtype == bias.dtype == torch.float32 \
        and X.dtype == torch.float32 else None
    if kernel is not None:
        return kernel.certificate_terms(
            best.contiguous(), torch.empty(0) if metric == "cosine" else X.contiguous(),
            torch.empty(0) if weights is None else weights.float().contiguous(), counts.contiguous(),
            bias.contiguous(), reference.contiguous(), list(sizes))
    offset = row_offset(X, metric)
    if offset is not None:
        best = best + offset.unsqueeze(1)
    best = best.double()
    if weights is not None:
        best = best * weights.double().unsqueeze(1)
    row_max = best.sum(0)
    paid = counts * bias.double()
    bias_paid = paid.sum().reshape(1) if len(sizes) == 1 else torch.stack([p.sum() for p in torch.split(paid, list(sizes))])
    return torch.cat([row_max - bias_paid, row_max, streaming_bound_correction(reference, bias, sizes).double()])


def tightest_dual_bound(S: Tensor, min_sizes: Tensor, n_iter: int = 300) -> tuple[Tensor, Tensor]:
    """Search for duals whose bound ``D(rho)`` is as low as possible; returns ``(bound, rho)``.

    Projected subgradient descent on the convex function ``D`` (its subgradient in ``rho_k`` is
    the size of cluster ``k`` under ``argmax(S + rho)`` minus ``min_sizes[k]``), keeping the
    lowest value seen. Every value returned is a valid upper bound on the optimum; with enough
    iterations it approaches the optimum itself, which makes it an exact reference for
    problems too large for a linear-programming solver.
    """
    S = S.double()
    N, K = S.shape
    min_sizes = torch.as_tensor(min_sizes, dtype=torch.float64, device=S.device).expand(K)
    rho = torch.zeros(K, dtype=torch.float64, device=S.device)
    top2 = S.topk(min(2, K), dim=1).values
    scale = float((top2[:, 0] - top2[:, -1]).mean()) if K > 1 else 1.0
    best, best_rho = None, rho
    for t in range(n_iter):
        Z = S + rho
        values, labels = Z.max(dim=1)
        bound = values.sum() - (rho * min_sizes).sum()
        if best is None or bound < best:
            best, best_rho = bound, rho
        sizes = torch.bincount(labels, minlength=K).double()
        step = 2.0 * scale * K / (N * (t + 1) ** 0.5)
        rho = (rho - step * (sizes - min_sizes)).clamp(min=0)
    return best, best_rho
