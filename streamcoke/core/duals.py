"""Dual variables that enforce the cluster-size bounds, updated by projected dual ascent.

Each center ``k`` carries ``rho_k >= 0`` for its minimum share ``lower_k`` and ``mu_k >= 0`` for
its maximum share ``upper_k``. After a batch with member shares ``p_k = n_k / b``:

    rho_k <- max(0, rho_k + eta * (lower_k - p_k))
    mu_k  <- max(0, mu_k  + eta * (p_k - upper_k))

A cluster that received less than its share becomes more attractive for the next batch, one that
received more than its cap less attractive.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from . import cpu

Array = TypeVar("Array")  # a torch tensor or a numpy array


def _project(x: Array) -> Array:
    """Clamp a freshly computed array at 0, in place (numpy's ``maximum`` with ``out`` avoids the
    slow generic ``clip`` wrapper on the one-sample path)."""
    return np.maximum(x, 0.0, out=x) if isinstance(x, np.ndarray) else x.clamp_(min=0)


def dual_step(rho: Array, mu: Array, shares: Array, lower: Array, upper: Array | None,
              step_size) -> tuple[Array, Array]:
    """One projected ascent step on both duals; returns new arrays, the inputs are untouched.

    Works on torch tensors and numpy arrays alike, so the one-sample-at-a-time river adapter
    shares it with the batched estimator.
    """
    new_rho = _project(rho + step_size * (lower - shares))
    if upper is None:
        return new_rho, mu
    new_mu = _project(mu + step_size * (shares - upper))
    return new_rho, new_mu


def repeated_dual_steps(Z, alpha: float, centers, metric: str, rho, mu, lower, upper, plan, sizes, weights,
                        batch_weight: float, counts, labels, best):
    """All the ascent steps of a batch (``plan.n_iter``, one or several), on one process: after
    each step but the last the batch is re-assigned from its raw scores ``Z`` with the new duals
    and recounted. Given the first assignment (``labels``, ``best``, float64 ``counts``), returns
    ``(labels, best, counts, rho, mu, bias)`` of the last one, ``bias`` being the ``rho - mu`` it
    used; the same numbers as the estimator's loop of torch operations, which it replaces on
    the CPU. Returns None where the kernels of :mod:`streamcoke.core.cpu` do not run (the GPU,
    other dtypes, no compiler): the caller then runs that loop.
    """
    kernel = cpu.kernels() if Z.device.type == "cpu" and Z.dtype == torch.float32 else None
    if kernel is None:
        return None
    empty = torch.empty(0)
    sq = empty if metric == "cosine" else (centers * centers).sum(dim=1)  # as score_terms computes it
    return tuple(kernel.inner_dual_steps(
        Z, float(alpha), sq, rho.contiguous(), mu.contiguous(), lower.contiguous(),
        empty if upper is None else upper.contiguous(), [float(x) for x in plan.step], list(plan.n_iter),
        list(sizes), empty if weights is None else weights.float().contiguous(), float(batch_weight),
        counts.contiguous(), labels.contiguous(), best.contiguous()))
