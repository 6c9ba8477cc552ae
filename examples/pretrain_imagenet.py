"""Pretrain a ResNet-50 on ImageNet with CoKe, on all the GPUs of a machine.

1. Convert the image folders to WebDataset shards of 1000 images (``KEY.jpg``, ``KEY.cls``,
   ``KEY.idx``); the validation folder needs the same class sub-folders as the train folder::

    streamcoke shards /data/imagenet/train --prefix /data/imagenet-train --maxcount 1000
    streamcoke shards /data/imagenet/val --prefix /data/imagenet-val --maxcount 1000

   (1,281,167 train images: imagenet-train-000000.tar ... imagenet-train-001281.tar; 50,000
   validation images: imagenet-val-000000.tar ... imagenet-val-000049.tar.)

2. Train; run the same line again to resume after an interruption (from OUT/checkpoint.st)::

    torchrun --nproc_per_node=8 examples/pretrain_imagenet.py \\
        --shards '/data/imagenet-train-{000000..001281}.tar' --out runs/coke-r50 \\
        --recipe imagenet-single --val-shards '/data/imagenet-val-{000000..000049}.tar'

   OUT/checkpoint.st is written every ``--checkpoint-steps`` steps (250 by default) and at
   the end of every epoch, when OUT/training.png, OUT/cluster_sizes.png and OUT/gallery.png
   are drawn too. With ``--val-shards``, the end of the run scores the frozen encoder by a
   weighted k-NN vote (k = 20) of the train features, on the first GPU, into OUT/knn.json.

3. Score the checkpoint with a k-NN vote, a linear probe and k-means::

    streamcoke eval runs/coke-r50/checkpoint.st '/data/imagenet-train-{000000..001281}.tar' \\
        --test '/data/imagenet-val-{000000..000049}.tar' --json runs/coke-r50/eval.json

``--dry-run`` runs the whole script (2 steps, checkpoint, plots, k-NN) on a few synthetic
shards on the CPU with the small built-in encoder, in seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from streamcoke import distributed
from streamcoke.io.checkpoint import atomic_write_bytes
from streamcoke.train import CoKeTrainer, ImageShardSource, load_recipe
from streamcoke.train.evaluate import embed, knn_predict
from streamcoke.train.images import write_synthetic_image_shards

IMAGENET_TRAIN_IMAGES = 1281167


def knn_score(trainer: CoKeTrainer, train_shards: str, val_shards: str, num_workers: int) -> dict:
    """Top-1 of a weighted k-NN vote (k = 20, T = 0.07) of the frozen encoder's features."""
    def features(shards):
        batches = ImageShardSource(shards, 256, load_size=trainer.recipe.load_size, num_workers=num_workers,
                                   split_by_node=False)
        with torch.autocast(trainer.device.type, dtype=torch.bfloat16, enabled=trainer.device.type == "cuda"):
            feats, targets, _ = embed(trainer.feature_model(), batches, device=trainer.device,
                                      transform=trainer.input_transform, progress=True)
        return torch.from_numpy(feats).to(trainer.device), targets

    train, train_y = features(train_shards)
    val, val_y = features(val_shards)
    classes, train_class = np.unique(train_y, return_inverse=True)
    k = min(20, len(train))
    pred = knn_predict(train, torch.from_numpy(train_class).to(trainer.device), val, n_classes=len(classes),
                       k=k, temperature=0.07)
    return {"knn_top1": float(np.mean(classes[pred.cpu().numpy()] == val_y)), "k": k, "temperature": 0.07}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="train shards, a brace pattern ('/data/imagenet-train-{000000..001281}.tar')")
    p.add_argument("--out", default="runs/coke-r50", help="checkpoint, plots and scores")
    p.add_argument("--recipe", default="imagenet-single", help="imagenet-single, imagenet-two, imagenet-multicrop "
                                                               "or a .toml file")
    p.add_argument("--n-samples", type=int, default=IMAGENET_TRAIN_IMAGES, help="images in the train shards")
    p.add_argument("--val-shards", default=None, help="labelled validation shards: k-NN top-1 at the end")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's number of epochs")
    p.add_argument("--num-workers", type=int, default=8, help="decoding processes per GPU")
    p.add_argument("--shuffle-buffer", type=int, default=5000,
                   help="samples in each decoding process's shuffle buffer (raw JPEGs, about 110 kB each on "
                        "ImageNet); the shards hold the images in class order, and it mixes them")
    p.add_argument("--checkpoint-steps", type=int, default=250,
                   help="also checkpoint every N steps within an epoch (an ImageNet epoch at batch 1024 is "
                        "1251 steps); 0: only at epoch boundaries")
    p.add_argument("--dry-run", action="store_true", help="2 steps on synthetic shards on the CPU (a check)")
    args = p.parse_args(argv)

    recipe = load_recipe(args.recipe).replace(epochs=args.epochs)
    tmp = None
    if args.dry_run:
        tmp = tempfile.TemporaryDirectory(prefix="pretrain_dry_run_")
        args.n_samples, args.num_workers, args.shuffle_buffer, args.checkpoint_steps = 16, 0, 8, 1
        args.shards = write_synthetic_image_shards(tmp.name, 16, 4, size=40, shard_size=8, prefix="train")
        args.val_shards = write_synthetic_image_shards(tmp.name, 16, 4, size=40, shard_size=8, seed=1, prefix="val")
        recipe = recipe.replace(encoder="small", encoder_width=8, projection_dims=(64, 64, 32),
                                predictor_dims=(64, 32), n_clusters=(4, 6), image_size=32, load_size=36,
                                batch_size=16, epochs=2, precision="fp32")
    if not args.shards:
        p.error("--shards is required (or --dry-run)")
    if args.dry_run:
        device = torch.device("cpu")
    else:
        device = distributed.init_from_env() or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out, ckpt = Path(args.out), Path(args.out) / "checkpoint.st"

    source = ImageShardSource(args.shards, recipe.batch_size // world, load_size=recipe.load_size,
                                       shuffle_buffer=args.shuffle_buffer, num_workers=args.num_workers,
                                       seed=recipe.seed, drop_last=True, pin_memory=device.type == "cuda")
    if ckpt.exists():
        trainer = CoKeTrainer.load(ckpt, device=device, recipe=recipe)
    else:
        trainer = CoKeTrainer(recipe, args.n_samples, device=device)
    if rank == 0:
        start = f"resuming at epoch {trainer.epoch}, step {trainer.step_in_epoch}" if ckpt.exists() else "from scratch"
        print(f"{args.recipe}: {recipe.encoder}, {recipe.epochs} epochs, batch {recipe.batch_size} over {world} "
              f"process(es), K = {', '.join(map(str, recipe.n_clusters))}; {start}", flush=True)

    while trainer.epoch < recipe.epochs:
        row = trainer.train_epoch(source, progress=rank == 0, keep_gallery=True, checkpoint=ckpt,
                                  checkpoint_steps=args.checkpoint_steps)
        trainer.save(ckpt)  # every rank: the random states of all ranks are gathered; rank 0 writes
        if rank == 0:
            trainer.write_report(out)
            print(json.dumps(row), flush=True)
    if dist.is_initialized():
        dist.barrier()
    trainer.release_process_group()
    distributed.leave()

    if args.val_shards and rank == 0:
        scores = knn_score(trainer, args.shards, args.val_shards, args.num_workers)
        atomic_write_bytes(out / "knn.json", (json.dumps(scores, indent=2) + "\n").encode())
        print(f"k-NN top-1 on the validation shards: {scores['knn_top1']:.4f} (wrote {out / 'knn.json'})")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
