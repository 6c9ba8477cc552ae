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
