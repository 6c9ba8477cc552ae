"""Command line: ``streamcoke cluster``.

With no input it clusters scikit-learn's digits (shipped with scikit-learn, no download) and
prints ACC / NMI / ARI against the true digit classes; with ``.npy`` inputs it streams them
through the clusterer and writes one label per row.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamcoke", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cluster", help="cluster a stream of feature vectors under size constraints")
    p.add_argument("inputs", nargs="*", type=Path,
                   help=".npy files of shape (n, n_features), streamed in order; none: the built-in digits")
    p.add_argument("--n-clusters", type=int, default=None, help="number of clusters (default: 10 for digits)")
    p.add_argument("--min-size-ratio", type=float, default=0.4, help="minimum share of each cluster, times K")
    p.add_argument("--max-size-ratio", type=float, default=None, help="maximum share of each cluster, times K")
    p.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5, help="passes over the input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    p.add_argument("--out", type=Path, default=None, help="write the last epoch's labels here (.npy)")
    p.add_argument("--save", type=Path, default=None, help="write the fitted model here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _open_inputs(paths: list[Path]) -> tuple[list[np.ndarray], np.ndarray | None]:
    if not paths:
        from .datasets import load_digits_features

        X, y = load_digits_features()
        return [X], y
    arrays = []
    for path in paths:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"streamcoke: cannot read {path}: {exc}") from None
        if arr.ndim != 2:
            raise SystemExit(f"streamcoke: {path} holds an array of shape {arr.shape}, expected (n, n_features)")
        if arrays and arr.shape[1] != arrays[0].shape[1]:
            raise SystemExit(f"streamcoke: {path} has {arr.shape[1]} features, {paths[0]} has {arrays[0].shape[1]}")
        arrays.append(arr)
    return arrays, None


def cluster(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import OnlineConstrainedKMeans
    from .io.checkpoint import atomic_write_bytes
    from .metrics import clustering_scores

    arrays, y_true = _open_inputs(args.inputs)
    n_total = sum(len(a) for a in arrays)
    n_clusters = args.n_clusters or (10 if y_true is not None else None)
    if n_clusters is None:
        raise SystemExit("streamcoke: --n-clusters is required with input files")
    # One fixed shuffle of the stream, replayed every epoch, as a data loader with a seed would.
    rng = np.random.default_rng(args.seed)
    km = OnlineConstrainedKMeans(
        n_clusters, min_size_ratio=args.min_size_ratio, max_size_ratio=args.max_size_ratio,
        metric=args.metric, device=args.device, random_state=args.seed)
    labels = np.empty(n_total, dtype=np.int64)
    start = time.perf_counter()
    bar = tqdm(total=n_total * args.epochs, unit="samples", unit_scale=True, disable=args.quiet,
               desc="clustering", file=sys.stderr)
    try:
        for epoch in range(args.epochs):
            offset = 0
            for arr in arrays:
                order = rng.permutation(len(arr)) if y_true is not None else np.arange(len(arr))
                for s in range(0, len(arr), args.batch_size):
                    idx = order[s:s + args.batch_size]
                    batch = np.asarray(arr[np.sort(idx)] if y_true is None else arr[idx], dtype=np.float32)
                    rows = offset + (np.sort(idx) if y_true is None else idx)
                    if km.__sklearn_is_fitted__() or len(batch) >= n_clusters:
                        km.partial_fit(batch)
                    else:
                        raise SystemExit(f"streamcoke: the first batch has {len(batch)} rows, fewer than "
                                         f"--n-clusters {n_clusters}; raise --batch-size")
                    labels[rows] = km.labels_
                    sizes = km.cluster_sizes_
                    seen = max(sizes.sum(), 1.0)
                    bar.set_postfix(epoch=epoch, min_share=f"{sizes.min() * n_clusters / seen:.2f}",
                                    max_share=f"{sizes.max() * n_clusters / seen:.2f}", refresh=False)
                    bar.update(len(batch))
                offset += len(arr)
            if epoch < args.epochs - 1:
                km.end_epoch()
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    sizes = np.bincount(labels, minlength=n_clusters)
    print(f"clustered {n_total} samples x {args.epochs} epochs into {n_clusters} clusters "
          f"in {elapsed:.1f} s ({n_total * args.epochs / elapsed:,.0f} samples/s)")
    print(f"cluster sizes (last epoch): min {sizes.min()}, max {sizes.max()}, "
          f"required minimum {args.min_size_ratio * n_total / n_clusters:.1f}")
    print(f"duality gap of the last epoch: {km.duality_gap_:.4f} per sample")
    if y_true is not None:
        scores = clustering_scores(y_true, labels)
        print("digits (1797 images, 10 classes): " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    km.end_epoch()
    if args.out is not None:
        buf = io.BytesIO()
        np.save(buf, labels)
        atomic_write_bytes(args.out, buf.getvalue())
        print(f"labels written to {args.out}")
    if args.save is not None:
        km.save(args.save)
        print(f"model written to {args.save}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "cluster":
        return cluster(args)
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
