"""Constrained assignment: each sample goes to ``argmax_k (s_ik + rho_k - mu_k)``.

The duals ``rho`` (minimum size) and ``mu`` (maximum size) enter as one per-center bias, so the
assignment costs one fused matrix multiply-add and one row-wise max, exactly as much as plain
nearest-center assignment. Several clusterings of the same samples ("heads") share the multiply:
their centers are stacked into one matrix and the row-wise max is taken per head.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from . import cpu
from .centers import scatter_sum
from .schedule import gap_sums
from .similarity import multiply_kernel_for, products, row_offset, score_terms


def head_offsets(sizes: Sequence[int]) -> list[int]:
    """Start of each head's block of centers in the stacked center matrix."""
    offsets, start = [], 0
    for k in sizes:
        offsets.append(start)
        start += k
    return offsets


def assign(
    X: Tensor,
    centers: Tensor,
    bias: Tensor,
    sizes: Sequence[int],
    metric: str,
) -> tuple[Tensor, Tensor]:
    """Assign prepared samples to the centers of every head.

    Parameters
    ----------
    X : (n, d) prepared samples (see :func:`streamcoke.core.similarity.prepare`).
    centers : (sum(sizes), d) stacked centers of all heads.
    bias : (sum(sizes),) per-center bias, ``rho - mu`` (zeros for plain nearest center).
    sizes : number of centers of each head.
    metric : ``"cosine"`` or ``"euclidean"``.

    Returns
    -------
    labels : (n, n_heads) int64, each head's label counted from 0 within the head.
    best : (n, n_heads) ``max_k (s_ik + bias_k)`` with the true scores ``s`` (for certificates).
    """
    alpha, b = score_terms(centers, bias, metric)
    _, labels, best, _ = scored_argmax(X, centers, b, sizes, alpha)
    offset = row_offset(X, metric)
    return labels, best if offset is None else best + offset.unsqueeze(1)


def biased_argmax(Z: Tensor, bias: Tensor, sizes: Sequence[int], alpha: float = 1.0,
                  gap_rows: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head argmax of the biased scores ``alpha * Z + bias``.

    ``Z`` is the raw (n, sum(sizes)) product of samples and centers and is left unchanged; the
    terms of :func:`streamcoke.core.similarity.score_terms` turn it into biased scores.

    Returns
    -------
    labels : (n, n_heads) int64, counted within each head (the first maximum wins ties).
    best : (n, n_heads) float32, the winning biased scores.
    gap : (2 * n_heads,) float64, the sums of :func:`streamcoke.core.schedule.gap_sums` over
        the first ``gap_rows`` rows (zeros when ``gap_rows`` is 0).
    """
    kernels = cpu.kernels() if Z.device.type == "cpu" and Z.dtype == torch.float32 else None
    if kernels is not None:
        return tuple(kernels.biased_argmax(Z.contiguous(), bias.contiguous(), float(alpha), list(sizes),
                                           int(gap_rows)))
    Zb = torch.add(bias, Z, alpha=alpha)
    labels = head_argmax(Zb, sizes)
    gap = gap_sums(Zb, labels, sizes, gap_rows) if gap_rows > 0 else torch.zeros(2 * len(sizes),
                                                                                 dtype=torch.float64)
    return labels, winning_scores(Zb, labels, sizes), gap.to(Z.device)


def scored_argmax(X: Tensor, centers: Tensor, bias: Tensor, sizes: Sequence[int], alpha: float = 1.0,
                  gap_rows: int = 0, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``Z = products(X, centers)`` and :func:`biased_argmax` of it: ``(Z, labels, best, gap)``.

    ``Z`` is written into ``out`` where that is a contiguous (n, n_centers) buffer. On the CPU one
    call of :mod:`streamcoke.core.cpu` does both, each thread reading its chunk of ``Z`` back
    while the chunk is still in the core's cache; its multiply is the one
    :func:`~streamcoke.core.similarity.products` would use.
    """
    kernels = cpu.kernels() if X.device.type == "cpu" and X.dtype == centers.dtype == torch.float32 else None
    if kernels is None:
        Z = products(X, centers, out=out)
        return (Z, *biased_argmax(Z, bias, sizes, alpha, gap_rows))
    if out is None or not out.is_contiguous():
        out = torch.empty((X.shape[0], centers.shape[0]), dtype=torch.float32)
    use_kernel = multiply_kernel_for(X, centers) is not None
    labels, best, gap = kernels.scored_argmax(X.contiguous(), centers.contiguous(), out, bias.contiguous(),
                                              float(alpha), list(sizes), int(gap_rows), use_kernel, 0)
    return out, labels, best, gap


def head_argmax(Z: Tensor, sizes: Sequence[int]) -> Tensor:
    """Per-head argmax of a stacked score matrix, shape (n, n_heads), labels counted per head."""
    if len(sizes) == 1:
        return row_argmax(Z).unsqueeze(1)
    return torch.stack([row_argmax(Z[:, o : o + k]) for o, k in zip(head_offsets(sizes), sizes)], dim=1)


def winning_scores(Z: Tensor, labels: Tensor, sizes: Sequence[int], offset: Tensor | None = None) -> Tensor:
    """The entries of ``Z`` at ``labels`` (n, n_heads), plus the per-row ``offset`` if any."""
    best = Z.gather(1, flat_labels(labels, sizes).reshape(len(sizes), -1).T)
    return best if offset is None else best + offset.unsqueeze(1)


def row_argmax(Z: Tensor) -> Tensor:
    """Column of the largest entry of every row.

    On the CPU numpy's SIMD argmax over the same memory is an order of magnitude faster than
    torch's reduction, which would otherwise cost as much as the matrix multiply itself.
    """
    if Z.device.type == "cpu" and Z.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(Z.detach().numpy().argmax(axis=1))
    return Z.argmax(dim=1)


def label_counts(rows: Tensor, weights: Tensor | None, n_centers: int) -> Tensor:
    """Float64 weight received by every row of the stacked center matrix, shape (n_centers,).

    ``rows`` from :func:`flat_labels` (n * n_heads, head-major), ``weights`` (n,) or None for
    ones. Weighted sums are added in the order of ``rows`` on every path except the GPU's
    weighted one (a fixed-order scatter), so they carry the same bits on every call.
    """
    if rows.device.type == "cpu":
        kernel = cpu.kernels()
        if kernel is not None:
            return kernel.label_counts(rows.contiguous(), torch.empty(0) if weights is None
                                       else weights.float().contiguous(), n_centers)
        # numpy's bincount: a fraction of torch's per-call cost
        w = None if weights is None else np.tile(weights.numpy().astype(np.float64), rows.shape[0] // weights.shape[0])
        return torch.from_numpy(np.bincount(rows.numpy(), weights=w, minlength=n_centers).astype(np.float64))
    if weights is None:  # integer counts: exact whatever the order of the additions
        return torch.bincount(rows, minlength=n_centers).double()
    return scatter_sum(weights.double().repeat(rows.shape[0] // weights.shape[0]), rows, n_centers)


def flat_labels(labels: Tensor, sizes: Sequence[int]) -> Tensor:
    """Labels as rows of the stacked center matrix, shape (n * n_heads,), head-major."""
    if len(sizes) == 1:
        return labels[:, 0]
    offsets = torch.as_tensor(head_offsets(sizes), device=labels.device)
    return (labels + offsets).T.reshape(-1)
