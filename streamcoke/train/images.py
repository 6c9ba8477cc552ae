"""Image batches for the encoder trainer: from WebDataset shards, or from a tensor in memory.

Sources yield :class:`ImageBatch` objects of uint8 images, all of one square size; the
augmentation (:mod:`streamcoke.train.augment`) then runs on the training device, so the only
work left on the host is decoding. Each sample carries a stable ``index`` (its row in the
data set, used to keep per-sample state across epochs) and its class, or -1 when unknown.

Shards use ImageNet's WebDataset layout, as written by :mod:`streamcoke.io.shards`:
``KEY.jpg`` (or another image format), ``KEY.cls`` and ``KEY.idx``, both ASCII integers.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from ..data.batch import DataError
from ..data.tar_check import shard_samples
from ..data.webdataset_source import IMAGE_EXTENSIONS
from ..distributed import is_distributed


@dataclass
class ImageBatch:
    """One batch of images.

    Attributes
    ----------
    images : Tensor
        uint8 (B, C, S, S). Batches decoded from shards are channels-last in memory.
    index : Tensor
        int64 (B,), each sample's stable index in the data set.
    target : Tensor
        int64 (B,), each sample's class, or -1 when unknown.
    keys : list of str
        Each sample's key (its shard key, or its row number).
    """

    images: Tensor
    index: Tensor
    target: Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


# ---------------------------------------------------------------------------------- decoding
def decode_square_image(data: bytes, size: int) -> np.ndarray:
    """An encoded image as a (size, size, 3) uint8 RGB array: the shorter side resized to
    ``size``, then the centre square (one resampling of the central box).

    JPEGs are decoded at the smallest of 1/1, 1/2, 1/4 or 1/8 scale that still covers
    ``size`` (Pillow's ``draft``): much faster for large photos, at no loss once resized.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        rgb = img.convert("RGB")
    w, h = rgb.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(out)


def parse_int_field(data: bytes, name: str) -> int:
    """A non-negative ASCII integer field (``KEY.idx``, ``KEY.cls``); anything else is an error,
    never a guessed value."""
    text = data.strip()
    if not text.isdigit() or len(text) > 18:  # digits only: no sign, no fraction, fits in int64
        raise ValueError(f"field {name!r} is not a non-negative integer: {bytes(data[:40])!r}")
    return int(text)


class _Skipped:
    """Stream marker: ``n`` samples (or the rest of a shard) were skipped. It travels with the
    samples, through DataLoader workers, to be counted where the batches are consumed."""

    def __init__(self, n: int = 1):
        self.n = n


def _fail(skip: bool, err: DataError) -> _Skipped:
    if not skip:
        raise err
    return _Skipped(1)


class _ReadShards:
    """Pipeline stage: shard urls -> raw samples. A truncated or corrupt shard is an error that
    names it and the last good key; when skipping, the rest of that shard is dropped."""

    def __init__(self, skip: bool):
        self.skip = skip

    def __call__(self, shards):
        for shard in shards:
            try:
                yield from shard_samples(shard)
            except DataError as err:
                yield _fail(self.skip, err)


class _Shuffle:
    """Pipeline stage: a shuffle buffer seeded by seed, epoch, rank and worker, so every
    reader shuffles differently and every pass is reproducible."""

    def __init__(self, size: int, seed: int, epoch: int):
        self.size, self.seed, self.epoch = size, seed, epoch

    def __call__(self, samples):
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{self.epoch}-{rank}-{worker}")
        return wds.shuffle(self.size, initial=self.size, rng=rng)(iter(samples))


class _Decode:
    """Pipeline stage: raw sample -> (key, HWC uint8 array, index, target). Bad samples raise a
    DataError naming the shard and key, or become skip markers."""

    def __init__(self, size: int, index_field: str, label_field: str | None, image_fields: Sequence[str],
                 skip: bool):
        self.size, self.index_field, self.label_field = size, index_field, label_field
        self.image_fields, self.skip = tuple(image_fields), skip

    def __call__(self, samples):
        for sample in samples:
            if isinstance(sample, _Skipped):
                yield sample
                continue
            try:
                yield self._decode(sample)
            except Exception as exc:
                err = exc if isinstance(exc, DataError) else DataError(
                    f"{type(exc).__name__}: {exc}", source=sample.get("__url__"), key=sample.get("__key__"))
                yield _fail(self.skip, err)

    def _decode(self, sample):
        key, url = sample.get("__key__"), sample.get("__url__")

        def missing(what):
            have = sorted(k for k in sample if not k.startswith("__"))
            return DataError(f"missing {what} (sample has: {', '.join(have) or 'nothing'})", source=url, key=key)

        field = next((f for f in self.image_fields if f in sample), None)
        if field is None:
            raise missing(f"image field (one of {', '.join(self.image_fields)})")
        if self.index_field not in sample:
            raise missing(f"index field {self.index_field!r}")
        if self.label_field is not None and self.label_field not in sample:
            raise missing(f"label field {self.label_field!r}")
        index = parse_int_field(sample[self.index_field], self.index_field)
        target = -1 if self.label_field is None else parse_int_field(sample[self.label_field], self.label_field)
        try:
            image = decode_square_image(sample[field], self.size)
        except Exception as exc:
            from PIL import UnidentifiedImageError

            why = "not a known image format" if isinstance(exc, UnidentifiedImageError) else \
                f"{type(exc).__name__}: {exc}"  # Pillow's message would only name a BytesIO
            raise DataError(f"undecodable image in field {field!r} ({why})", source=url, key=key) from None
        return key, image, index, target


class _Batch:
    """Pipeline stage: decoded samples -> (images, index, target, keys, n_skipped) tuples. A
    tuple with no samples carries the skips seen after the last batch."""

    def __init__(self, batch_size: int, drop_last: bool):
        self.batch_size, self.drop_last = batch_size, drop_last

    def __call__(self, items):
        held, skipped = [], 0
        for item in items:
            if isinstance(item, _Skipped):
                skipped += item.n
                continue
            held.append(item)
            if len(held) == self.batch_size:
                yield self._collate(held, skipped)
                held, skipped = [], 0
        if held and not self.drop_last:
            yield self._collate(held, skipped)
        elif skipped:
            yield self._collate([], skipped)

    @staticmethod
    def _collate(items, skipped):
        if not items:
            empty = torch.zeros(0, dtype=torch.int64)
            return torch.zeros(0, 3, 0, 0, dtype=torch.uint8), empty, empty, [], skipped
        # (B, S, S, 3) viewed as (B, 3, S, S): channels-last, no copy
        images = torch.from_numpy(np.stack([im for _, im, _, _ in items])).permute(0, 3, 1, 2)
        index = torch.tensor([i for _, _, i, _ in items], dtype=torch.int64)
        target = torch.tensor([t for _, _, _, t in items], dtype=torch.int64)
        return images, index, target, [k for k, _, _, _ in items], skipped


# ------------------------------------------------------------------------------------ shards
class ImageShardSource:
    """Stream image batches from WebDataset tar shards (ImageNet layout).

    Each sample is decoded to RGB, its shorter side resized to ``load_size`` and the centre
    square kept (JPEGs decoded at reduced scale). Batches hold ``batch_size`` samples, the last
    of each reader possibly fewer.

    Parameters
    ----------
    urls : str, path or list
        Shard paths; a string may use brace patterns, ``"train-{000000..001281}.tar"``.
    batch_size : int
    load_size : int, default=256
    shuffle_buffer : int, default=0
        Size of the sample shuffle buffer; above 0, the shard order is shuffled too. Both are
        seeded by ``seed`` and the epoch (:meth:`set_epoch`). 0 reads in stored order.
    num_workers : int, default=0
        Decode in this many DataLoader worker processes (0: in this process). Each worker
        reads its own shards; their batches arrive interleaved.
    seed : int, default=0
    drop_last : bool, default=False
        Drop each reader's last, short batch.
    index_field : str, default="idx"
    label_field : str or None, default="cls"
        None: no labels, every target is -1.
    on_error : {"raise", "skip"}, default="raise"
        Bad input (an unreadable shard, an undecodable image, a missing or non-integer index or
        label) raises a :class:`~streamcoke.data.DataError` naming the shard and the sample
        key, or is skipped and counted in :attr:`skipped`.
    split_by_node, split_by_worker : bool, default=True
        Give each ``torch.distributed`` rank (or ``RANK``/``WORLD_SIZE``), and each worker, its
        own shards. Ranks get whole shards, so they see equal numbers of batches only when
        the shards divide evenly.
    image_fields : sequence of str
        Extensions that may hold the image; the first one a sample has is used.
    pin_memory : bool, default=False
        Pin the batches' host memory (with workers), for faster copies to a GPU.

    Attributes
    ----------
    skipped : int
        Samples skipped so far (an unreadable shard counts once, whatever it still held).

    Examples
    --------
    >>> import tempfile
    >>> pattern = write_synthetic_image_shards(tempfile.mkdtemp(), 6, 2, size=32, shard_size=4)
    >>> [(tuple(b.images.shape), b.index.tolist(), b.target.tolist())
    ...  for b in ImageShardSource(pattern, batch_size=4, load_size=16)]
    [((4, 3, 16, 16), [0, 1, 2, 3], [0, 0, 0, 1]), ((2, 3, 16, 16), [4, 5], [1, 1])]
    """

    def __init__(self, urls, batch_size: int, *, load_size: int = 256, shuffle_buffer: int = 0,
                 num_workers: int = 0, seed: int = 0, drop_last: bool = False, index_field: str = "idx",
                 label_field: str | None = "cls", on_error: str = "raise", split_by_node: bool = True,
                 split_by_worker: bool = True, image_fields: Sequence[str] = IMAGE_EXTENSIONS,
                 pin_memory: bool = False):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        for name, value, least in (("batch_size", batch_size, 1), ("load_size", load_size, 1),
                                   ("shuffle_buffer", shuffle_buffer, 0), ("num_workers", num_workers, 0)):
            if int(value) != value or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.urls = str(urls) if isinstance(urls, (str, os.PathLike)) else [str(u) for u in urls]
        if not self.urls:
            raise ValueError("no shards given")
        self.batch_size, self.load_size = int(batch_size), int(load_size)
        self.shuffle_buffer, self.num_workers = int(shuffle_buffer), int(num_workers)
        self.seed, self.drop_last = seed, drop_last
        self.index_field, self.label_field = index_field, label_field
        self.on_error = on_error
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        self.image_fields = tuple(image_fields)
        self.pin_memory = pin_memory
        self.epoch = 0
        self.skipped = 0

    def set_epoch(self, epoch: int) -> None:
        """Shuffle the next pass as pass ``epoch`` (the same epoch gives the same order)."""
        self.epoch = int(epoch)

    def pipeline(self) -> wds.DataPipeline:
        """The webdataset pipeline of one pass, yielding (images, index, target, keys, n_skipped)."""
        shuffle = self.shuffle_buffer > 0
        # One seed for every rank: they agree on the shard order, then take disjoint shards.
        stages = [wds.SimpleShardList(self.urls, seed=f"{self.seed}-{self.epoch}" if shuffle else None)]
        if self.split_by_node:
            stages.append(wds.split_by_node)
        if self.split_by_worker:
            stages.append(wds.split_by_worker)
        skip = self.on_error == "skip"
        stages.append(_ReadShards(skip))
        if shuffle:
            stages.append(_Shuffle(self.shuffle_buffer, self.seed, self.epoch))
        stages.append(_Decode(self.load_size, self.index_field, self.label_field, self.image_fields, skip))
        stages.append(_Batch(self.batch_size, self.drop_last))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[ImageBatch]:
        batches = self.pipeline()
        if self.num_workers:
            batches = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=self.num_workers,
                                                  pin_memory=self.pin_memory)
        for images, index, target, keys, skipped in batches:
            self.skipped += int(skipped)
            if keys:
                yield ImageBatch(images, index, target, list(keys))


