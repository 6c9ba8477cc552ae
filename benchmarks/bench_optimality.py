"""Optimality of the size-constrained assignment for fixed centers, against peers and the optimum.

The problem: one pass of an imbalanced stream (``streamcoke.datasets.starved_clusters_problem``:
half of the K fixed centers are the means of a Dirichlet-weighted mixture, half lie far from
most of the data, so unconstrained assignment starves many clusters). Every cluster must
receive at least ``gamma * N / K`` of the N samples. The objective is the summed cosine
similarity of each sample to its assigned center. Contenders, all with the same fixed centers:

- ``streamcoke``: ``OnlineConstrainedKMeans(init=centers, center_update="none")``, one pass of
  ``partial_fit`` over batches of b, default dual schedule;
- ``Sinkhorn (SwAV)``: per batch, a few Sinkhorn-Knopp iterations on ``exp(S / eps)``
  (equipartition, as SwAV computes its codes), then argmax (``sinkhorn_assign`` below);
- ``argmax (no constraint)``: nearest center, the objective's upper end when it starves;
- ``k-means-constrained`` (offline, the whole pass at once, not per batch): the minimum-size
  solver of the ``k-means-constrained`` package (min-cost flow, OR-tools) with the centers
  held fixed: ``KMeansConstrained(size_min=ceil(gamma N / K))`` with ``cluster_centers_`` set
  to the centers and ``predict(X)``, its public constrained assignment for given centers
  (``fit`` would move the centers: its ``max_iter=1`` still re-centres and re-assigns). It
  minimises the summed *unsquared* Euclidean distance, rounded to 1e-3, not our summed cosine
  similarity, so it is exact on its own terms and only near-exact on ours. Skipped when not
  installed or when N*K exceeds ``--kmc-max-arcs``.

The reference optimum is the LP (``streamcoke.core.exact.optimal_assignment``, HiGHS) where
N*K is small, else the lowest Lagrangian bound (``tightest_dual_bound``), which is never below
the optimum: ratios against it are, if anything, pessimistic. Reported per cell: objective as a
fraction of the optimum, summed shortfall below the minimum sizes as a fraction of the total
minimum, and the seconds the assignment took (contenders interleaved; one round in --quick).

    python benchmarks/bench_optimality.py [--smoke | --quick | --full]

Prints a Markdown table, writes benchmarks/results/optimality.json and optimality.png
(objective ratio and shortfall against batch size).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_size_flags, interleaved, machine, optional_import, pyplot, save_figure,  # noqa: E402
                    keeping_result, table, timed, write_json_to)

from streamcoke import OnlineConstrainedKMeans  # noqa: E402
from streamcoke.core.certificate import tightest_dual_bound  # noqa: E402
from streamcoke.core.exact import optimal_assignment  # noqa: E402
from streamcoke.datasets import starved_clusters_problem  # noqa: E402

SIZES = {
    # (K, N) problems, batch sizes, gammas, rounds, largest N*K for the LP and for
    # k-means-constrained, subgradient iterations of the dual bound
    "smoke": dict(problems=[(10, 3000), (30, 3000)], batches=[100, 500], gammas=[0.4], rounds=1,
                  lp_max=50_000, kmc_max=300_000, bound_iter=60),
    "quick": dict(problems=[(10, 20_000), (100, 50_000)], batches=[32, 256, 1024, 4096], gammas=[0.4],
                  rounds=1, lp_max=200_000, kmc_max=5_000_000, bound_iter=150),
    "full": dict(problems=[(10, 100_000), (100, 100_000), (1000, 200_000)],
                 batches=[32, 64, 256, 1024, 4096], gammas=[0.4, 0.8], rounds=3, lp_max=500_000,
                 kmc_max=10_000_000, bound_iter=300),
}

OURS, SINKHORN, ARGMAX, KMC = "streamcoke", "Sinkhorn (SwAV)", "argmax (no constraint)", "k-means-constrained"


@torch.no_grad()
def sinkhorn_assign(S: torch.Tensor, eps: float = 0.05, n_iter: int = 3) -> torch.Tensor:
    """SwAV-style equipartition codes of one batch of scores ``S`` (b, K), as hard labels.

    Sinkhorn-Knopp on ``Q = exp(S / eps)``: alternately scale the clusters' totals to 1/K and the
    samples' totals to 1/b, ``n_iter`` times (SwAV uses eps = 0.05, 3 iterations), then take
    each sample's largest entry (Caron et al., NeurIPS 2020).
    """
    Q = torch.exp((S - S.max()) / eps).double()
    Q /= Q.sum()
    b, K = Q.shape
    for _ in range(n_iter):
        Q /= Q.sum(dim=0, keepdim=True) * K
        Q /= Q.sum(dim=1, keepdim=True) * b
    return Q.argmax(dim=1)


def one_pass(X: np.ndarray, C: np.ndarray, gamma: float, b: int) -> np.ndarray:
    km = OnlineConstrainedKMeans(len(C), min_size_ratio=gamma, init=C, center_update="none", device="cpu")
    Xt = torch.from_numpy(X)
    labels = torch.empty(len(X), dtype=torch.int64)
    for start in range(0, len(X), b):
        km.partial_fit(Xt[start:start + b])
        labels[start:start + b] = km.labels_
    return labels.numpy()


def sinkhorn_pass(X: np.ndarray, C: np.ndarray, b: int) -> np.ndarray:
    Xt, Ct = torch.from_numpy(X), torch.from_numpy(C)
    return torch.cat([sinkhorn_assign(Xt[s:s + b] @ Ct.T) for s in range(0, len(X), b)]).numpy()


def kmc_assign(kmc, X: np.ndarray, C: np.ndarray, size_min: int) -> np.ndarray:
    model = kmc.KMeansConstrained(n_clusters=len(C), size_min=size_min, n_init=1)
    model.cluster_centers_ = C.astype(np.float64)  # fixed centers: predict only assigns
    return np.asarray(model.predict(X.astype(np.float64)))


def scores(S: np.ndarray, labels: np.ndarray, floor: float, optimum: float) -> dict:
    K = S.shape[1]
    sizes = np.bincount(labels, minlength=K)
    objective = float(S[np.arange(len(labels)), labels].sum())
    return {"objective": objective, "ratio": objective / optimum,
            "shortfall": float(np.clip(floor - sizes, 0, None).sum() / (floor * K)),
            "starved": int((sizes < floor).sum())}


def bench_problem(K: int, N: int, gamma: float, size: dict, kmc) -> list[dict]:
    X, C = starved_clusters_problem(N, K, random_state=0)
    S64 = X.astype(np.float64) @ C.T.astype(np.float64)
    floor = gamma * N / K
    if N * K <= size["lp_max"]:
        ref_s, (_, optimum) = timed(lambda: optimal_assignment(S64, floor))
        reference = "LP (HiGHS)"
    else:
        ref_s, (bound, _) = timed(lambda: tightest_dual_bound(torch.from_numpy(S64), floor, n_iter=size["bound_iter"]))
        optimum, reference = float(bound), "dual bound"
    print(f"  K={K} N={N} gamma={gamma}: optimum {optimum:,.2f} by {reference} in {ref_s:.1f} s", file=sys.stderr)
    base = {"K": K, "N": N, "gamma": gamma, "reference": reference, "optimum": optimum}
    out = []
    size_min = math.ceil(floor) if math.ceil(floor) * K <= N else math.floor(floor)

    labels: dict = {}

    def contender(name, fn):
        return keeping_result(labels, name, fn)
    # Batch-independent contenders: once per problem.
    once = {ARGMAX: contender(ARGMAX, lambda: S64.argmax(axis=1))}
    if kmc is not None and N * K <= size["kmc_max"]:
        once[KMC] = contender(KMC, lambda: kmc_assign(kmc, X, C, size_min))
    for name, seconds in interleaved(once, 1).items():
        out.append({**base, "method": name + (" (offline)" if name == KMC else ""), "b": "all",
                    "seconds": seconds, **scores(S64, labels[name], floor, optimum)})
    if kmc is not None and KMC not in once:
        print(f"  k-means-constrained skipped: N*K = {N * K:,} > --kmc-max-arcs", file=sys.stderr)
    for b in size["batches"]:
        per_batch = {OURS: contender(OURS, lambda b=b: one_pass(X, C, gamma, b)),
                     SINKHORN: contender(SINKHORN, lambda b=b: sinkhorn_pass(X, C, b))}
        for name, seconds in interleaved(per_batch, size["rounds"]).items():
            out.append({**base, "method": name, "b": b, "seconds": seconds,
                        **scores(S64, labels[name], floor, optimum)})
    return out


def plot(rows: list[dict], folder: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    problems = list(dict.fromkeys((r["K"], r["N"], r["gamma"]) for r in rows))
    fig, axes = plt.subplots(2, len(problems), figsize=(5 * len(problems), 7), squeeze=False, sharex=True)
    for j, (K, N, gamma) in enumerate(problems):
        mine = [r for r in rows if (r["K"], r["N"], r["gamma"]) == (K, N, gamma)]
        bs = sorted({r["b"] for r in mine if r["b"] != "all"})
        panels = [("ratio", "objective / optimum"), ("shortfall", "shortfall / total minimum")]
        for k, (key, label) in enumerate(panels):
            ax = axes[k][j]
            for m in [OURS, SINKHORN]:
                pts = sorted((r["b"], r[key]) for r in mine if r["method"] == m)
                ax.plot(*zip(*pts), marker="o", label=m)
            for r in mine:
                if r["b"] == "all":
                    ax.axhline(r[key], ls="--", lw=1, color="grey" if r["method"].startswith("argmax") else "k",
                               label=r["method"])
            ax.set_xscale("log")
            ax.set_xticks(bs, [str(b) for b in bs])
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if k == 0:
                ax.set_title(f"K = {K}, N = {N:,}, gamma = {gamma}")
            else:
                ax.set_xlabel("batch size")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, folder, "optimality")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_flags(p)
    p.add_argument("--kmc-max-arcs", type=int, default=None,
                   help="largest N*K given to k-means-constrained (default by size)")
    args = p.parse_args(argv)
    size = dict(SIZES[args.size])
    if args.kmc_max_arcs is not None:
        size["kmc_max"] = args.kmc_max_arcs
    kmc = optional_import("k_means_constrained", "the offline exact minimum-size solver")
    info, start = machine(), time.perf_counter()
    rows = []
    for K, N in size["problems"]:
        for gamma in size["gammas"]:
            rows += bench_problem(K, N, gamma, size, kmc)
    print(f"\n### Constrained assignment for fixed centers against the optimum (`bench_optimality.py --{args.size}`)\n")
    print("One pass of `starved_clusters_problem`; ratio = objective / optimum (or / the dual bound, "
          ">= optimum); shortfall = summed deficit below gamma N / K over the total minimum; starved = "
          "clusters below the minimum; seconds = the whole pass (CPU, noisy).\n")
    for r in rows:
        r["ratio %"], r["shortfall %"] = f"{100 * r['ratio']:.2f}", f"{100 * r['shortfall']:.2f}"
    print(table(rows, ["K", "N", "gamma", "reference", "method", "b", "ratio %", "shortfall %", "starved", "seconds"]))
    payload = {"size": args.size, "machine": info, "config": size, "seconds": time.perf_counter() - start,
               "rows": rows}
    print("wrote", write_json_to(args.out_dir, "optimality", payload))
    plot(rows, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
