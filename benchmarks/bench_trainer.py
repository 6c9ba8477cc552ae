"""Speed of the CoKe trainer against the bare forward-backward loop of the same network.

The claim: ResNet-50, 224 px, bfloat16, from JPEG shards: the full trainer's images/s at least
90% of the bare forward-backward loop of the same model and batch on the same GPU, and the
clustering step under 3% of the step time. Measured side by side in one run, interleaved
rounds, medians (``common.interleaved``):

- **bare forward-backward**: ``build_network(recipe)`` (encoder, projection and predictor
  heads) on a fixed batch of augmented views made once and kept on the device: forward,
  a fixed cosine loss, backward, the recipe's optimiser step. bf16 autocast on CUDA and
  channels-last as the recipe asks. No data loading, augmentation, clustering or label
  memory: the floor the trainer is held to.
- **streamcoke trainer**: ``CoKeTrainer.train_epoch``, the loop ``fit`` runs (each batch
  through ``train_step``: augmentation on the device, forward, online assignment of every
  clustering, label memory, CoKe loss against the previous epoch's labels, backward, LARS
  step; plus the loop's per-step bookkeeping), fed by ``ImageShardSource`` decoding the JPEG
  shards in ``--num-workers`` processes. Epoch 0 (clustering only, learning rate 0) runs once
  beforehand, in full and untimed, so that every sample has a label and the timed epochs
  train as epoch 1, 2, ... do. Each round is a fresh pass (new decoding workers); the first
  steps of a pass (worker start-up, and at least as many batches as the workers can buffer
  ahead) are not timed, so the rate is that of the steady state, data loading included.
- **clustering step**: ``partial_fit`` of (a copy of) the trainer's clusterer on the
  projections of one batch, alone; its share is its time over the trainer's step time.
- **data loader**: ``ImageShardSource`` alone, decoding as fast as it can (steady state as
  above): above the trainer's rate, decoding is not what holds it back.

The shards are written for the run (``write_synthetic_image_shards``, ``--source-size`` px
JPEGs, ``--n-images`` of them, read repeatedly as needed). They decode faster than
ImageNet's photos (about 400 x 350 px on average), so the data-loader row is optimistic for
ImageNet; raise ``--source-size`` to see the difference. No shuffle buffer is used (in the
steady state it costs a list swap per sample; filling it only delays the start of a pass).
cuDNN's autotuner (``torch.backends.cudnn.benchmark``, a process-wide flag) is switched on by
the trainer on CUDA, so both loops run with it.

    python benchmarks/bench_trainer.py                      # ResNet-50, 224 px, batch 256 on the GPU
    python benchmarks/bench_trainer.py --device cpu --encoder small --image-size 64 --batch-size 128 \\
        --n-clusters 300 400 500 --out benchmarks/results/trainer_cpu.json
    python benchmarks/bench_trainer.py --quick --out /tmp/t.json   # seconds, a check that it runs
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, interleaved, machine, table, throughput  # noqa: E402

from streamcoke.train.images import ImageShardSource, write_synthetic_image_shards  # noqa: E402
from streamcoke.train.optim import build_optimizer, param_groups_for  # noqa: E402
from streamcoke.train.recipe import load_recipe  # noqa: E402
from streamcoke.train.trainer import CoKeTrainer, build_network  # noqa: E402

PREFETCH = 2  # batches each DataLoader worker buffers ahead (torch's default prefetch_factor)


class TimedPass:
    """A source for ``train_epoch``: the first ``n_batches`` batches of a fresh pass over
    ``source``, with the time each one was handed out and the time the last one's step ended."""

    def __init__(self, source: ImageShardSource, n_batches: int):
        self.source, self.n_batches = source, n_batches
        self.times: list[float] = []

    def set_epoch(self, epoch: int) -> None:
        self.source.set_epoch(epoch)

    def __iter__(self):
        self.times = []
        batches = iter(self.source)
        try:
            for batch in batches:
                self.times.append(time.perf_counter())
                yield batch
                if len(self.times) == self.n_batches:
                    self.times.append(time.perf_counter())  # the last step is done
                    return
            raise RuntimeError(f"the shards held {len(self.times)} batches, {self.n_batches} were needed")
        finally:
            batches.close()  # stops the decoding workers

    def rate(self, skip: int, batch_size: int) -> float:
        """Images per second from batch ``skip`` to the end of the pass."""
        return (len(self.times) - 1 - skip) * batch_size / (self.times[-1] - self.times[skip])


