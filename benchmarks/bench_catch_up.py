"""The default schedule's catch-up bids against the ascent alone, with moving and fixed centers.

``streamcoke/core/catch_up.py`` lets a cluster far below its minimum bid for rows. Two checks,
each run with the bids (the default) and without them (``catch_up.SHARE = 0``: nobody bids):

- moving centers: ``streamcoke cluster`` on the built-in long-tailed mixture of
  ``examples/curate_balanced.py`` (40,000 embeddings, 64 dimensions, 50 classes with
  Dirichlet(0.3) weights; K = 200, minimum 80 a cluster, seed 0), for several batch sizes and
  epochs: the last epoch's smallest cluster, the clusters below the minimum, and NMI of the
  labels against the true classes;
- fixed centers: one pass of ``starved_clusters_problem``, objective as a share of the lowest
  Lagrangian bound (never below the optimum) and summed shortfall below the minimum sizes, on
  the small-batch, near-balanced cases of the optimality grid where bids could cost objective.

    python benchmarks/bench_catch_up.py            # ~10 min on two cores
    python benchmarks/bench_catch_up.py --quick    # one small case of each, for the smoke test

Prints Markdown tables; writes benchmarks/results/catch_up.json.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.metrics import normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save_result, table  # noqa: E402

from streamcoke import OnlineConstrainedKMeans  # noqa: E402
from streamcoke.cli import main as streamcoke  # noqa: E402
from streamcoke.core import catch_up  # noqa: E402
from streamcoke.core.certificate import tightest_dual_bound  # noqa: E402
from streamcoke.datasets import imbalanced_mixture, starved_clusters_problem  # noqa: E402

K_MOVING, RATIO = 200, 0.4
FIXED = [(10, 100_000, 1.0, 32), (10, 100_000, 1.0, 64), (100, 100_000, 0.8, 32), (100, 100_000, 0.8, 256),
         (100, 100_000, 0.4, 256)]


@contextlib.contextmanager
def bids(on: bool):
    saved = catch_up.SHARE
    if not on:
        catch_up.SHARE = 0.0  # no cluster is ever below 0 of its share: nobody bids
    try:
        yield
    finally:
        catch_up.SHARE = saved


def moving(rows: int, batch_sizes: list[int], epochs: int) -> list[dict]:
    X, y, _ = imbalanced_mixture(rows, 50, 64, concentration=0.3, random_state=0)
    minimum = RATIO * rows / K_MOVING
    out = []
    with tempfile.TemporaryDirectory(prefix="streamcoke-bench-") as tmp:
        emb = Path(tmp) / "embeddings.parquet"
        pq.write_table(pa.table({"id": np.arange(rows),
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), 64)}), emb)
        for b in batch_sizes:
            row = {"batch": b, "epochs": epochs, "quotas a batch": b * RATIO / K_MOVING}
            for on in (True, False):
                labels = Path(tmp) / "labels.parquet"
                with bids(on), contextlib.redirect_stdout(sys.stderr):
                    streamcoke(["cluster", str(emb), "--n-clusters", str(K_MOVING), "--epochs", str(epochs),
                                "--min-size-ratio", str(RATIO), "--batch-size", str(b), "--seed", "0",
                                "--out", str(labels), "--quiet"])
                t = pq.read_table(labels, columns=["id", "label"])
                ids, lab = t.column("id").to_numpy(), t.column("label").to_numpy()
                sizes = np.bincount(lab, minlength=K_MOVING)
                name = "bids" if on else "ascent alone"
                row[f"{name}: smallest"] = int(sizes.min())
                row[f"{name}: below {minimum:g}"] = int((sizes < minimum).sum())
                row[f"{name}: NMI"] = round(float(normalized_mutual_info_score(y[ids], lab)), 4)
            out.append(row)
            print(f"done moving b={b}", file=sys.stderr, flush=True)
    return out


def fixed(cases) -> list[dict]:
    out = []
    for K, N, gamma, b in cases:
        X, C = starved_clusters_problem(N, K, random_state=0)
        S = torch.from_numpy(X).double() @ torch.from_numpy(C).double().T
        bound, _ = tightest_dual_bound(S, gamma * N / K, n_iter=300)
        del S
        row = {"K": K, "N": N, "gamma": gamma, "b": b}
        for on in (True, False):
            with bids(on):
                km = OnlineConstrainedKMeans(K, min_size_ratio=gamma, init=C, center_update="none")
                for start in range(0, N, b):
                    km.partial_fit(X[start:start + b])
            shortfall = np.clip(gamma * N / K - km.cluster_sizes_, 0, None).sum() / (gamma * N)
            row["bids" if on else "ascent alone"] = \
                f"{100 * km.epoch_objective_ / float(bound):.2f}% / {100 * shortfall:.2f}%"
        out.append(row)
        print(f"done fixed K={K} b={b}", file=sys.stderr, flush=True)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="one small case of each, for the smoke test")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: results/catch_up.json)")
    args = p.parse_args(argv)
    if args.quick:
        moving_rows = moving(8000, [256], 2)
        fixed_rows = fixed([(10, 5000, 1.0, 32)])
    else:
        moving_rows = moving(40_000, args.batch_sizes, args.epochs)
        fixed_rows = fixed(FIXED)
    print(f"streamcoke cluster, running-mean centers, K = {K_MOVING}, min_size_ratio {RATIO}: last epoch")
    print(table(moving_rows, list(moving_rows[0])))
    print()
    print("streamcoke default schedule, fixed centers, one pass; objective / shortfall")
    print(table(fixed_rows, list(fixed_rows[0])))
    result = {"config": {"quick": args.quick, "epochs": args.epochs, "batch_sizes": args.batch_sizes},
              "machine": machine(), "moving": moving_rows, "fixed": fixed_rows}
    path = save_result(result, args.out, "catch_up", args.quick)
    if path is not None:
        print("wrote", path)
    return result


if __name__ == "__main__":
    main()
