"""Clustering quality against known classes: streamcoke and its peers on real and synthetic data.

Data that need no download: scikit-learn's digits (``streamcoke.datasets.load_digits_features``,
1797 x 64 pixels, 10 classes, used as is), river's ImageSegments (2310 x 18, 7 classes,
standardised) and an imbalanced Gaussian mixture on the sphere
(``streamcoke.datasets.imbalanced_mixture``, Dirichlet(0.3) weights). K = the number of classes.
Every method clusters the same rows; scores are ACC (Hungarian), NMI and ARI
(``streamcoke.metrics.clustering_scores``) of the labels each method gives the data:

- ``streamcoke, 1 pass`` / ``10 passes``: ``OnlineConstrainedKMeans(min_size_ratio=0.4)``,
  ``fit`` with ``n_epochs`` 1 or 10, batches of ``--batch-size``, cosine metric (its default);
  the labels are the constrained labels of the last pass (``labels_``);
- ``streamcoke, no constraint``: the same, 10 passes, ``min_size_ratio=0`` (plain online k-means);
- ``scikit-learn KMeans(n_init=10)`` (Lloyd) and ``MiniBatchKMeans`` (same batch size);
- ``faiss Kmeans`` (``faiss-cpu``, 20 Lloyd iterations, one run), labels by ``index.search``;
- ``river KMeans``: ``learn_one`` over the stream once, then ``predict_one``;
- ``k-means-constrained``: ``KMeansConstrained(size_min=floor(0.4 N / K))``, the offline
  minimum-size k-means, the same constraint as streamcoke's.

``passes`` counts sweeps over the data: iterations x initialisations for the Lloyd-type
methods (``KMeans`` reports only its best run's iterations, so its figure is n_init x that),
the epochs of mini-batch methods. Times are wall seconds on this machine, contenders
interleaved (noisy on a shared machine).

    python benchmarks/bench_quality.py [--smoke | --quick | --full]

Prints a Markdown table, writes benchmarks/results/quality.json and quality_sizes.png (sorted
cluster sizes of each method, with and without the size constraint, and the true class sizes).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_size_flags, interleaved, machine, optional_import, pyplot, save_figure,  # noqa: E402
                    keeping_result, table, write_json_to)

from streamcoke import OnlineConstrainedKMeans  # noqa: E402
from streamcoke.datasets import imbalanced_mixture, load_digits_features  # noqa: E402
from streamcoke.metrics import clustering_scores  # noqa: E402

GAMMA = 0.4
SIZES = {
    # data sets (name, mixture size), rounds, k-means-constrained initialisations and iterations
    "smoke": dict(datasets=[("digits", None), ("mixture", (2000, 10, 16))], rounds=1, epochs=3,
                  kmc=(1, 10)),
    "quick": dict(datasets=[("digits", None), ("image_segments", None), ("mixture", (10_000, 20, 32))],
                  rounds=1, epochs=10, kmc=(3, 30)),
    "full": dict(datasets=[("digits", None), ("image_segments", None), ("mixture", (20_000, 20, 32)),
                           ("mixture", (50_000, 50, 64))], rounds=3, epochs=10, kmc=(10, 300)),
}


def load(name: str, spec) -> tuple[str, np.ndarray, np.ndarray]:
    if name == "digits":
        X, y = load_digits_features()
        return "digits", X, y
    if name == "image_segments":
        from river import datasets
        from sklearn.preprocessing import StandardScaler

        rows = list(datasets.ImageSegments())
        keys = list(rows[0][0])
        X = np.array([[x[k] for k in keys] for x, _ in rows], dtype=np.float64)
        _, y = np.unique([c for _, c in rows], return_inverse=True)
        return "ImageSegments", StandardScaler().fit_transform(X).astype(np.float32), y
    n, k, d = spec
    X, y, _ = imbalanced_mixture(n, k, d, random_state=0)
    return f"mixture N={n:,} K={k} d={d}", X, y


def methods(K: int, X: np.ndarray, size: dict, b: int, peers: dict) -> dict:
    """name -> function returning (labels, passes)."""
    N, d = X.shape
    epochs = size["epochs"]

    def ours(n_epochs, gamma):
        def run():
            km = OnlineConstrainedKMeans(K, min_size_ratio=gamma, n_epochs=n_epochs, batch_size=b,
                                         device="cpu", random_state=0).fit(X)
            return np.asarray(km.labels_).ravel(), n_epochs
        return run

    def sk_kmeans():
        from sklearn.cluster import KMeans

        km = KMeans(K, n_init=10, random_state=0).fit(X)
        return km.labels_, 10 * km.n_iter_

    def sk_minibatch():
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(K, batch_size=b, random_state=0).fit(X)
        return km.labels_, km.n_steps_ * b / N

    out = {"streamcoke, 1 pass": ours(1, GAMMA), f"streamcoke, {epochs} passes": ours(epochs, GAMMA),
           f"streamcoke, no constraint, {epochs} passes": ours(epochs, 0.0),
           "scikit-learn KMeans(n_init=10)": sk_kmeans, "scikit-learn MiniBatchKMeans": sk_minibatch}
    if peers["faiss"] is not None:
        faiss = peers["faiss"]

        def faiss_kmeans():
            xs = np.ascontiguousarray(X, dtype=np.float32)
            km = faiss.Kmeans(d, K, niter=20, nredo=1, seed=1, verbose=False)
            km.train(xs)
            return km.index.search(xs, 1)[1][:, 0], 20

        out["faiss Kmeans"] = faiss_kmeans
    if peers["river"] is not None:
        river = peers["river"]
        dicts = [dict(enumerate(row.tolist())) for row in X]

        def river_kmeans():
            km = river.cluster.KMeans(n_clusters=K, seed=0)
            for x in dicts:
                km.learn_one(x)
            return np.array([km.predict_one(x) for x in dicts]), 1

        out["river KMeans"] = river_kmeans
    if peers["kmc"] is not None:
        n_init, max_iter = size["kmc"]

        def kmc():
            km = peers["kmc"].KMeansConstrained(K, size_min=math.floor(GAMMA * N / K), n_init=n_init,
                                                max_iter=max_iter, random_state=0).fit(X.astype(np.float64))
            return np.asarray(km.labels_), n_init * km.n_iter_

        out["k-means-constrained"] = kmc
    return out


def bench_dataset(name, spec, size, b, peers) -> dict:
    label, X, y = load(name, spec)
    K = int(y.max()) + 1
    runs = methods(K, X, size, b, peers)
    found: dict = {}
    seconds = interleaved({m: keeping_result(found, m, fn) for m, fn in runs.items()}, size["rounds"])
    rows = []
    floor = GAMMA * len(X) / K
    for m in runs:
        labels, passes = found[m]
        sizes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=K)
        rows.append({"data": label, "method": m, **clustering_scores(y, labels), "passes": float(passes),
                     "seconds": seconds[m], "below min": int((sizes < floor).sum()),
                     "sizes": sorted(sizes.tolist(), reverse=True)})
    print(f"  {label}: done", file=sys.stderr)
    return {"data": label, "N": len(X), "d": X.shape[1], "K": K, "floor": floor,
            "class_sizes": sorted(np.bincount(y).tolist(), reverse=True), "rows": rows}


def plot(results: list[dict], folder: Path, epochs: int) -> None:
    plt = pyplot()
    if plt is None:
        return
    shown = [f"streamcoke, {epochs} passes", f"streamcoke, no constraint, {epochs} passes",
             "scikit-learn KMeans(n_init=10)", "river KMeans", "k-means-constrained"]
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        ranks = np.arange(1, res["K"] + 1)
        ax.plot(ranks, np.maximum(res["class_sizes"] + [0] * (res["K"] - len(res["class_sizes"])), 0.8), "k:", lw=2,
                label="true classes")
        for r in res["rows"]:
            if r["method"] in shown:
                ax.plot(ranks, np.maximum(r["sizes"], 0.8), marker=".", label=r["method"])
        ax.axhline(res["floor"], color="grey", ls="--", lw=1, label=f"minimum {GAMMA} N/K")
        ax.set_yscale("log")
        ax.set_xlabel("cluster rank (largest first)")
        ax.set_ylabel("cluster size (empty at 0.8)")
        ax.set_title(res["data"], fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, folder, "quality_sizes")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_flags(p)
    p.add_argument("--batch-size", type=int, default=64, help="for streamcoke and MiniBatchKMeans")
    args = p.parse_args(argv)
    size = SIZES[args.size]
    peers = {"faiss": optional_import("faiss"), "kmc": optional_import("k_means_constrained"),
             "river": optional_import("river.cluster") and optional_import("river")}
    if size["datasets"] and peers["river"] is None:
        size = dict(size, datasets=[s for s in size["datasets"] if s[0] != "image_segments"])
    info, start = machine(), time.perf_counter()
    # One untimed fit first, so that no contender pays torch's first-call costs.
    OnlineConstrainedKMeans(4, n_epochs=1, batch_size=64, device="cpu", random_state=0).fit(
        np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32))
    results = [bench_dataset(name, spec, size, args.batch_size, peers) for name, spec in size["datasets"]]
    print(f"\n### Clustering quality (`bench_quality.py --{args.size}`)\n")
    print(f"K = number of classes; streamcoke with min_size_ratio {GAMMA}, batch {args.batch_size}; "
          f"`below min` = clusters smaller than {GAMMA} N / K; seconds on the CPU (noisy).\n")
    rows = [r for res in results for r in res["rows"]]
    print(table(rows, ["data", "method", "ACC", "NMI", "ARI", "passes", "seconds", "below min"]))
    payload = {"size": args.size, "machine": info, "batch_size": args.batch_size, "config": size,
               "seconds": time.perf_counter() - start, "results": results}
    print("wrote", write_json_to(args.out_dir, "quality", payload))
    plot(results, args.out_dir, size["epochs"])
    return payload


if __name__ == "__main__":
    main()
