"""Cluster river's ImageSegments stream with river's KMeans and with streamcoke's constrained
online k-means, side by side, both behind a StandardScaler.

Each sample is first predicted, then learned (prequential evaluation); the script prints the
adjusted Rand index against the 7 segment classes and how many samples each cluster received.

    python examples/river_stream.py
"""

from __future__ import annotations

from collections import Counter

from river import cluster, datasets, metrics, preprocessing

from streamcoke.adapters.river import OnlineConstrainedKMeans

K = 7  # ImageSegments has 7 classes


def run(model) -> tuple[float, list[int]]:
    ari, sizes = metrics.AdjustedRand(), Counter()
    for x, y in datasets.ImageSegments():
        label = model.predict_one(x)
        ari.update(y, label)
        sizes[label] += 1
        model.learn_one(x)
    return ari.get(), [sizes.get(k, 0) for k in range(K)]


def main() -> None:
    models = {
        "river KMeans": preprocessing.StandardScaler() | cluster.KMeans(n_clusters=K, halflife=0.1, seed=0),
        "streamcoke, min_size_ratio=0": preprocessing.StandardScaler()
        | OnlineConstrainedKMeans(n_clusters=K, min_size_ratio=0.0, seed=0),
        "streamcoke, min_size_ratio=0.4": preprocessing.StandardScaler()
        | OnlineConstrainedKMeans(n_clusters=K, min_size_ratio=0.4, seed=0),
    }
    print(f"ImageSegments, {K} clusters, prequential (predict, then learn)")
    print(f"{'model':<32} {'ARI':>6}  cluster sizes")
    for name, model in models.items():
        ari, sizes = run(model)
        print(f"{name:<32} {ari:6.3f}  {sizes}")


if __name__ == "__main__":
    main()
