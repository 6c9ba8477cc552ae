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

Array = TypeVar("Array")  # a torch tensor or a numpy array: only operators and .clip are used


def dual_step(rho: Array, mu: Array, shares: Array, lower: Array, upper: Array | None,
              step_size) -> tuple[Array, Array]:
    """One projected ascent step on both duals; returns new arrays, the inputs are untouched.

    Works on torch tensors and numpy arrays alike, so the one-sample-at-a-time river adapter
    shares it with the batched estimator.
    """
    new_rho = (rho + step_size * (lower - shares)).clip(min=0)
    if upper is None:
        return new_rho, mu
    new_mu = (mu + step_size * (shares - upper)).clip(min=0)
    return new_rho, new_mu
