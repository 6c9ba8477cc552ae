"""The dual schedule's single-step cap where it binds: objective and shortfall against the optimum.

The default schedule caps one ascent step at ``SINGLE_STEP_CAP * K * g``
(``streamcoke/core/schedule.py``). The cap binds when a batch holds one to three quotas of every
cluster (``b * gamma / K`` between about 1.3 and 3 at gamma 0.4), a range the main optimality grid
did not reach. For each case and each cap given, one pass of ``starved_clusters_problem`` with
fixed centers: objective as a share of the lowest Lagrangian bound (never below the optimum)
and the summed shortfall below the minimum sizes as a share of the total minimum.

    python benchmarks/bench_dual_cap.py                    # the five cases, caps 1.0 and 1.3 (~15 min)
    python benchmarks/bench_dual_cap.py --quick            # one small case, for the smoke test

Prints a Markdown table; writes benchmarks/results/dual_cap.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save_result, table  # noqa: E402

from streamcoke import OnlineConstrainedKMeans  # noqa: E402
from streamcoke.core import schedule  # noqa: E402
from streamcoke.core.certificate import tightest_dual_bound  # noqa: E402
from streamcoke.datasets import starved_clusters_problem  # noqa: E402

GAMMA = 0.4
CASES = [(50, 256, 50_000), (100, 512, 100_000), (200, 1024, 200_000), (300, 2048, 200_000),
         (1000, 4096, 410_000)]


def one_pass(X, C, batch_size: int, cap: float) -> OnlineConstrainedKMeans:
    saved = schedule.SINGLE_STEP_CAP
    schedule.SINGLE_STEP_CAP = cap  # read by the schedule at every batch
    try:
        km = OnlineConstrainedKMeans(len(C), min_size_ratio=GAMMA, init=C, center_update="none")
        for start in range(0, len(X), batch_size):
            km.partial_fit(X[start:start + batch_size])
    finally:
        schedule.SINGLE_STEP_CAP = saved
    return km


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--caps", type=float, nargs="+", default=[1.0, 1.3])
    p.add_argument("--quick", action="store_true", help="one small case, for the smoke test")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: results/dual_cap.json)")
    args = p.parse_args(argv)
    cases = [(50, 256, 20_000)] if args.quick else CASES
    rows = []
    for K, b, N in cases:
        X, C = starved_clusters_problem(N, K, random_state=0)
        S = torch.from_numpy(X).double() @ torch.from_numpy(C).double().T
        bound, _ = tightest_dual_bound(S, GAMMA * N / K, n_iter=300)
        del S
        row = {"K": K, "b": b, "N": N, "quotas a batch": b * GAMMA / K}
        for cap in args.caps:
            km = one_pass(X, C, b, cap)
            shortfall = np.clip(GAMMA * N / K - km.cluster_sizes_, 0, None).sum() / (GAMMA * N)
            row[f"cap {cap:g}"] = f"{100 * km.epoch_objective_ / float(bound):.2f}% / {100 * shortfall:.2f}%"
        rows.append(row)
        print(f"done K={K} b={b}", flush=True)
    print("streamcoke default schedule, fixed centers, one pass; objective / shortfall")
    print(table(rows, ["K", "b", "N", "quotas a batch"] + [f"cap {c:g}" for c in args.caps]))
    result = {"config": {"caps": args.caps, "quick": args.quick, "gamma": GAMMA}, "machine": machine(), "rows": rows}
    path = save_result(result, args.out, "dual_cap", args.quick)
    if path is not None:
        print("wrote", path)
    return result


if __name__ == "__main__":
    main()
