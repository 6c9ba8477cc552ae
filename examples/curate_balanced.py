"""Curate a long-tailed embedding set into a cluster-balanced subset.

Clustering-based curation: cluster the embeddings under a minimum cluster size, then keep the
same number of samples from every cluster, so the head of the distribution no longer drowns
its tail. Three steps, each usable on its own:

    streamcoke cluster embeddings.parquet --n-clusters 1000 --epochs 3 --out labels.parquet
    streamcoke sample labels.parquet --per-cluster 100 --out subset.parquet
    # subset.parquet: the ids to keep, joined back to the data set by id

Run with no arguments, this script does the same on a built-in long-tailed mixture (50
classes with Dirichlet(0.3) weights, 40,000 embeddings of 64 dimensions) whose true classes
are known, prints how balanced the classes are before and after, and draws
OUT/balanced_subset.png. With ``--embeddings``, it runs on a Parquet file of ``id`` and
``embedding`` columns.

    python examples/curate_balanced.py
    python examples/curate_balanced.py --embeddings emb.parquet --n-clusters 1000 --per-cluster 100
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from streamcoke.cli import main as streamcoke
from streamcoke.curate import balanced_subset
from streamcoke.datasets import imbalanced_mixture


def write_builtin(path: Path, rows: int, seed: int) -> np.ndarray:
    """The built-in long-tailed mixture as a Parquet file; returns the true class of each id."""
    X, y, _ = imbalanced_mixture(rows, 50, 64, concentration=0.3, random_state=seed)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), X.shape[1])
    pq.write_table(pa.table({"id": np.arange(rows), "embedding": emb}), path)
    return y


def balance(counts: np.ndarray) -> dict:
    """How even a set of class (or cluster) counts is: classes present, largest share, and the
    effective number of classes exp(entropy), which equals the number present when even."""
    counts = counts[counts > 0]
    p = counts / counts.sum()
    return {"present": int(len(counts)), "largest_share": float(p.max()),
            "effective": float(math.exp(-(p * np.log(p)).sum()))}


def plot(path: Path, before: np.ndarray, after: np.ndarray, what: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    order = np.argsort(-before, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    ax.bar(np.arange(len(order)), before[order], color="0.75", label="all samples")
    ax.bar(np.arange(len(order)), after[order], color="tab:blue", label="balanced subset")
    ax.set_yscale("log")
    ax.set_xlabel(f"{what}, largest first")
    ax.set_ylabel("samples")
    ax.legend()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", type=Path, default=None, help="Parquet of id and embedding (default: built-in)")
    p.add_argument("--out", type=Path, default=Path("runs/curate"), help="folder for labels, subset and plot")
    p.add_argument("--n-clusters", type=int, default=200)
    p.add_argument("--per-cluster", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--min-size-ratio", type=float, default=0.4,
                   help="each cluster's minimum share, times K (0: plain online k-means)")
    p.add_argument("--pick", choices=("random", "nearest"), default="random")
    p.add_argument("--rows", type=int, default=40_000, help="size of the built-in data set")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    truth = None
    embeddings = args.embeddings
    if embeddings is None:
        embeddings = args.out / "embeddings.parquet"
        truth = write_builtin(embeddings, args.rows, args.seed)
    labels = args.out / "labels.parquet"
    streamcoke(["cluster", str(embeddings), "--n-clusters", str(args.n_clusters), "--epochs", str(args.epochs),
                "--min-size-ratio", str(args.min_size_ratio), "--batch-size", str(args.batch_size),
                "--seed", str(args.seed), "--out", str(labels), "--quiet"])
    subset = args.out / "subset.parquet"
    summary = balanced_subset(labels, subset, args.per_cluster, pick=args.pick, random_state=args.seed)
    print(f"kept {summary['kept']:,} of {summary['rows']:,} samples: at most {args.per_cluster} from each of "
          f"{summary['clusters']} clusters (sizes {summary['smallest_before']}..{summary['largest_before']})")

    kept = pq.read_table(subset).to_pandas()
    if truth is not None:  # built-in data: how balanced are the true classes?
        before = np.bincount(truth, minlength=50)
        after = np.bincount(truth[kept["id"].to_numpy()], minlength=50)
        what = "true classes"
    else:
        table = pq.read_table(labels, columns=["label"]).column(0).to_numpy()
        before = np.bincount(table, minlength=args.n_clusters)
        after = np.bincount(kept["label"].to_numpy(), minlength=args.n_clusters)
        what = "clusters"
    b, a = balance(before), balance(after)
    print(f"{what:13s}  present  largest share  effective number")
    print(f"{'all samples':13s}  {b['present']:7d}  {b['largest_share']:13.3f}  {b['effective']:16.1f}")
    print(f"{'subset':13s}  {a['present']:7d}  {a['largest_share']:13.3f}  {a['effective']:16.1f}")
    if plot(args.out / "balanced_subset.png", before, after, what):
        print(f"wrote {args.out / 'balanced_subset.png'}")
    return {"summary": summary, "before": b, "after": a}


if __name__ == "__main__":
    main()
