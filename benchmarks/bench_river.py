"""Per-sample speed of streamcoke's river adapter against river.cluster.KMeans.

Both models see the same stream of dicts with 16 features and have 10 clusters. Each timing
is the best of several rounds of a timed loop (the least disturbed by other processes), the
rounds alternating between the two models; rates are samples per second.

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


def timed(fn, xs: list[dict]) -> float:
    start = time.perf_counter()
    for x in xs:
        fn(x)
    return time.perf_counter() - start


def bench(n: int, repeats: int) -> dict:
    warm, xs = make_stream(2000, seed=1), make_stream(n)
    models = {
        "river.cluster.KMeans": cluster.KMeans(n_clusters=N_CLUSTERS, seed=0),
        "streamcoke OnlineConstrainedKMeans": OnlineConstrainedKMeans(n_clusters=N_CLUSTERS, seed=0),
    }
    for model in models.values():
        for x in warm:  # past seeding, every center has every feature
            model.learn_one(x)
    best = {name: {"learn_one": float("inf"), "predict_one": float("inf")} for name in models}
    # Rounds alternate between the models, so a slower spell of the machine hits both.
    for _ in range(repeats):
        for name, model in models.items():
            best[name]["learn_one"] = min(best[name]["learn_one"], timed(model.learn_one, xs))
            best[name]["predict_one"] = min(best[name]["predict_one"], timed(model.predict_one, xs))
    return {name: {"learn_one_per_s": len(xs) / t["learn_one"], "predict_one_per_s": len(xs) / t["predict_one"]}
            for name, t in best.items()}


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
