"""Per-sample speed of streamcoke's river adapter against river.cluster.KMeans.

Both models see the same stream of dicts with 16 features and have 10 clusters. Each timing
is the best of several repeats of a timed loop (the least disturbed by other processes);
rates are samples per second.

    python benchmarks/bench_river.py [--quick]

Prints a table and writes benchmarks/results/river.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from river import cluster

from streamcoke.adapters.river import OnlineConstrainedKMeans

N_FEATURES, N_CLUSTERS = 16, 10
RESULTS = Path(__file__).parent / "results" / "river.json"


def make_stream(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(N_CLUSTERS, N_FEATURES))
    X = means[rng.integers(N_CLUSTERS, size=n)] + rng.normal(size=(n, N_FEATURES))
    return [{f"x{j}": float(v) for j, v in enumerate(row)} for row in X]


def best_rate(fn, xs: list[dict], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for x in xs:
            fn(x)
        best = min(best, time.perf_counter() - start)
    return len(xs) / best


def bench(n: int, repeats: int) -> dict:
    warm, xs = make_stream(2000, seed=1), make_stream(n)
    models = {
        "river.cluster.KMeans": cluster.KMeans(n_clusters=N_CLUSTERS, seed=0),
        "streamcoke OnlineConstrainedKMeans": OnlineConstrainedKMeans(n_clusters=N_CLUSTERS, seed=0),
    }
    rows = {}
    for name, model in models.items():
        for x in warm:  # past seeding, every center has every feature
            model.learn_one(x)
        rows[name] = {
            "learn_one_per_s": best_rate(model.learn_one, xs, repeats),
            "predict_one_per_s": best_rate(model.predict_one, xs, repeats),
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args()
    n, repeats = (2000, 3) if args.quick else (20000, 5)

    rows = bench(n, repeats)
    ours, theirs = rows["streamcoke OnlineConstrainedKMeans"], rows["river.cluster.KMeans"]
    speedup = {k: ours[k] / theirs[k] for k in ours}

    print(f"{N_FEATURES} features, {N_CLUSTERS} clusters, {n} samples, best of {repeats}")
    print(f"{'model':<36} {'learn_one/s':>12} {'predict_one/s':>14}")
    for name, r in rows.items():
        print(f"{name:<36} {r['learn_one_per_s']:>12,.0f} {r['predict_one_per_s']:>14,.0f}")
    print(f"{'speed-up':<36} {speedup['learn_one_per_s']:>11.2f}x {speedup['predict_one_per_s']:>13.2f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "n_features": N_FEATURES, "n_clusters": N_CLUSTERS, "n_samples": n, "repeats": repeats,
        "quick": args.quick, "results": rows, "speedup": speedup,
        "python": platform.python_version(), "machine": platform.machine(),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