# ------------------------------------------------------------------------------------ memory
def rank_slice(permutation: Tensor, batch_size: int, rank: int, world_size: int,
               drop_last: bool = False) -> list[Tensor]:
    """This rank's batches of ``permutation``: global batches of ``batch_size * world_size``,
    each cut into ``world_size`` contiguous parts, part ``rank`` for this rank.

    Full global batches give every rank exactly ``batch_size``; a short last one is cut as
    evenly as possible (parts may be empty), so all ranks have the same number of batches and
    together see exactly the batches of one process with the global batch size.

    Examples
    --------
    >>> [b.tolist() for b in rank_slice(torch.arange(10), 2, rank=1, world_size=2)]
    [[2, 3], [6, 7], [9]]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    step = batch_size * world_size
    n = len(permutation)
    stop = n - n % step if drop_last else n
    return [permutation[start:start + step].tensor_split(world_size)[rank] for start in range(0, stop, step)]


class TensorImageSource:
    """Batches of images held in memory (on the host or already on the training device).

    ``index`` is the row number and ``keys`` its string. When ``torch.distributed`` is
    initialised, every rank draws the same permutation and takes its part of each global
    batch of ``batch_size * world_size`` (see :func:`rank_slice`).

    Parameters
    ----------
    images : Tensor
        uint8 (N, C, H, W).
    targets : Tensor or None
        (N,) classes; None for unknown (-1).
    batch_size : int, default=256
        Per rank.
    shuffle : bool, default=True
        A new permutation per epoch (seeded by ``seed`` and :meth:`set_epoch`).
    seed : int, default=0
    drop_last : bool, default=False

    Examples
    --------
    >>> src = TensorImageSource(torch.zeros(5, 1, 8, 8, dtype=torch.uint8), batch_size=2, shuffle=False)
    >>> len(src), [b.index.tolist() for b in src]
    (3, [[0, 1], [2, 3], [4]])
    """

    def __init__(self, images: Tensor, targets: Tensor | None = None, batch_size: int = 256, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype != torch.uint8:
            what = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else \
                type(images).__name__
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got a {what}")
        n = len(images)
        if targets is None:
            targets = torch.full((n,), -1, dtype=torch.int64)
        targets = torch.as_tensor(targets).cpu()
        if targets.shape != (n,) or targets.is_floating_point():
            raise ValueError(f"targets must be {n} integers, got {targets.dtype} of shape {tuple(targets.shape)}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.images, self.targets = images, targets.to(torch.int64)
        self.batch_size, self.shuffle, self.seed, self.drop_last = int(batch_size), shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if is_distributed():
            import torch.distributed as dist

            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        step = self.batch_size * self._rank_world()[1]
        n = len(self.images)
        return n // step if self.drop_last else -(-n // step)

    def permutation(self) -> Tensor:
        """The order of this epoch's rows (the same on every rank)."""
        n = len(self.images)
        if not self.shuffle:
            return torch.arange(n)
        return torch.from_numpy(np.random.default_rng([self.seed, self.epoch]).permutation(n))

    def __iter__(self) -> Iterator[ImageBatch]:
        rank, world = self._rank_world()
        for idx in rank_slice(self.permutation(), self.batch_size, rank, world, self.drop_last):
            yield ImageBatch(self.images[idx.to(self.images.device)], idx, self.targets[idx],
                             [str(i) for i in idx.tolist()])


