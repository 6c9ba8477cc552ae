"""Stream a Parquet file of embeddings through constrained online k-means in Python and write a
pseudo-label for every row: the loop that ``streamcoke cluster`` runs, written out to adapt.

    ParquetSource (batches on the device) -> OnlineConstrainedKMeans.partial_fit -> ParquetLabelSink

Run with no arguments, it writes a built-in long-tailed mixture (30 classes with Dirichlet(0.3)
weights, 20,000 unit-length embeddings of 32 dimensions) to OUT/embeddings.parquet and clusters
it twice, in three passes each: with CoKe's minimum cluster size (``min_size_ratio=0.4``) and
without one (0, plain online k-means). It writes each run's last-pass labels to
OUT/labels_R.parquet (id, label, similarity, epoch), prints the smallest and largest cluster
against the required minimum and ACC / NMI / ARI against the true classes, and draws
OUT/cluster_sizes.png. With ``--embeddings`` it runs on a Parquet file of ``id`` and
``embedding`` columns instead (no scores: the classes are unknown).

    python examples/stream_parquet.py
    python examples/stream_parquet.py --embeddings emb.parquet --n-clusters 1000 --epochs 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from streamcoke import OnlineConstrainedKMeans
from streamcoke.data import ParquetSource, prefetch, prefetch_pays
from streamcoke.datasets import imbalanced_mixture
from streamcoke.io.labels import ParquetLabelSink
from streamcoke.metrics import clustering_scores


def write_mixture(path: Path, n: int, n_classes: int, d: int, seed: int) -> np.ndarray:
    """The built-in data as a Parquet file of ``id`` and ``embedding``; returns the true classes."""
    X, y, _ = imbalanced_mixture(n, n_classes, d, random_state=seed)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), d)
    pq.write_table(pa.table({"id": np.arange(n), "embedding": emb}), path, row_group_size=4096)
    return y


def cluster(path: Path, out: Path, n_clusters: int, min_size_ratio: float, epochs: int, batch_size: int,
            seed: int) -> OnlineConstrainedKMeans:
    """Cluster the file in ``epochs`` passes; the last pass's labels go to ``out``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = ParquetSource(path, batch_size=batch_size, device=device)  # batches arrive on the device
    km = OnlineConstrainedKMeans(n_clusters, min_size_ratio=min_size_ratio, device=device, random_state=seed)
    # The sink publishes `out` only when the block ends without an error: an interrupted run
    # leaves no file that looks complete.
    with ParquetLabelSink(out, metadata={"n_clusters": n_clusters, "min_size_ratio": min_size_ratio}) as sink:
        for epoch in range(epochs):
            batches = source.epoch(epoch)
            # Read ahead in a thread where that overlaps with the step (a GPU, or a spare core).
            for ids, X in (prefetch(batches) if prefetch_pays(device) else batches):
                km.partial_fit(X)
                if epoch == epochs - 1:
                    sink.write(ids, km.labels_, km.assigned_similarity_, epoch)
            if epoch < epochs - 1:
                km.end_epoch()  # publish the epoch's centers, start counting sizes afresh
    return km


def plot(path: Path, sizes: dict[str, np.ndarray], minimum: dict[str, float], truth: np.ndarray | None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    if truth is not None:
        ax.plot(np.sort(truth)[::-1], color="0.6", drawstyle="steps-mid", label="true classes")
    for (name, s), color in zip(sizes.items(), ("tab:blue", "tab:orange")):
        ax.plot(np.sort(s)[::-1], color=color, drawstyle="steps-mid", label=name)
        if minimum[name] > 0:
            ax.axhline(minimum[name], color=color, linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("cluster (or class), largest first")
    ax.set_ylabel("samples in the last pass")
    ax.legend()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)  # the plot appears whole or not at all
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", type=Path, default=None, help="Parquet file of id and embedding (default: built-in)")
    p.add_argument("--out", type=Path, default=Path("stream_parquet_out"), help="output folder")
    p.add_argument("--n-clusters", type=int, default=30)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    truth = None
    path = args.embeddings
    if path is None:
        path = args.out / "embeddings.parquet"
        y = write_mixture(path, 20_000, 30, 32, args.seed)
        truth = np.bincount(y)
    print(f"{path}: {pq.ParquetFile(path).metadata.num_rows:,} rows, {args.n_clusters} clusters, "
          f"{args.epochs} passes of batches of {args.batch_size}")
    sizes, minimum = {}, {}
    for ratio in (0.4, 0.0):
        name = f"min_size_ratio={ratio}"
        labels_path = args.out / f"labels_{ratio}.parquet"
        cluster(path, labels_path, args.n_clusters, ratio, args.epochs, args.batch_size, args.seed)
        t = pq.read_table(labels_path, columns=["id", "label"])
        labels = t.column("label").to_numpy()
        sizes[name] = np.bincount(labels, minlength=args.n_clusters)
        minimum[name] = ratio * len(labels) / args.n_clusters
        line = (f"{name:<20} smallest cluster {sizes[name].min():>5} (minimum {minimum[name]:.0f}), "
                f"largest {sizes[name].max():>5}")
        if truth is not None:  # ids are the row numbers of the built-in data
            s = clustering_scores(y[t.column("id").to_numpy()], labels)
            line += f"   ACC {s['ACC']:.3f}  NMI {s['NMI']:.3f}  ARI {s['ARI']:.3f}"
        print(line + f"   labels: {labels_path}")
    if plot(args.out / "cluster_sizes.png", sizes, minimum, truth):
        print(f"plot: {args.out / 'cluster_sizes.png'}")


if __name__ == "__main__":
    main()
