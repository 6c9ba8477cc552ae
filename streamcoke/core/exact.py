"""Exact size-constrained assignment for fixed centers, the reference the online rule is held to.

With fixed centers, assigning N samples to K clusters with every cluster holding at least
``L_k`` (and at most ``U_k``) samples is a transportation problem. Its constraint matrix is
totally unimodular, so the linear-programming optimum is integral; scipy's HiGHS solver finds
it in about a second for N = 4000, K = 20.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import linprog


def optimal_assignment(S, min_sizes, max_sizes=None) -> tuple[np.ndarray, float]:
    """Maximise ``sum_i S[i, y_i]`` subject to the size bounds; returns (labels, objective).

    Parameters
    ----------
    S : array of shape (N, K), the similarities.
    min_sizes : scalar or array of K minimum sizes (may be fractional; the bound is ``>=``).
    max_sizes : None, scalar or array of K maximum sizes.
    """
    S = np.asarray(S, dtype=np.float64)
    N, K = S.shape
    lower = np.broadcast_to(np.asarray(min_sizes, dtype=np.float64), (K,))
    # Variable y[i, k] sits at column i * K + k.
    rows_i = np.repeat(np.arange(N), K)
    one_per_sample = sparse.csr_matrix((np.ones(N * K), (rows_i, np.arange(N * K))), shape=(N, N * K))
    cols_k = np.tile(np.arange(K), N)
    per_cluster = sparse.csr_matrix((np.ones(N * K), (cols_k, np.arange(N * K))), shape=(K, N * K))
    A_ub, b_ub = [-per_cluster], [-lower]
    if max_sizes is not None:
        A_ub.append(per_cluster)
        b_ub.append(np.broadcast_to(np.asarray(max_sizes, dtype=np.float64), (K,)))
    result = linprog(
        -S.ravel(), A_ub=sparse.vstack(A_ub).tocsr(), b_ub=np.concatenate(b_ub),
        A_eq=one_per_sample, b_eq=np.ones(N), bounds=(0, 1), method="highs",
    )
    if result.status != 0:
        raise ValueError(f"the size-constrained assignment has no solution: {result.message}")
    Y = result.x.reshape(N, K)
    return Y.argmax(axis=1), float(-result.fun)
