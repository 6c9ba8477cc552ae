"""Similarity between samples and centers, the quantity every other step is built on.

Two metrics are supported:

* ``"cosine"``: ``s_ik = <x_i, c_k>`` on L2-normalised rows (CoKe's choice for deep features);
* ``"euclidean"``: ``s_ik = -||x_i - c_k||^2``, so that "larger is better" holds for both.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import cpu

METRICS = ("cosine", "euclidean")
KERNEL_MIN_ROWS = 64


def normalize_rows(X: Tensor, eps: float = 1e-12) -> Tensor:
    """Return ``X`` with every row scaled to unit L2 norm (zero rows stay zero), as a new tensor.

    On the CPU one pass of :mod:`streamcoke.core.cpu` (float32, the default ``eps``), where
    ``torch.nn.functional.normalize`` takes three; the two agree to float32 rounding.
    """
    kernel = cpu.kernels() if X.device.type == "cpu" and X.dtype == torch.float32 and X.ndim == 2 \
        and eps == 1e-12 else None
    if kernel is not None:
        return kernel.normalize_rows(X.contiguous())
    return torch.nn.functional.normalize(X, dim=1, eps=eps)


def prepare(X: Tensor, metric: str) -> Tensor:
    """Put samples in the space the metric compares them in (unit sphere for cosine)."""
    return normalize_rows(X) if metric == "cosine" else X


def multiply_kernel_for(X: Tensor, centers: Tensor):
    """The compiled module whose AVX-512 multiply :func:`products` uses for ``X @ centers.T``,
    or None where the BLAS does it."""
    if X.device.type == "cpu" and X.dtype == centers.dtype == torch.float32 and X.shape[0] >= KERNEL_MIN_ROWS:
        return cpu.multiply_kernel()
    return None


def products(X: Tensor, centers: Tensor, out: Tensor | None = None) -> Tensor:
    """``X @ centers.T``, shape ``(n_samples, n_centers)``, into ``out`` when given.

    Where :func:`streamcoke.core.cpu.multiply_kernel` picks it (a CPU with AVX-512 whose BLAS is
    the slower, as on AMD processors), the multiply of :mod:`streamcoke.core.cpu` runs it for
    batches of ``KERNEL_MIN_ROWS`` rows or more (below that, repacking the centers costs more than
    it saves), elsewhere torch's BLAS; the two agree to float32 rounding (they add the features in
    different orders).
    """
    kernel = multiply_kernel_for(X, centers)
    if kernel is None:
        return torch.mm(X, centers.T, out=out)
    if out is None:
        out = torch.empty((X.shape[0], centers.shape[0]), dtype=X.dtype)
    kernel.scores_into(X.contiguous(), centers.contiguous(), out)
    return out


def scores(X: Tensor, centers: Tensor, metric: str) -> Tensor:
    """Similarity of every prepared sample to every center, shape ``(n_samples, n_centers)``."""
    Z = products(X, centers)
    if metric == "cosine":
        return Z
    # -||x - c||^2 = 2 <x, c> - ||c||^2 - ||x||^2: the multiply plus two broadcasts.
    sq_c = (centers * centers).sum(dim=1)
    sq_x = (X * X).sum(dim=1, keepdim=True)
    return Z.mul_(2.0).sub_(sq_c.unsqueeze(0)).sub_(sq_x)


def label_scores(Z: Tensor, labels: Tensor, offsets: Sequence[int], centers: Tensor, X: Tensor,
                 metric: str) -> Tensor:
    """Similarity of each sample to the center its label names, per head, shape (n, n_heads),
    read from the raw product ``Z = X @ centers.T`` that assigned it: a gather, not a second
    pass over ``X`` and the centers. ``labels`` (n, n_heads) are counted within each head,
    ``offsets`` are the heads' first rows in ``centers`` and ``X`` is prepared. The values
    are those of :func:`scores` at the labels, in the same operation order.
    """
    idx = labels if len(offsets) == 1 else labels + torch.as_tensor(offsets, device=labels.device)
    z = Z.gather(1, idx)
    if metric == "cosine":
        return z
    sq_c = (centers * centers).sum(dim=1)[idx]
    return z.mul_(2.0).sub_(sq_c).sub_((X * X).sum(dim=1, keepdim=True))


def score_terms(centers: Tensor, bias: Tensor, metric: str) -> tuple[float, Tensor]:
    """``(alpha, b)`` such that ``alpha * (X @ centers.T) + b`` are the biased scores
    ``scores(X, centers) + bias`` up to a per-row constant.

    The per-row term ``-||x||^2`` of the Euclidean metric does not change which center wins, so
    it is left out; :func:`row_offset` returns it for callers that need true scores. Keeping the
    multiply apart lets the cheap per-center terms be added where the scores are next read, so a
    new bias needs no new multiply.
    """
    if metric == "cosine":
        return 1.0, bias
    return 2.0, bias - (centers * centers).sum(dim=1)


def row_offset(X: Tensor, metric: str) -> Tensor | None:
    """The per-row constant that :func:`score_terms` leaves out (``None`` when there is none)."""
    if metric == "cosine":
        return None
    return (X * X).sum(dim=1).neg()
