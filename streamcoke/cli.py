"""Command line: ``streamcoke cluster`` and ``streamcoke shards``.

``streamcoke cluster`` with no input clusters scikit-learn's digits (shipped with
scikit-learn, no download) and prints ACC / NMI / ARI against the true digit classes. With
inputs (WebDataset shards, Parquet datasets or ``.npy`` files, told apart by their names) it
streams them through the clusterer, writes ``(id, label, similarity, epoch)`` rows to a
Parquet file, checkpoints periodically and can resume an interrupted run with the same result.

``streamcoke shards`` converts an image folder (class sub-folders) or ``.npy`` arrays to
WebDataset shards.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np

CHECKPOINT_KIND = "streamcoke.cli.cluster"
# Options that change the result; a resumed run must use the same ones.
RUN_OPTIONS = ("inputs", "n_clusters", "min_size_ratio", "max_size_ratio", "dual_lr", "metric", "batch_size",
               "seed", "field", "feature_column", "id_column", "shuffle_buffer", "on_error", "all_epochs")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamcoke", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("cluster", help="cluster a stream of feature vectors under size constraints")
    p.add_argument("inputs", nargs="*", type=str,
                   help="WebDataset shards (.tar, brace patterns), Parquet files or folders, or .npy "
                        "files; none: the built-in digits")
    p.add_argument("--n-clusters", type=int, nargs="+", default=None,
                   help="number of clusters; several values run several clusterings (default: 10 for digits)")
    p.add_argument("--min-size-ratio", type=float, default=0.4, help="minimum share of each cluster, times K")
    p.add_argument("--max-size-ratio", type=float, default=None, help="maximum share of each cluster, times K")
    p.add_argument("--dual-lr", type=float, default=None,
                   help="constant dual step per sample (default: the tuning-free schedule); larger values "
                        "trade objective for tighter cluster sizes")
    p.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5, help="passes over the input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: CUDA when available)")
    g = p.add_argument_group("input")
    g.add_argument("--field", default="npy",
                   help="WebDataset field with the features (npy, pth, safetensors) or images (jpg...)")
    g.add_argument("--encoder", default=None,
                   help="for image fields: MODULE:FUNCTION returning a torch module from images to features")
    g.add_argument("--feature-column", default="embedding", help="Parquet column with the embeddings")
    g.add_argument("--id-column", default="id", help="Parquet column with the ids ('' numbers the rows)")
    g.add_argument("--shuffle-buffer", type=int, default=0, help="WebDataset sample shuffle buffer (0: none)")
    g.add_argument("--workers", type=int, default=0, help="WebDataset reader processes (0: a reader thread)")
    g.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto",
                   help="read batches ahead in a background thread: auto (default) does on a GPU or with a "
                        "core to spare beyond torch's threads, and reads between steps otherwise")
    g.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="bad samples: stop with an error naming file and key, or skip and count them")
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None, help="write the labels here (Parquet)")
    g.add_argument("--all-epochs", action="store_true", help="write every epoch's labels, not only the last")
    g.add_argument("--save", type=Path, default=None, help="write the fitted model here (safetensors)")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint file (default: OUT.ckpt, else SAVE.ckpt)")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="batches between checkpoints")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("shards", help="write WebDataset shards from an image folder or .npy arrays")
    s.add_argument("source", nargs="+", type=Path,
                   help="an image folder (ROOT/CLASS/IMAGE.jpg) or .npy files of shape (n, n_features)")
    s.add_argument("--prefix", required=True, help="shards are named PREFIX-000000.tar, PREFIX-000001.tar, ...")
    s.add_argument("--maxcount", type=int, default=10000,
                   help="samples per shard (for arrays: rows per shard, rounded up to whole samples)")
    s.add_argument("--rows-per-sample", type=int, default=1,
                   help="arrays: rows per sample; above 1, each sample is a block KEY.npy of shape "
                        "(rows, n_features) with its row numbers in KEY.ids.npy (reads much faster "
                        "than one row per sample)")
    s.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                   help="image folders: write the samples in a seeded random order so every shard mixes "
                        "classes (indices stay in sorted order); recommended for training")
    b = sub.add_parser("sample", help="write a cluster-balanced subset of a label file",
                       description="Keep at most --per-cluster samples of every cluster of a label file "
                                   "written by `streamcoke cluster --out`, in one pass with memory bound by "
                                   "the subset: the clustering-based balancing used to curate long-tailed data.")
    b.add_argument("labels", type=Path, help="label file of `streamcoke cluster --out` (Parquet)")
    b.add_argument("--per-cluster", type=int, required=True, help="samples kept per cluster")
    b.add_argument("--out", type=Path, required=True, help="the subset: a Parquet file of id and label")
    b.add_argument("--pick", choices=("random", "nearest"), default="random",
                   help="uniformly at random (default) or the samples most similar to their center")
    b.add_argument("--clustering", type=int, default=0, help="which clustering, when the file holds several")
    b.add_argument("--epoch", type=int, default=None, help="which epoch's labels (default: the last in the file)")
    b.add_argument("--seed", type=int, default=0)
    from .train.commands import add_parsers  # pretrain, embed, eval

    add_parsers(sub)
    return parser


# ----------------------------------------------------------------------------------- cluster
def _load_encoder(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"streamcoke: --encoder must look like MODULE:FUNCTION, got {spec!r}")
    return getattr(importlib.import_module(module), name)()


def _open(args, device, handler):
    """The source (and, for digits, the true classes)."""
    from .data import ArraySource, open_source

    if not args.inputs:
        from .datasets import load_digits_features

        X, y = load_digits_features()
        # A fresh seeded shuffle each epoch, as a data loader with a seed would do.
        return ArraySource(X, args.batch_size, device, shuffle=True, seed=args.seed), y
    encoder = None
    if args.encoder:
        encoder = _load_encoder(args.encoder)
        encoder = encoder.to(device).eval() if hasattr(encoder, "to") else encoder
    source = open_source(args.inputs, batch_size=args.batch_size, device=device, handler=handler,
                         field=args.field, encoder=encoder, feature_column=args.feature_column,
                         id_column=args.id_column or None, shuffle=args.shuffle_buffer, seed=args.seed,
                         num_workers=args.workers)
    return source, None


def _shares(km) -> tuple[float, float]:
    """Smallest and largest cluster of the current epoch, as multiples of the even share."""
    sizes = km.cluster_sizes_
    lo, hi = float("inf"), 0.0
    for s in sizes if isinstance(sizes, list) else [sizes]:
        total = max(float(s.sum()), 1.0)
        lo, hi = min(lo, float(s.min()) * len(s) / total), max(hi, float(s.max()) * len(s) / total)
    return lo, hi


def _run_config(args) -> dict:
    cfg = {k: getattr(args, k) for k in RUN_OPTIONS}
    cfg["inputs"] = [str(p) for p in args.inputs]
    return cfg


def _save_run(path, km, position: dict, run: dict) -> None:
    from .io.checkpoint import save_checkpoint

    sd = km.state_dict()
    save_checkpoint(path, sd["tensors"], {"estimator": sd["meta"], "run": run, "position": position},
                    kind=CHECKPOINT_KIND)


def _load_run(path, km, run: dict) -> dict:
    from .io.checkpoint import load_checkpoint

    tensors, meta = load_checkpoint(path, kind=CHECKPOINT_KIND)
    diff = [k for k in RUN_OPTIONS if meta["run"].get(k) != run.get(k)]
    if diff:
        raise SystemExit(f"streamcoke: {path} was made with different options ({', '.join(diff)}); "
                         "rerun with the same ones, or without --resume to start over")
    km.load_state_dict({"tensors": tensors, "meta": meta["estimator"]})
    return meta["position"]


def _batches(source, epoch: int, skip: int, handler, skipped_before: int | None):
    """The batches of ``epoch`` after the first ``skip`` (already clustered before a resume)."""
    it = source.epoch(epoch)
    for _ in range(skip):
        if next(it, None) is None:
            break
    if skipped_before is not None and hasattr(handler, "count"):
        handler.count = skipped_before  # the replayed part's errors were counted before
    yield from it


def cluster(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from . import MultiOnlineConstrainedKMeans, OnlineConstrainedKMeans
    from .cluster._base import resolve_device
    from .data import DataError, SkipErrors, prefetch, prefetch_pays, raise_errors
    from .io.labels import ParquetLabelSink
    from .metrics import clustering_scores

    device = resolve_device(args.device)
    read_ahead = args.prefetch == "on" or (args.prefetch == "auto" and prefetch_pays(device))
    handler = SkipErrors() if args.on_error == "skip" else raise_errors
    try:
        source, y_true = _open(args, device, handler)
    except (DataError, ValueError) as exc:
        raise SystemExit(f"streamcoke: {exc}") from None
    Ks = args.n_clusters or ([10] if y_true is not None else None)
    if Ks is None:
        raise SystemExit("streamcoke: --n-clusters is required with input files")
    params = dict(min_size_ratio=args.min_size_ratio, max_size_ratio=args.max_size_ratio, dual_lr=args.dual_lr,
                  metric=args.metric, device=device, random_state=args.seed)
    km = OnlineConstrainedKMeans(Ks[0], **params) if len(Ks) == 1 else \
        MultiOnlineConstrainedKMeans(tuple(Ks), **params)
    ckpt = args.checkpoint or (Path(f"{args.out}.ckpt") if args.out else Path(f"{args.save}.ckpt") if args.save else None)
    run = _run_config(args)

    position = {"epoch": 0, "batch": 0, "sink_parts": None, "skipped": 0}
    if args.resume:
        if ckpt is None or not ckpt.exists():
            raise SystemExit(f"streamcoke: --resume: no checkpoint at {ckpt} (give --checkpoint)")
        position = _load_run(ckpt, km, run)
        print(f"resuming from {ckpt}: epoch {position['epoch']}, batch {position['batch']}", file=sys.stderr)
    label_epochs = range(args.epochs) if args.all_epochs else range(args.epochs - 1, args.epochs)
    sink = None

    def open_sink(parts):
        return ParquetLabelSink(args.out, len(Ks), resume_parts=parts, metadata={
            "n_clusters": list(Ks), "min_size_ratio": args.min_size_ratio, "metric": args.metric,
            "similarity": "to the assigned center as it stood when the batch was assigned"})

    try:
        n_epoch = len(source)
    except TypeError:
        n_epoch = None  # shards: unknown until read
    y_pred = np.empty((len(y_true), len(Ks)), np.int64) if y_true is not None else None
    start = time.perf_counter()
    bar = tqdm(total=None if n_epoch is None else n_epoch * args.epochs, unit="samples", unit_scale=True,
               disable=args.quiet, desc="clustering", file=sys.stderr, dynamic_ncols=True)
    if n_epoch is not None:
        bar.update(n_epoch * position["epoch"] + min(position["batch"] * args.batch_size, n_epoch))
    n_last, shown, since_ckpt = 0, 0.0, 0
    n_total, steady = 0, None  # rows clustered by this process; (time, rows) after its first step
    try:
        for epoch in range(position["epoch"], args.epochs):
            resumed = epoch == position["epoch"]
            skip = position["batch"] if resumed else 0
            if args.out is not None and epoch in label_epochs and sink is None:
                sink = open_sink(position["sink_parts"] if resumed and position["sink_parts"] else None)
            n_seen, step = (skip * args.batch_size if resumed else 0), skip
            batches = _batches(source, epoch, skip, handler, position["skipped"] if resumed else None)
            for ids, X in (prefetch(batches) if read_ahead else batches):
                if not km.__sklearn_is_fitted__() and len(X) < max(Ks):
                    raise SystemExit(f"streamcoke: the first batch has {len(X)} rows, fewer than "
                                     f"--n-clusters {max(Ks)}; raise --batch-size")
                km.partial_fit(X)
                labels = km.labels_
                if steady is None:  # the first step seeds the centers: a one-off, timed apart
                    steady = (time.perf_counter(), n_total + len(X))
                if sink is not None:
                    sink.write(ids, labels, km.assigned_similarity_, epoch)
                if y_pred is not None:
                    y_pred[np.asarray(ids)] = labels.reshape(len(X), -1).cpu().numpy()
                step += 1
                n_seen += len(X)
                n_total += len(X)
                since_ckpt += 1
                bar.update(len(X))
                if time.perf_counter() - shown > 0.5 and not args.quiet:  # reading sizes waits for the GPU
                    lo, hi = _shares(km)
                    bar.set_postfix(epoch=epoch, min_share=f"{lo:.2f}", max_share=f"{hi:.2f}", refresh=False)
                    shown = time.perf_counter()
                if ckpt is not None and since_ckpt >= args.checkpoint_every:
                    parts = sink.checkpoint() if sink is not None else None
                    _save_run(ckpt, km, {"epoch": epoch, "batch": step, "sink_parts": parts,
                                         "skipped": getattr(handler, "count", 0)}, run)
                    since_ckpt = 0
            n_last = n_seen
            if not args.quiet and km.__sklearn_is_fitted__():
                lo, hi = _shares(km)
                bar.set_postfix(epoch=epoch, min_share=f"{lo:.2f}", max_share=f"{hi:.2f}")
            if not km.__sklearn_is_fitted__():
                raise SystemExit("streamcoke: the input holds no usable samples")
            if epoch < args.epochs - 1:
                km.end_epoch()
                if ckpt is not None:
                    parts = sink.checkpoint() if sink is not None else None
                    _save_run(ckpt, km, {"epoch": epoch + 1, "batch": 0, "sink_parts": parts,
                                         "skipped": getattr(handler, "count", 0)}, run)
                    since_ckpt = 0
    except DataError as exc:
        bar.close()
        if sink is not None:
            sink.abort(keep_parts=ckpt is not None)
        raise SystemExit(f"streamcoke: {exc}") from None
    except BaseException:
        bar.close()
        if sink is not None:
            sink.abort(keep_parts=ckpt is not None)  # a resumed run carries on from the sealed parts
        raise
    bar.close()
    now = time.perf_counter()
    elapsed = now - start
    after_first = ""
    if steady is not None and n_total > steady[1] and now > steady[0]:
        after_first = f", {(n_total - steady[1]) / (now - steady[0]):,.0f} samples/s after the first batch"
    sizes = km.cluster_sizes_
    sizes = [np.asarray(s.cpu()) for s in (sizes if isinstance(sizes, list) else [sizes])]
    ks = ", ".join(map(str, Ks))
    print(f"clustered {n_last} samples x {args.epochs} epochs into {ks} clusters "
          f"in {elapsed:.1f} s ({n_last * args.epochs / elapsed:,.0f} samples/s{after_first})")
    for k, s in zip(Ks, sizes):
        print(f"cluster sizes (last epoch): min {s.min():.0f}, max {s.max():.0f}, "
              f"required minimum {args.min_size_ratio * n_last / k:.1f}" + (f" (K = {k})" if len(Ks) > 1 else ""))
    gap = km.duality_gap_
    gap = gap if isinstance(gap, list) else [gap]
    print("duality gap of the last epoch: " + ", ".join(f"{g:.4f}" for g in gap) + " per sample")
    if y_true is not None:
        for h, k in enumerate(Ks):
            scores = clustering_scores(y_true, y_pred[:, h])
            print("digits (1797 images, 10 classes): " + "  ".join(f"{n} {v:.3f}" for n, v in scores.items())
                  + (f" (K = {k})" if len(Ks) > 1 else ""))
    if isinstance(handler, SkipErrors) and handler.count:
        print(f"skipped {handler.count} bad sample{'' if handler.count == 1 else 's'} (first: {handler.first})")
    km.end_epoch()
    if sink is not None:
        sink.close()
        print(f"labels written to {args.out}")
    if args.save is not None:
        km.save(args.save)
        print(f"model written to {args.save}")
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)  # the run is complete; nothing left to resume
    return 0


# ------------------------------------------------------------------------------------ shards
def shards(args: argparse.Namespace) -> int:
    from .io.shards import write_array_shards, write_image_folder_shards

    src = args.source
    if args.rows_per_sample < 1:
        raise SystemExit("streamcoke: --rows-per-sample must be at least 1")
    if args.shuffle is not None and not (len(src) == 1 and src[0].is_dir()):
        raise SystemExit("streamcoke: --shuffle applies to image folders")
    if len(src) == 1 and src[0].is_dir():
        if args.rows_per_sample != 1:
            raise SystemExit("streamcoke: --rows-per-sample applies to .npy arrays, not to image folders")
        pattern = write_image_folder_shards(src[0], args.prefix, args.maxcount, shuffle_seed=args.shuffle)
    elif all(p.suffix == ".npy" for p in src):
        pattern = write_array_shards(src, args.prefix, args.maxcount, rows_per_sample=args.rows_per_sample)
    else:
        raise SystemExit("streamcoke: shards takes one image folder or .npy files")
    print(pattern)
    return 0


# ------------------------------------------------------------------------------------ sample
def sample(args: argparse.Namespace) -> int:
    from .curate import balanced_subset

    try:
        summary = balanced_subset(args.labels, args.out, args.per_cluster, clustering=args.clustering,
                                  pick=args.pick, epoch=args.epoch, random_state=args.seed)
    except ValueError as exc:
        raise SystemExit(f"streamcoke: {exc}") from None
    print(f"kept {summary['kept']:,} of {summary['rows']:,} samples from {summary['clusters']:,} clusters "
          f"(cluster sizes {summary['smallest_before']:,}..{summary['largest_before']:,} before, "
          f"{summary['smallest_after']:,}..{summary['largest_after']:,} after); wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "cluster":
        return cluster(args)
    if args.command == "shards":
        return shards(args)
    if args.command == "sample":
        return sample(args)
    return args.func(args)  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
