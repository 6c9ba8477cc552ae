"""The CoKe trainer: cluster the projections online, learn from the previous epoch's labels.

One step (ALGORITHM.md section 2):

1. the batch's images are augmented on the training device into one or more views;
2. the network maps every view to an L2-normalised projection z and prediction p;
3. the projections of the first view (or of the un-augmented image, ``label_view="clean"``)
   are assigned by the online constrained k-means of every clustering (one multiply for all of
   them); the labels go into the label memory under the samples' stable indices, for use in
   the next epoch;
4. the loss is the cross-entropy of ``softmax(<p, c> / T)`` against each sample's label of the
   previous epoch, with the centers published at the last epoch boundary as fixed class
   weights (soft labels from the last few epochs in stage two). Epoch 0 only clusters.

Under ``torch.distributed`` the network is wrapped in DistributedDataParallel (with
SyncBatchNorm on CUDA; on CPU the BatchNorm running statistics are averaged over ranks at every
epoch boundary), the clusterer all-reduces its statistics and the label memory receives every
rank's labels, so clusterer and memory stay identical on every rank.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import distributed
from ..cluster import MultiOnlineConstrainedKMeans
from ..io.checkpoint import load_checkpoint, save_checkpoint
from .augment import Augment, ViewSpec, imagenet_views, small_image_views
from .loss import IGNORE, coke_loss, sharpened_histogram
from .memory import LabelMemory
from .models import CoKeNetwork, build_encoder
from .optim import Schedule, build_optimizer, param_groups_for
from .recipe import Recipe

CHECKPOINT_KIND = "streamcoke.CoKeTrainer"
GALLERY_SAMPLES = 2048  # images (as thumbnails) kept from the last epoch for the cluster gallery
THUMBNAIL = 64


def recipe_views(recipe: Recipe) -> list[ViewSpec]:
    """The augmentation views a recipe asks for."""
    if recipe.views == "small":
        return small_image_views(recipe.image_size, recipe.small_views)
    views = imagenet_views(recipe.views)
    if recipe.image_size != 224:  # a smaller run of an ImageNet recipe: scale every view
        views = [ViewSpec(**{**v.__dict__, "size": max(8, round(v.size * recipe.image_size / 224))}) for v in views]
    return views


def build_network(recipe: Recipe) -> CoKeNetwork:
    kwargs = {"width": recipe.encoder_width} if recipe.encoder == "small" else {}
    encoder, dim = build_encoder(recipe.encoder, in_channels=recipe.in_channels, **kwargs)
    return CoKeNetwork(encoder, dim, recipe.projection_dims, recipe.predictor_dims)


@dataclass
class StepStats:
    loss: float
    labelled: float  # fraction of the batch's samples that had a label from the previous epoch


class CoKeTrainer:
    """Pretrain an encoder on online constrained k-means pseudo-labels.

    Parameters
    ----------
    recipe : Recipe
        All settings (see :mod:`streamcoke.train.recipe`).
    n_samples : int
        Size of the data set: sample indices run from 0 to ``n_samples - 1`` and size the label
        memory. An index outside that range is an error, never a silent wrong label.
    network : CoKeNetwork, optional
        Encoder with heads; default: built from the recipe (``recipe.encoder``).
    device : str or torch.device, optional
        Default: the current CUDA device when available, else CPU.

    Examples
    --------
    >>> import torch
    >>> from streamcoke.train import CoKeTrainer, Recipe, TensorImageSource
    >>> recipe = Recipe(encoder="small", encoder_width=8, projection_dims=(32, 16), predictor_dims=(32, 16),
    ...                 n_clusters=(4, 6), views="small", image_size=8, mean=(0.5,), std=(0.25,),
    ...                 epochs=2, batch_size=16, optimizer="sgd", lr=0.05, warmup_epochs=0,
    ...                 stage2_epoch=None, precision="fp32", channels_last=False)
    >>> images = torch.randint(0, 255, (48, 1, 8, 8), dtype=torch.uint8)
    >>> trainer = CoKeTrainer(recipe, n_samples=48, device="cpu")
    >>> history = trainer.fit(TensorImageSource(images, batch_size=16), progress=False)
    >>> [round(row["labelled"], 2) for row in history]
    [0.0, 1.0]
    """

    def __init__(self, recipe: Recipe, n_samples: int, *, network: nn.Module | None = None, device=None):
        if n_samples < 1:
            raise ValueError(f"n_samples must be positive, got {n_samples}")
        self.recipe = recipe
        self.n_samples = int(n_samples)
        self.device = torch.device(device) if device is not None else distributed.default_device()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if distributed.is_distributed() else (0, 1)
        if recipe.batch_size % self.world:
            raise ValueError(f"batch_size {recipe.batch_size} is not divisible by the {self.world} ranks")
        torch.manual_seed(recipe.seed)  # the same initial weights on every rank
        net = network if network is not None else build_network(recipe)
        net = net.to(self.device)
        if recipe.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.network = net
        self.model = net
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        if self.world > 1:
            if self.device.type == "cuda":  # SyncBatchNorm runs on CUDA only
                net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
            self.model = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device] if self.device.type == "cuda" else None)
            self.network = self.model.module
        self.augment = Augment(recipe_views(recipe), recipe.mean, recipe.std).to(self.device)
        self.clusterer = MultiOnlineConstrainedKMeans(
            recipe.n_clusters, min_size_ratio=recipe.min_size_ratio, center_update="mean",
            device=self.device, random_state=recipe.seed)
        history = recipe.stage2_history if recipe.stage2_epoch is not None else 1
        self.memory = LabelMemory(self.n_samples, len(recipe.n_clusters), history, device=self.device)
        # Centers published at the recent epoch boundaries (stage two averages them).
        self.center_history: list[Tensor] = []
        self.optimizer = build_optimizer(recipe.optimizer, param_groups_for(self.network, recipe.weight_decay),
                                         recipe.lr, recipe.momentum, recipe.weight_decay)
        # Each rank augments its own rows with its own stream of random numbers.
        self.generator = torch.Generator(self.device).manual_seed(recipe.seed * 1000 + self.rank)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.steps_per_epoch = max(1, math.ceil(self.n_samples / recipe.batch_size))
        self.history: list[dict] = []
        self._gallery: dict[str, list] = {}
        self._pending: list[tuple[Tensor, Tensor]] = []

    # ------------------------------------------------------------------------- schedule
    def lr_at(self, epoch: int, step_in_epoch: int) -> float:
        """Learning rate at a step of an epoch: 0 through epoch 0, then warm-up and cosine.

        The position is counted from the epoch, so an epoch a little shorter or longer than
        ``ceil(n_samples / batch_size)`` steps (dropped last batches, ranks in lock step, skipped
        samples) cannot shift the schedule of the epochs after it."""
        r, spe = self.recipe, self.steps_per_epoch
        if epoch == 0:
            return 0.0
        train_step = (epoch - 1) * spe + min(step_in_epoch, spe - 1)
        sched = Schedule(total_steps=max(1, (r.epochs - 1) * spe), base=r.lr,
                         warmup_steps=min(r.warmup_epochs * spe, max(0, (r.epochs - 1) * spe)), final=r.final_lr)
        return sched(train_step)

    @property
    def in_stage2(self) -> bool:
        s2 = self.recipe.stage2_epoch
        return s2 is not None and self.epoch >= s2 and self.memory.epoch >= 1

    # ------------------------------------------------------------------------------ step
    def _autocast(self):
        on = self.recipe.precision == "bf16" and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def train_step(self, images: Tensor, index: Tensor) -> StepStats:
        """One step on a batch of uint8 images (B, C, H, W) with their sample indices (B,)."""
        self.memory.check_index(index)  # on the host, before anything changes
        images = images.to(self.device, non_blocking=True)
        index = index.to(self.device, non_blocking=True)
        views = self.augment(images, self.generator)
        learn = self.epoch > 0
        lr = self.lr_at(self.epoch, self.step_in_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.recipe.label_view == "clean":
            # Assign the un-augmented image: its labels keep the structure the encoder already has
            # instead of the augmentation's noise (on small data sets, where few epochs are run).
            with torch.no_grad(), self._autocast():
                z_label = self.network(self.input_transform(images))[0].float()
        with torch.set_grad_enabled(learn), self._autocast():
            outs = self._forward(views)
        if self.recipe.label_view == "first":
            z_label = outs[0][0].detach().float()
        loss = labelled = None
        if learn:
            # The loss needs only last epoch's labels and centers, so the backward pass is queued
            # before the clustering step, whose host sync then overlaps the GPU's work.
            targets, centers, labelled = self._targets(index)
            loss = self._loss(outs, targets, centers)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self._cluster(z_label, index)
        self.step_in_epoch += 1
        self.global_step += 1
        return StepStats(float("nan") if loss is None else float(loss.detach()),
                         0.0 if labelled is None else float(labelled))

    def _cluster(self, z: Tensor, index: Tensor) -> None:
        """Assign the first view's projections online and record the labels in the memory."""
        if not self.clusterer.__sklearn_is_fitted__():
            # Seeding needs at least as many rows as the largest clustering has clusters, which
            # may exceed a batch (K = 5000, batch 1024): hold batches back until there are enough.
            self._pending.append((z, index))
            held, = distributed.all_reduce_sum(torch.tensor([sum(len(i) for _, i in self._pending)], device=z.device))
            if int(held) < max(self.recipe.n_clusters):
                return
            z = torch.cat([p for p, _ in self._pending])
            index = torch.cat([i for _, i in self._pending])
            self._pending = []
        self.clusterer.partial_fit(z)
        all_index = distributed.all_gather_rows(index.unsqueeze(1))[:, 0]
        all_labels = distributed.all_gather_rows(self.clusterer.labels_)
        self.memory.write(all_index, all_labels, checked=True)

    def _forward(self, views: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """(z, p) per view; views of the same size go through the network together."""
        out: list = [None] * len(views)
        by_size: dict[tuple, list[int]] = {}
        for i, v in enumerate(views):
            by_size.setdefault(tuple(v.shape[2:]), []).append(i)
        for ids in by_size.values():
            z, p = self.model(torch.cat([views[i] for i in ids]))
            for i, zc, pc in zip(ids, z.chunk(len(ids)), p.chunk(len(ids))):
                out[i] = (zc, pc)
        return out

    def _targets(self, index: Tensor):
        sizes = self.recipe.n_clusters
        if self.in_stage2:
            recent = self.memory.recent(index)  # (B, m, H)
            targets = [sharpened_histogram(recent[:, :, h], k, self.recipe.stage2_temperature)
                       for h, k in enumerate(sizes)]
            labelled = (recent[:, 0, 0] != IGNORE).float().mean()
            centers = F.normalize(torch.stack(self.center_history).mean(0), dim=1)
        else:
            targets = self.memory.previous(index)
            labelled = (targets[:, 0] != IGNORE).float().mean()
            centers = torch.cat(self.clusterer.published_centers_)
        return targets, centers, labelled

    def _loss(self, outs, targets, centers) -> Tensor:
        r = self.recipe
        total = 0.0
        for z, p in outs:
            if r.predictor_weight > 0:
                total = total + r.predictor_weight * coke_loss(p, centers, r.n_clusters, targets, r.temperature)
            if r.predictor_weight < 1:
                total = total + (1 - r.predictor_weight) * coke_loss(z, centers, r.n_clusters, targets, r.temperature)
        return total / len(outs)

    def end_epoch(self) -> None:
        """Epoch boundary: publish centers, close the label memory's epoch."""
        if self._pending:
            raise ValueError(f"an epoch of {sum(len(i) for _, i in self._pending) * self.world} samples is too "
                             f"small to seed {max(self.recipe.n_clusters)} clusters; use fewer clusters or more data")
        self.clusterer.end_epoch()
        self.memory.end_epoch()
        if self.world > 1 and self.device.type != "cuda":
            # Without SyncBatchNorm each rank's running statistics drift apart; average them.
            buffers = [b for b in self.network.buffers() if b.is_floating_point()]
            for b, total in zip(buffers, distributed.all_reduce_sum(*buffers)):
                b.copy_(total / self.world)
        self.center_history = (self.center_history + [torch.cat(self.clusterer.published_centers_)])[
            -self.memory.history:]
        self.epoch += 1
        self.step_in_epoch = 0

    # ------------------------------------------------------------------------------- fit
    def fit(self, source, *, epochs: int | None = None, out_dir: str | os.PathLike | None = None,
            progress: bool = True, checkpoint_every: int = 1, checkpoint_steps: int = 0) -> list[dict]:
        """Train until ``epochs`` (default: the recipe's) epochs are done; returns the history.

        ``source`` yields batches with ``.images`` and ``.index`` and has ``set_epoch(epoch)``
        (:class:`~streamcoke.train.images.ImageShardSource`, :class:`TensorImageSource`). A
        trainer restored with :meth:`load` mid-epoch skips the batches it already trained on,
        so the run continues exactly where it stopped. With ``out_dir``, a checkpoint is
        written every ``checkpoint_every`` epochs (and at the end), with the training plots,
        and, with ``checkpoint_steps`` > 0, also every that many steps within an epoch, so a
        long epoch interrupted loses at most that many steps.
        """
        if checkpoint_every < 1 or checkpoint_steps < 0:
            raise ValueError(f"checkpoint_every must be >= 1 and checkpoint_steps >= 0, got {checkpoint_every} "
                             f"and {checkpoint_steps}")
        epochs = self.recipe.epochs if epochs is None else int(epochs)
        out = Path(out_dir) if out_dir is not None else None
        ckpt = out / "checkpoint.st" if out is not None else None
        while self.epoch < epochs:
            self.train_epoch(source, progress=progress, keep_gallery=self.epoch == epochs - 1,
                             checkpoint=ckpt if checkpoint_steps else None, checkpoint_steps=checkpoint_steps)
            if ckpt is not None and (self.epoch % checkpoint_every == 0 or self.epoch == epochs):
                self.save(ckpt)
        if out is not None and self.rank == 0:
            self.write_report(out)
        return self.history

    def train_epoch(self, source, *, progress: bool = True, keep_gallery: bool = False,
                    checkpoint: str | os.PathLike | None = None, checkpoint_steps: int = 0) -> dict:
        """One pass over ``source`` (the rest of it, after a mid-epoch resume), then the boundary.
        With ``checkpoint``, a checkpoint is written there every ``checkpoint_steps`` steps
        (not while the first batches are still held back to seed the clusterer)."""
        source.set_epoch(self.epoch)
        skip = self.step_in_epoch
        losses, labelled, n_images, shown = [], [], 0, 0.0
        start = time.perf_counter()
        self._gallery = {}
        bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {self.epoch}", unit="step",
                   disable=not progress or self.rank != 0, dynamic_ncols=True, leave=False)
        for i, batch in enumerate(_lockstep(source, self.device) if self.world > 1 else source):
            if i < skip:
                continue
            if len(batch.index) < 2:  # BatchNorm cannot train on one row: a last batch that small is dropped
                continue
            stats = self.train_step(batch.images, batch.index)
            n_images += len(batch.index) * self.world
            if not math.isnan(stats.loss):
                losses.append(stats.loss)
            labelled.append(stats.labelled)
            if keep_gallery:
                self._keep_for_gallery(batch)
            elapsed = time.perf_counter() - start
            if bar.disable is False and elapsed - shown > 1.0:  # the size spread costs device syncs
                shown = elapsed
                lo, hi = self.size_spread()
                bar.set_postfix_str(f"{n_images / max(elapsed, 1e-9):.0f} img/s, loss {stats.loss:.3f}, "
                                    f"sizes x{lo:.2f}..x{hi:.2f} of uniform", refresh=False)
            bar.update(1)
            if checkpoint is not None and checkpoint_steps and self.step_in_epoch % checkpoint_steps == 0 \
                    and not self._pending:
                self.save(checkpoint)
        bar.close()
        if self.step_in_epoch == 0 and skip == 0:
            raise ValueError("the source yielded no batches")
        elapsed = time.perf_counter() - start
        lo, hi = self.size_spread()
        row = {"epoch": self.epoch, "step": self.global_step, "loss": float(np.mean(losses)) if losses else float("nan"),
               "lr": self.lr_at(self.epoch, self.step_in_epoch - 1), "images_per_s": n_images / max(elapsed, 1e-9),
               "min_share": lo, "max_share": hi, "labelled": float(np.mean(labelled)) if labelled else 0.0,
               "seconds": elapsed}
        self.end_epoch()
        self.history.append(row)
        if progress and self.rank == 0:
            tqdm.write(f"epoch {row['epoch']}: loss {row['loss']:.4f}, lr {row['lr']:.4g}, "
                       f"{row['images_per_s']:.0f} img/s, cluster sizes x{lo:.2f}..x{hi:.2f} of uniform")
        return row

    def size_spread(self) -> tuple[float, float]:
        """Smallest and largest cluster size of the running epoch, as multiples of the uniform
        size, over all clusterings."""
        if not self.clusterer.__sklearn_is_fitted__():
            return float("nan"), float("nan")
        lo, hi = math.inf, 0.0
        for sizes in self.clusterer.cluster_sizes_:
            total = float(sizes.sum())
            if total > 0:
                rel = sizes.float() * len(sizes) / total
                lo, hi = min(lo, float(rel.min())), max(hi, float(rel.max()))
        return (lo, hi) if hi > 0 else (float("nan"), float("nan"))

    # -------------------------------------------------------------------------- report
    def _keep_for_gallery(self, batch) -> None:
        kept = sum(len(x) for x in self._gallery.get("index", []))
        if kept >= GALLERY_SAMPLES:
            return
        n = min(len(batch.index), GALLERY_SAMPLES - kept)
        images = batch.images[:n].cpu()
        if images.shape[-1] > THUMBNAIL:
            images = F.interpolate(images.float(), size=THUMBNAIL, mode="area").round().clamp(0, 255).to(torch.uint8)
        self._gallery.setdefault("images", []).append(images)
        self._gallery.setdefault("index", []).append(batch.index[:n].cpu())
        self._gallery.setdefault("target", []).append(batch.target[:n].cpu())

    def write_report(self, out_dir) -> dict[str, Path | None]:
        """Training curves, cluster sizes and the cluster gallery, written into ``out_dir``."""
        from .report import cluster_gallery, plot_cluster_sizes, plot_training

        out = Path(out_dir)
        written = {
            "training": plot_training(self.history, out / "training.png", min_size_ratio=self.recipe.min_size_ratio),
            "cluster_sizes": plot_cluster_sizes(
                [s.cpu().numpy() for s in self.clusterer.last_epoch_cluster_sizes_], out / "cluster_sizes.png",
                min_size_ratio=self.recipe.min_size_ratio, names=[f"K = {k}" for k in self.recipe.n_clusters]),
        }
        if self._gallery:
            index = torch.cat(self._gallery["index"])
            labels = self.memory.previous(index.to(self.device))[:, 0].cpu()
            target = torch.cat(self._gallery["target"])
            keep = labels != IGNORE
            if bool(keep.any()):
                written["gallery"] = cluster_gallery(
                    torch.cat(self._gallery["images"])[keep], labels[keep], out / "gallery.png",
                    targets=target[keep] if bool((target >= 0).all()) else None)
        return written

    # ---------------------------------------------------------------------- checkpoints
    def release_process_group(self) -> None:
        """Train as one process from here on: drop the DistributedDataParallel wrapper, the
        trainer's hold on the process group, so that :func:`streamcoke.distributed.leave` can
        shut the group down at once. The network and every other state stay as they are."""
        self.model = self.network

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Everything needed to resume exactly, as (tensors, JSON-serialisable metadata)."""
        tensors = {f"model.{k}": v for k, v in self.network.state_dict().items()}
        opt_tensors, opt_meta = _flatten_optimizer(self.optimizer.state_dict())
        tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
        cl = self.clusterer.state_dict()
        tensors.update({f"cluster.{k}": v for k, v in cl["tensors"].items()})
        tensors["memory.labels"] = self.memory.labels
        for i, c in enumerate(self.center_history):
            tensors[f"centers_history.{i}"] = c
        # Every rank draws its own random numbers: keep all of them, one row per rank.
        rngs = {"augment": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rngs["cuda"] = torch.cuda.get_rng_state(self.device)
        for name, st in rngs.items():
            row = st.to(self.device) if self.device.type == "cuda" else st
            tensors[f"rng.{name}"] = distributed.all_gather_rows(row.unsqueeze(0)).cpu()
        meta = {
            "recipe": self.recipe.to_dict(), "n_samples": self.n_samples, "world_size": self.world,
            "device_type": self.device.type,
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "memory_epoch": self.memory.epoch, "n_center_history": len(self.center_history),
            "optimizer": opt_meta, "cluster": cl["meta"], "history": self.history,
        }
        return tensors, meta

    def save(self, path) -> None:
        """Write a checkpoint (safetensors with a JSON header; atomic; loads without unpickling).

        Under ``torch.distributed`` every rank calls it (the random states of all ranks are
        gathered); rank 0 writes the file."""
        if self._pending:
            raise RuntimeError("cannot checkpoint while the first batches are held back to seed the clusterer; "
                               "save at an epoch boundary")
        tensors, meta = self.state()
        if self.rank == 0:
            save_checkpoint(path, tensors, meta, kind=CHECKPOINT_KIND)

    @classmethod
    def load(cls, path, *, network: nn.Module | None = None, device=None, recipe: Recipe | None = None) -> "CoKeTrainer":
        """Rebuild a trainer from :meth:`save`'s file. ``recipe``, when given, must match the
        saved one (a checkpoint from another configuration is refused, naming the settings)."""
        tensors, meta = load_checkpoint(path, kind=CHECKPOINT_KIND)
        saved = Recipe.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in meta["recipe"].items()},
                                 f"checkpoint {str(path)!r}")
        if recipe is not None:
            diff = sorted(k for k in saved.to_dict() if saved.to_dict()[k] != recipe.to_dict()[k]
                          and k not in RESUMABLE_CHANGES)
            if diff:
                raise ValueError(f"checkpoint {str(path)!r} was written by another configuration: "
                                 + ", ".join(f"{k}={saved.to_dict()[k]!r} (now {recipe.to_dict()[k]!r})" for k in diff))
            saved = recipe
        trainer = cls(saved, int(meta["n_samples"]), network=network, device=device)
        trainer.load_state(tensors, meta, source=str(path))
        return trainer

    def load_state(self, tensors: dict[str, Tensor], meta: dict, source: str = "checkpoint") -> None:
        if int(meta["n_samples"]) != self.n_samples:
            raise ValueError(f"{source} holds a label memory of {meta['n_samples']} samples, "
                             f"this run has {self.n_samples}")
        if int(meta["step_in_epoch"]) and int(meta["world_size"]) != self.world:
            raise ValueError(f"{source} was written mid-epoch by {meta['world_size']} process(es); resume it with "
                             f"as many (this run has {self.world}), or from an epoch-boundary checkpoint")
        expected = tuple(self.memory.labels.shape)
        if tuple(tensors["memory.labels"].shape) != expected:
            raise ValueError(f"{source} holds a label memory of shape {tuple(tensors['memory.labels'].shape)}, "
                             f"this run needs {expected} (history, samples, clusterings)")
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.network.load_state_dict(model_sd)
        except RuntimeError as exc:
            raise ValueError(f"{source} does not fit this network: {str(exc).splitlines()[0]}") from None
        self.optimizer.load_state_dict(_unflatten_optimizer(
            {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}, meta["optimizer"], self.device))
        self.clusterer.load_state_dict({"tensors": {k[8:]: v for k, v in tensors.items() if k.startswith("cluster.")},
                                        "meta": meta["cluster"]})
        self.memory.load_state_dict({"labels": tensors["memory.labels"], "epoch": meta["memory_epoch"]})
        self.center_history = [tensors[f"centers_history.{i}"].to(self.device)
                               for i in range(int(meta["n_center_history"]))]
        rank = self.rank if tensors["rng.torch"].shape[0] == self.world else 0
        torch.set_rng_state(tensors["rng.torch"][rank].contiguous())
        if meta.get("device_type") == self.device.type:  # a generator's state is device-specific
            self.generator.set_state(tensors["rng.augment"][rank].contiguous())
            if "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"][rank].contiguous(), self.device)
        self.epoch, self.step_in_epoch = int(meta["epoch"]), int(meta["step_in_epoch"])
        self.global_step = int(meta["global_step"])
        self.history = list(meta["history"])

    # ------------------------------------------------------------------------- features
    def encode(self, images: Tensor) -> Tensor:
        """Encoder features of uint8 images, without augmentation (resized to the recipe's
        image size and normalised), in eval mode."""
        return self.feature_model()(self.input_transform(images.to(self.device)))

    def input_transform(self, images: Tensor) -> Tensor:
        return prepare_images(images, self.recipe)

    def feature_model(self) -> nn.Module:
        return self.network.encoder


def prepare_images(images: Tensor, recipe: Recipe) -> Tensor:
    """uint8 images as the network's input without augmentation: resized to the recipe's image
    size (with antialiasing) and normalised."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    if x.shape[-1] != recipe.image_size or x.shape[-2] != recipe.image_size:
        x = F.interpolate(x, size=recipe.image_size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(recipe.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(recipe.std, device=x.device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if recipe.channels_last else x


def load_encoder(path, device=None) -> tuple[Recipe, nn.Module]:
    """The recipe and the trained encoder (eval mode) of a trainer checkpoint, without the
    clusterers, label memory or optimiser: what ``streamcoke embed`` and ``eval`` need."""
    tensors, meta = load_checkpoint(path, kind=CHECKPOINT_KIND)
    recipe = Recipe.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in meta["recipe"].items()},
                              f"checkpoint {str(path)!r}")
    device = torch.device(device) if device is not None else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    network = build_network(recipe)
    try:
        network.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except RuntimeError as exc:
        raise ValueError(f"{str(path)!r} does not fit the network of its recipe: {str(exc).splitlines()[0]}") from None
    encoder = network.encoder.to(device)
    if recipe.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    return recipe, encoder.eval()


def _lockstep(source, device):
    """Batches of ``source``, ending every rank's pass when the first rank's ends: ranks read
    whole shards, which need not divide evenly over them (1282 shards over 8 GPUs), and DDP
    needs every rank to take the same number of steps."""
    batches = iter(source)
    collective = distributed.collective_device(device)
    try:
        while True:
            batch = next(batches, None)
            # Every rank needs a batch, of at least 2 rows for BatchNorm, or all stop together.
            rows = torch.tensor([0 if batch is None else len(batch.index)], dtype=torch.int64, device=collective)
            dist.all_reduce(rows, op=dist.ReduceOp.MIN)
            if rows.item() < 2:
                return
            yield batch
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


# Settings a resumed run may change without invalidating its state.
RESUMABLE_CHANGES = ("epochs",)


def _flatten_optimizer(sd: dict) -> tuple[dict[str, Tensor], dict]:
    """An optimizer state dict as flat tensors plus JSON metadata (no pickling)."""
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict, device) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value.to(device) if value.dim() > 0 else value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