# -------------------------------------------------------------------------------------- data
def load_digits_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's handwritten digits as uint8 images (1797, 1, 8, 8), 0..16 scaled to
    0..255, and their int64 classes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(np.rint(data.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    return images, torch.from_numpy(data.target.astype(np.int64))


def _synthetic_image(rng: np.random.Generator, c: int, n_classes: int, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 image of class ``c``: a shape (ellipse, box, triangle or bars, by
    class) in a class hue on a random dark background, at a random place and scale, plus noise."""
    import colorsys

    from PIL import Image, ImageDraw

    hue = (c / n_classes + rng.uniform(-0.02, 0.02)) % 1.0
    fg = tuple(int(255 * v) for v in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)))
    bg = tuple(int(v) for v in rng.integers(0, 90, 3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    side = size * rng.uniform(0.35, 0.7)
    x0, y0 = rng.uniform(0, size - side, 2)
    x1, y1 = x0 + side, y0 + side
    shape = c % 4
    if shape == 0:
        draw.ellipse((x0, y0, x1, y1), fill=fg)
    elif shape == 1:
        draw.rectangle((x0, y0, x1, y1), fill=fg)
    elif shape == 2:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fg)
    else:
        bar = side / 5
        for k in range(0, 5, 2):
            draw.rectangle((x0, y0 + k * bar, x1, y0 + (k + 1) * bar), fill=fg)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (size, size, 3)).astype(np.float32)
    return np.clip(arr, 0, 255).astype(np.uint8)


def write_synthetic_image_shards(directory, n_samples: int, n_classes: int, size: int = 64,
                                 shard_size: int = 1000, seed: int = 0, prefix: str = "synthetic") -> str:
    """Write a learnable image data set as JPEG shards (``KEY.jpg``, ``KEY.cls``, ``KEY.idx``).

    Sample i is of class ``i % n_classes`` (see ``_synthetic_image``). The images go through
    an image folder (a temporary directory) and the project's converter
    (:func:`streamcoke.io.shards.write_image_folder_shards`), so the shards are exactly what
    converting a real image folder gives: keys ``class_CCCC/IIIIIII``, sorted by class, ``idx``
    running in that order. Read them with a shuffle buffer to mix classes.

    Returns the shards' brace pattern (the path itself when there is one shard).
    """
    from PIL import Image

    from ..io.shards import write_image_folder_shards

    if n_samples < 1 or n_classes < 1 or size < 8:
        raise ValueError(f"need n_samples >= 1, n_classes >= 1 and size >= 8, got {n_samples}, {n_classes}, {size}")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        for c in range(min(n_classes, n_samples)):
            (root / f"class_{c:04d}").mkdir(parents=True)
        for i in range(n_samples):
            c = i % n_classes
            Image.fromarray(_synthetic_image(rng, c, n_classes, size)).save(
                root / f"class_{c:04d}" / f"{i:07d}.jpg", quality=90)
        return write_image_folder_shards(root, str(Path(directory) / prefix), maxcount=shard_size)
