"""``streamcoke pretrain``, ``streamcoke embed`` and ``streamcoke eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .. import distributed
from ..io.checkpoint import atomic_write_bytes
from .recipe import builtin_recipes, load_recipe

DIGITS = "built-in digits (scikit-learn, 1797 images of 8x8 pixels)"


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain an encoder on online constrained k-means pseudo-labels (CoKe)",
        description="Pretrain an encoder with the CoKe recipe from WebDataset image shards (KEY.jpg, KEY.cls, "
                    "KEY.idx as written by `streamcoke shards`). With no SHARDS, trains the small built-in CNN on "
                    "scikit-learn's digits on the CPU and compares it with two baselines. Launch with torchrun for "
                    "several GPUs.")
    p.add_argument("shards", nargs="*", help="WebDataset shards (brace patterns allowed); none: built-in digits")
    p.add_argument("--recipe", default=None,
                   help=f"built-in recipe ({', '.join(builtin_recipes())}) or a .toml file; default: digits "
                        "without SHARDS, imagenet-single with them")
    p.add_argument("--n-samples", type=int, default=None,
                   help="number of samples in the shards (indices run 0..N-1); required with SHARDS")
    p.add_argument("--out", default="runs/pretrain", help="output folder (checkpoint, plots, gallery, scores)")
    for name, typ in (("epochs", int), ("batch-size", int), ("lr", float), ("seed", int), ("image-size", int)):
        p.add_argument(f"--{name}", type=typ, default=None, help="override the recipe's value")
    p.add_argument("--n-clusters", type=int, nargs="+", default=None, help="override the recipe's clusterings")
    p.add_argument("--encoder", default=None, help="override the recipe's encoder ('small', 'resnet18', 'resnet50', ...)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ...; default: CUDA when available")
    p.add_argument("--num-workers", type=int, default=4, help="decoding processes per rank (shards only)")
    p.add_argument("--shuffle-buffer", type=int, default=5000, help="samples in the shuffle buffer (shards only)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="undecodable images or missing fields: stop (default) or skip and count")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.st")
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--checkpoint-steps", type=int, default=0,
                   help="also checkpoint every N steps within an epoch (0: only at epoch boundaries); "
                        "--resume then continues from the last such step")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=pretrain)

    e = sub.add_parser("embed", help="write encoder features of images with a pretrained checkpoint")
    e.add_argument("checkpoint", help="checkpoint.st written by `streamcoke pretrain`")
    e.add_argument("shards", nargs="*", help="WebDataset image shards; none: built-in digits")
    e.add_argument("--out", required=True, help="Parquet file: key, index, target, feature")
    _common_eval_args(e)
    e.set_defaults(func=embed_command)

    v = sub.add_parser("eval", help="k-NN, linear probe and clustering scores of a checkpoint's frozen features")
    v.add_argument("checkpoint", help="checkpoint.st written by `streamcoke pretrain`")
    v.add_argument("shards", nargs="*", help="labelled WebDataset image shards; none: built-in digits")
    v.add_argument("--test", nargs="*", default=None,
                   help="held-out shards: k-NN and linear probe train on SHARDS and test here "
                        "(default: 5-fold cross-validation on SHARDS)")
    v.add_argument("--n-clusters", type=int, default=None, help="clusters for ACC/NMI/ARI (default: classes)")
    v.add_argument("--json", default=None, help="also write the scores to this JSON file")
    _common_eval_args(v)
    v.set_defaults(func=eval_command)


def _common_eval_args(p) -> None:
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--quiet", action="store_true")


# ---------------------------------------------------------------------------- distributed
def _say(msg: str) -> None:
    if not distributed.is_distributed() or dist.get_rank() == 0:
        print(msg, flush=True)


# ------------------------------------------------------------------------------ pretrain
def pretrain(args: argparse.Namespace) -> int:
    from .images import ImageShardSource, TensorImageSource, load_digits_images
    from .trainer import CoKeTrainer

    device = distributed.init_from_env(args.device)
    trainer = None
    try:
        digits = not args.shards
        recipe = load_recipe(args.recipe or ("digits" if digits else "imagenet-single"))
        recipe = recipe.replace(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                image_size=args.image_size, encoder=args.encoder,
                                n_clusters=tuple(args.n_clusters) if args.n_clusters else None)
        world = dist.get_world_size() if distributed.is_distributed() else 1
        per_rank = recipe.batch_size // world
        if digits:
            images, targets = load_digits_images()
            n_samples = len(images)
            source = TensorImageSource(images, targets, batch_size=per_rank, seed=recipe.seed)
            _say(f"data: {DIGITS}")
        else:
            if args.n_samples is None:
                raise SystemExit("streamcoke pretrain: --n-samples is required with SHARDS (the number of "
                                 "samples; the label memory is sized by it)")
            n_samples = args.n_samples
            source = ImageShardSource(args.shards if len(args.shards) > 1 else args.shards[0], per_rank,
                                      load_size=recipe.load_size, shuffle_buffer=args.shuffle_buffer,
                                      num_workers=args.num_workers, seed=recipe.seed, on_error=args.on_error,
                                      pin_memory=torch.cuda.is_available())
        out = Path(args.out)
        ckpt = out / "checkpoint.st"
        if args.resume:
            if not ckpt.exists():
                raise SystemExit(f"streamcoke pretrain: --resume, but there is no checkpoint at {ckpt}")
            trainer = CoKeTrainer.load(ckpt, device=device, recipe=recipe)
            _say(f"resuming from {ckpt} at epoch {trainer.epoch}, step {trainer.step_in_epoch}")
        else:
            trainer = CoKeTrainer(recipe, n_samples, device=device)
        _say(f"recipe: {args.recipe or ('digits' if digits else 'imagenet-single')}; {recipe.epochs} epochs, "
             f"batch {recipe.batch_size}, clusterings K = {', '.join(map(str, recipe.n_clusters))}, "
             f"device {trainer.device}, {world} process(es)")
        trainer.fit(source, out_dir=out, progress=not args.quiet, checkpoint_every=args.checkpoint_every,
                    checkpoint_steps=args.checkpoint_steps)
        skipped = getattr(source, "skipped", 0)
        if skipped:
            _say(f"skipped {skipped} bad samples (--on-error skip)")
        _say(f"wrote {ckpt}, {out / 'training.png'}, {out / 'cluster_sizes.png'}, {out / 'gallery.png'}")
        rank = dist.get_rank() if distributed.is_distributed() else 0
    finally:
        if trainer is not None:
            trainer.release_process_group()
        distributed.leave()
    # After leaving the process group: the report is one process's work on the whole data set.
    if digits and rank == 0:
        _digits_report(trainer, images, targets, out)
    return 0


def _digits_report(trainer, images, targets, out: Path) -> dict:
    """Scores of the trained encoder against the raw pixels (k-means on them is the usual
    clustering baseline) and the untrained encoder."""
    from .evaluate import embed, evaluate_features
    from .images import TensorImageSource
    from .trainer import build_network, prepare_images

    y = targets.numpy()
    raw = images.flatten(1).float().numpy()
    torch.manual_seed(trainer.recipe.seed)  # the trained network's initial weights
    untrained = build_network(trainer.recipe).encoder.to(trainer.device)

    def features(encoder):
        batches = TensorImageSource(images, targets, batch_size=512, shuffle=False)
        return embed(encoder, batches, device=trainer.device,
                     transform=lambda x: prepare_images(x, trainer.recipe))[0]

    rows = {
        "raw pixels": evaluate_features(raw, y),
        "untrained encoder": evaluate_features(features(untrained), y),
        "CoKe-trained encoder": evaluate_features(features(trainer.feature_model()), y),
    }
    print(f"\n{'features':<24}{'k-NN top-1':>11}{'linear':>9}{'ACC':>8}{'NMI':>8}{'ARI':>8}")
    for name, s in rows.items():
        print(f"{name:<24}{s['knn_top1']:>11.3f}{s['linear_top1']:>9.3f}{s['ACC']:>8.3f}{s['NMI']:>8.3f}{s['ARI']:>8.3f}")
    print("(k-NN and linear probe: 5-fold cross-validated top-1; ACC/NMI/ARI: k-means with 10 clusters "
          "on the features)")
    atomic_write_bytes(out / "eval.json", json.dumps(rows, indent=2).encode())
    return rows


# ---------------------------------------------------------------------------- embed, eval
def _feature_batches(recipe, shards, args):
    from .images import ImageShardSource, TensorImageSource, load_digits_images

    if not shards:
        images, targets = load_digits_images()
        return TensorImageSource(images, targets, batch_size=args.batch_size, shuffle=False)
    return ImageShardSource(shards if len(shards) > 1 else shards[0], args.batch_size,
                            load_size=recipe.load_size, num_workers=args.num_workers, split_by_node=False)


def _embed_all(loaded, shards, args):
    from .evaluate import embed
    from .trainer import prepare_images

    recipe, encoder = loaded
    keys: dict[int, str] = {}

    def tracked():
        for b in _feature_batches(recipe, shards, args):
            keys.update(zip(b.index.tolist(), b.keys))
            yield b

    feats, targets, index = embed(encoder, tracked(), transform=lambda x: prepare_images(x, recipe),
                                  progress=not args.quiet)
    return feats, targets, index, [keys[i] for i in index.tolist()]


def _load_for_features(args):
    from .trainer import load_encoder

    return load_encoder(args.checkpoint, device=args.device)


def embed_command(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    loaded = _load_for_features(args)
    feats, targets, index, keys = _embed_all(loaded, args.shards, args)
    table = pa.table({
        "key": pa.array(keys, pa.string()), "index": pa.array(index), "target": pa.array(targets),
        "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), feats.shape[1]),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(args.out, sink.getvalue().to_pybytes())
    print(f"wrote {len(keys)} features of dimension {feats.shape[1]} to {args.out}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from .evaluate import cluster_scores, evaluate_features, knn_top1, linear_probe

    loaded = _load_for_features(args)
    feats, targets, _, _ = _embed_all(loaded, args.shards, args)
    if (targets < 0).any():
        raise SystemExit("streamcoke eval: some samples have no class label (.cls); evaluation needs them all")
    if args.test:
        tf, tt, _, _ = _embed_all(loaded, args.test, args)
        scores = {"knn_top1": knn_top1(feats, targets, tf, tt), "linear_top1": linear_probe(feats, targets, tf, tt),
                  **cluster_scores(tf, tt, args.n_clusters or len(np.unique(tt)))}
        how = "trained on SHARDS, tested on --test"
    else:
        scores = evaluate_features(feats, targets, n_clusters=args.n_clusters)
        how = "5-fold cross-validated"
    where = "built-in digits" if not args.shards else f"{len(feats)} samples"
    print(f"{where}: k-NN top-1 {scores['knn_top1']:.4f}, linear top-1 {scores['linear_top1']:.4f} ({how}); "
          f"k-means ACC {scores['ACC']:.4f}, NMI {scores['NMI']:.4f}, ARI {scores['ARI']:.4f}")
    if args.json:
        atomic_write_bytes(args.json, json.dumps(scores, indent=2).encode())
    return 0