def default_workers() -> int:
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--recipe", default="imagenet-single",
                   help="built-in recipe or .toml file (views, heads, optimiser)")
    p.add_argument("--encoder", default="resnet50", help="'resnet50' (needs torchvision), 'small', ...")
    p.add_argument("--batch-size", type=int, default=256, help="per device (the recipe's 1024 over 4 GPUs)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n-clusters", type=int, nargs="+", default=[3000, 4000, 5000])
    p.add_argument("--steps", type=int, default=40, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-workers", type=int, default=None,
                   help=f"decoding processes (default: cores - 2, at most 12; here {default_workers()})")
    p.add_argument("--n-images", type=int, default=2048, help="distinct images written to the shards")
    p.add_argument("--source-size", type=int, default=256, help="side of the JPEGs written to the shards")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for the smoke test: small encoder, 32 px, small K, few steps")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default: results/trainer.json; none with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.encoder, args.image_size, args.batch_size, args.n_clusters = "small", 32, 16, [8, 12]
        args.steps, args.rounds, args.n_images, args.source_size = 4, 1, 64, 40
        args.num_workers = 1 if args.num_workers is None else args.num_workers
    workers = default_workers() if args.num_workers is None else args.num_workers
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    encoder = args.encoder
    if encoder != "small":
        try:
            import torchvision  # noqa: F401
        except ImportError:
            print(f"note: torchvision is not installed, so encoder {encoder!r} is unavailable; using the "
                  "built-in 'small' encoder instead (pip install torchvision for ResNets)")
            encoder = "small"
    B = args.batch_size
    recipe = load_recipe(args.recipe).replace(
        encoder=encoder, image_size=args.image_size, load_size=round(args.image_size * 256 / 224),
        batch_size=B, n_clusters=tuple(args.n_clusters))
    if args.quick:
        recipe = recipe.replace(encoder_width=8, projection_dims=(64, 64, 32), predictor_dims=(64, 32))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    info = machine()
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else info["cpu"]

    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        t0 = time.perf_counter()
        shard_size = max(1, min(256, args.n_images // 8))
        write_synthetic_image_shards(tmp, args.n_images, 100, size=args.source_size, shard_size=shard_size)
        shards = sorted(glob.glob(os.path.join(tmp, "*.tar")))
        print(f"wrote {args.n_images} JPEGs of {args.source_size} px in {len(shards)} shards "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

        def source(n_batches: int) -> ImageShardSource:
            # enough repeats of the shards for n_batches full batches (each worker drops its last short one)
            reps = math.ceil((n_batches + workers + 1) * B / args.n_images) + 1
            return ImageShardSource(shards * reps, B, load_size=recipe.load_size, num_workers=workers,
                                    drop_last=True, pin_memory=dev.type == "cuda")

        # -- the trainer, through its untimed epoch 0 (clustering only: every sample gets a label)
        trainer = CoKeTrainer(recipe, n_samples=args.n_images, device=dev)
        # every image at least once, and enough rows to seed the largest clustering
        reps0 = max(2, math.ceil((max(recipe.n_clusters) + (workers + 1) * B) / args.n_images))
        t0 = time.perf_counter()
        trainer.train_epoch(ImageShardSource(shards * reps0, B, load_size=recipe.load_size, num_workers=workers,
                                             drop_last=True, pin_memory=dev.type == "cuda"), progress=False)
        sync()
        epoch0_s = time.perf_counter() - t0
        print(f"epoch 0 (clustering only, {trainer.global_step} batches) in {epoch0_s:.1f} s; "
              f"{100 * trainer.memory.coverage():.0f}% of the images labelled", flush=True)

        # -- one batch of views for the bare loop and projections for the clustering step
        first = next(iter(ImageShardSource(shards, B, load_size=recipe.load_size, drop_last=True)))
        views = trainer.augment(first.images.to(dev), torch.Generator(dev).manual_seed(1))
        views = [v.contiguous(memory_format=torch.channels_last) if recipe.channels_last else v for v in views]
        use_bf16 = recipe.precision == "bf16" and dev.type == "cuda"
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            trainer.network.eval()
            z = trainer.network(views[0])[0].float()
            trainer.network.train()

        # -- (a) the bare loop: same network, same views, same optimiser, no data, no clustering
        torch.manual_seed(recipe.seed)
        net = build_network(recipe).to(dev)
        if recipe.channels_last:
            net = net.to(memory_format=torch.channels_last)
        opt = build_optimizer(recipe.optimizer, param_groups_for(net, recipe.weight_decay), 1e-3,
                              recipe.momentum, recipe.weight_decay)
        by_size: dict[tuple, list] = {}
        for v in views:
            by_size.setdefault(tuple(v.shape[2:]), []).append(v)
        inputs = [torch.cat(vs) for vs in by_size.values()]
        targets = [torch.nn.functional.normalize(torch.randn(len(x), net.out_dim, device=dev), dim=1) for x in inputs]

        def bare_step(_):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = sum(-(net(x)[1].float() * t).sum(1).mean() for x, t in zip(inputs, targets))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        # -- the contenders
        warm = max(3, workers * PREFETCH + 2)  # untimed steps of each pass: start-up, the workers' buffer
        passes: dict[str, list[TimedPass]] = {"trainer": [], "loader": []}

        def run_trainer():
            timed = TimedPass(source(warm + args.steps), warm + args.steps)
            trainer.train_epoch(timed, progress=False)
            passes["trainer"].append(timed)
            return timed.rate(warm, B)

        def run_bare():
            return throughput(bare_step, B, n_steps=args.steps, warmup=2, sync=sync)

        clusterer = copy.deepcopy(trainer.clusterer)

        def run_clustering():
            return throughput(lambda _: clusterer.partial_fit(z), B, n_steps=args.steps, warmup=2, sync=sync)

        def run_loader():
            timed = TimedPass(source(warm + args.steps), warm + args.steps)
            for _ in timed:
                pass
            return timed.rate(warm, B)

        rates = interleaved({"streamcoke trainer": run_trainer, "bare forward-backward": run_bare,
                             "clustering step": run_clustering, "data loader": run_loader}, args.rounds)

    bare = rates["bare forward-backward"]
    step_ms = {name: 1000 * B / r for name, r in rates.items()}
    share = step_ms["clustering step"] / step_ms["streamcoke trainer"]
    rows = [{"row": name, "images/s": r, "ms/step": step_ms[name], "vs bare loop": r / bare}
            for name, r in rates.items()]
    rows[2]["share of trainer step"] = f"{100 * share:.1f}%"
    labelled = [row["labelled"] for row in trainer.history[1:]]
    claim_config = (dev.type == "cuda" and recipe.encoder == "resnet50" and recipe.image_size == 224
                    and recipe.precision == "bf16")
    ratio = rates["streamcoke trainer"] / bare
    print(f"\nCoKe trainer step, {recipe.encoder}, {recipe.image_size} px, batch {B}, "
          f"{'bf16' if use_bf16 else 'fp32'}, views {recipe.views}, K = {', '.join(map(str, recipe.n_clusters))}, "
          f"{workers} decoding worker(s), device {dev} ({device_name}), median of {args.rounds} round(s) "
          f"of {args.steps} steps")
    print(table(rows, ["row", "images/s", "ms/step", "vs bare loop", "share of trainer step"]))
    print(f"\ntrainer at {100 * ratio:.1f}% of the bare loop (claim: >= 90%); clustering {100 * share:.1f}% of "
          f"the step (claim: < 3%)" + ("" if claim_config else
                                       "; not the claim's configuration (ResNet-50, 224 px, bf16, CUDA)"))
    print(f"machine: {', '.join(f'{k}: {v}' for k, v in info.items())}")
    result = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "encoder_used": recipe.encoder, "num_workers_used": workers, "load_size": recipe.load_size,
                   "precision_used": "bf16" if use_bf16 else "fp32", "warmup_steps_per_pass": warm},
        "machine": info, "device_name": device_name, "images_per_s": rates, "ms_per_step": step_ms,
        "trainer_vs_bare": ratio, "clustering_share_of_step": share, "epoch0_seconds": epoch0_s,
        "labelled_fraction_in_timed_epochs": labelled,
        "claim": {"configuration": claim_config, "trainer_at_least_90pct": ratio >= 0.9,
                  "clustering_under_3pct": share < 0.03},
    }
    out = args.out if args.out is not None else (None if args.quick else RESULTS / "trainer.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp_out, out)
        print("wrote", out)
    return result


if __name__ == "__main__":
    main()
