"""Mini-batches from WebDataset tar shards: stored feature vectors, or images and an encoder.

The pipeline is webdataset's, stage by stage: shard list (brace expansion), split by node,
split by worker, tar to samples, shuffle, decode, batch. Only the decoders are our own, so
that no field is ever unpickled: ``.npy`` is read with ``allow_pickle=False``, ``.pth`` with
``torch.load(weights_only=True)``, ``.safetensors`` with safetensors, images with Pillow.

Stored features come in two layouts, which may be mixed:

- one row per sample: ``KEY.npy`` holds one feature vector; the row's id is ``KEY``. Local,
  uncompressed shards whose samples look alike (the same fields and sizes, as a writer makes
  them) are read in chunks of thousands of samples, every header checked at once
  (:mod:`.tar_rows`), unless a shuffle buffer is asked for; from a sample that fits no such
  layout on, the rest of the shard goes member by member.
- blocks: ``KEY.npy`` holds an (n, d) block of rows and ``KEY.ids.npy`` their n ids (as
  written by ``streamcoke shards --rows-per-sample``): fewer bytes of tar headers per row,
  and the fastest layout to read. A shuffle buffer then shuffles blocks, not rows.
"""

from __future__ import annotations

import io
import random
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch import Tensor

from .batch import Batch, DataError, finite_rows, raise_errors, report, to_device
from .npy_header import NpyHeader, npy_header
from .tar_check import shard_samples

IDS_FIELD = "ids.npy"  # the ids of a block of rows, beside its features (KEY.npy)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "pgm", "bmp", "webp", "tif", "tiff")


_NPY_HEADERS: dict[bytes, NpyHeader] = {}


def decode_npy(data: bytes) -> np.ndarray:
    """An ``.npy`` payload, never unpickled. A shard's samples share one header, so it is
    parsed once (numpy parses it with ``ast``, which costs more than reading the values)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not an .npy file")
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    header = bytes(data[:end])  # a dict key: data may be a bytearray
    meta = _NPY_HEADERS.get(header)
    if meta is None:
        meta = npy_header(header)
        if len(_NPY_HEADERS) < 256:
            _NPY_HEADERS[header] = meta
    if len(data) - meta.end < meta.count * meta.dtype.itemsize:
        raise ValueError(f"truncated .npy payload ({len(data) - meta.end} bytes for {meta.count} values)")
    return np.frombuffer(data, meta.dtype, count=meta.count, offset=meta.end).reshape(
        meta.shape, order="F" if meta.fortran else "C")


def decode_pth(data: bytes) -> np.ndarray:
    obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    if not isinstance(obj, Tensor):
        raise ValueError(f"holds a {type(obj).__name__}, expected a tensor")
    return obj.detach().float().numpy()


def decode_safetensors(data: bytes) -> np.ndarray:
    from safetensors.numpy import load

    tensors = load(bytes(data))  # the binding takes bytes, not a bytearray
    if len(tensors) != 1:
        raise ValueError(f"holds {len(tensors)} tensors ({', '.join(tensors)}), expected one")
    return next(iter(tensors.values()))


def decode_image(data: bytes) -> Tensor:
    """RGB image as a float tensor of shape (3, H, W) in [0, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255)


FEATURE_DECODERS = {"npy": decode_npy, "pth": decode_pth, "pt": decode_pth, "safetensors": decode_safetensors}


class _Decode:
    """Pipeline stage: raw sample -> (key, array); bad samples go to the handler, with file and key.

    Remembers the shape of the first good sample, so a wrong-sized one mid-stream is caught
    here, where its key is known, rather than as a shape error when the batch is stacked.
    """

    def __init__(self, fields: Sequence[str], image: bool, transform, n_features, handler):
        self.fields, self.image, self.transform = list(fields), image, transform
        self.shape = None if n_features is None else (int(n_features),)
        self.handler = handler

    def __call__(self, samples):
        for sample in samples:
            key, url = sample.get("__key__"), sample.get("__url__")
            try:
                if "__rows__" in sample:
                    block = self._rows(sample)
                    if block is not None:
                        yield block
                elif not self.image and IDS_FIELD in sample:
                    block = self._block(sample)
                    if block is not None:
                        yield block
                else:
                    yield key, self._decode(sample)
            except Exception as exc:
                err = exc if isinstance(exc, DataError) else DataError(str(exc) or type(exc).__name__,
                                                                       source=url, key=key)
                report(self.handler, err)

    def _block(self, sample) -> "_Block | None":
        """A block sample: (n, d) features and n ids; rows with NaN or infinity are reported
        (by id) and dropped."""
        url, key = sample.get("__url__"), sample.get("__key__")
        field = next((f for f in self.fields if f in sample), None)
        if field is None:
            have = sorted(k for k in sample if not k.startswith("__"))
            raise DataError(f"missing field {' or '.join(self.fields)!r} (sample has: {', '.join(have)})",
                            source=url, key=key)
        X = FEATURE_DECODERS[field.rsplit(".", 1)[-1]](sample[field])
        ids = decode_npy(sample[IDS_FIELD])
        if X.ndim != 2 or ids.ndim != 1 or len(ids) != len(X):
            raise DataError(f"block of shape {X.shape} with {ids.shape} ids, expected (n, d) rows and n ids",
                            source=url, key=key)
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        if self.shape is None:
            self.shape = (X.shape[1],)
        elif (X.shape[1],) != self.shape:
            raise DataError(f"feature vectors have shape ({X.shape[1]},), expected {self.shape}",
                            source=url, key=key)
        ok = finite_rows(X, ids, url, self.handler)
        if ok is not None:
            X, ids = X[ok], ids[ok]
        # Writable rows are a copy or a view of the member's own buffer (local shards are read
        # into a fresh bytearray each member); read-only ones view bytes that torch cannot wrap.
        return _Block(ids, X, owned=bool(X.flags.writeable)) if len(X) else None

    def _rows(self, sample) -> "_Block | None":
        """A run of one-row samples read as an array (:mod:`.tar_rows`): the checks of
        :meth:`_decode`, each bad row reported by its key."""
        url = sample["__url__"]
        keys, X = sample["__rows__"]
        if X.dtype != np.float32:
            X = X.astype(np.float32)
        if self.shape is None and np.isfinite(X).all(axis=1).any():
            self.shape = (X.shape[1],)  # as one sample at a time: the first finite row sets it
        if self.shape is not None and (X.shape[1],) != self.shape:  # every row is bad, each for its first fault
            finite = np.isfinite(X).all(axis=1)
            for key, fine in zip(keys, finite):
                what = f"has shape ({X.shape[1]},), expected {self.shape}" if fine else "contains NaN or infinity"
                report(self.handler, DataError(f"feature vector {what}", source=url, key=str(key)))
            return None
        ok = finite_rows(X, keys, url, self.handler)
        if ok is not None:
            X, keys = X[ok], keys[ok]
        return _Block(keys, X, owned=True) if len(X) else None

    def _decode(self, sample):
        field = next((f for f in self.fields if f in sample), None)
        if field is None:
            have = sorted(k for k in sample if not k.startswith("__"))
            raise DataError(f"missing field {' or '.join(self.fields)!r} (sample has: {', '.join(have)})",
                            source=sample.get("__url__"), key=sample.get("__key__"))
        data = sample[field]
        if self.image:
            x = decode_image(data)
            if self.transform is not None:
                x = self.transform(x)
        else:
            x = FEATURE_DECODERS[field.rsplit(".", 1)[-1]](data)
            x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
            if not np.isfinite(x.sum()) and not np.isfinite(x).all():  # one reduction if clean
                raise DataError("feature vector contains NaN or infinity",
                                source=sample.get("__url__"), key=sample.get("__key__"))
        shape = tuple(x.shape)
        if self.shape is None:
            self.shape = shape
        elif shape != self.shape:
            what = "image" if self.image else "feature vector"
            raise DataError(f"{what} has shape {shape}, expected {self.shape}",
                            source=sample.get("__url__"), key=sample.get("__key__"))
        return x


def _tar_samples(handler: Callable, rows_field: str | None = None):
    """Pipeline stage: shard urls -> samples; a truncated or corrupt shard is reported with its
    name and the last good key, and the rest of that shard is skipped. A local shard cut at a
    member's header, which tarfile reads as complete, is caught by its missing end marker, and
    one with a damaged header by what lies where tarfile stopped.
    ``rows_field``: read runs of one-row samples of this field as arrays (:mod:`.tar_rows`)."""

    def stage(shards):
        for shard in shards:
            try:  # arrays use the read buffers in place
                yield from shard_samples(shard, writable=True, rows_field=rows_field)
            except DataError as err:
                report(handler, err)

    return stage


class _Block(tuple):
    """``(ids, rows)`` of a block sample, told apart from a single ``(key, row)`` sample.
    ``owned``: the rows are writable memory that nothing else uses (a run of one-row samples,
    or a block read into a buffer of its own), so a batch may view them without a copy."""

    def __new__(cls, ids, X, owned: bool = False):
        block = super().__new__(cls, (ids, X))
        block.owned = owned
        return block


def _batched_rows(batch_size: int):
    """Pipeline stage: single rows and blocks of rows -> (ids, float32 tensor) batches of
    exactly ``batch_size`` rows (the last may be shorter), whatever the layout of the shards.
    ids are a numpy array: the keys of rows that came alone, the ids of block rows."""

    def stage(items):
        pieces: list[tuple] = []  # (ids, rows, is_block, owned)
        held = 0

        def emit():
            if len(pieces) == 1 and pieces[0][2]:  # one block piece: a copy where it views the tar bytes
                ids, X = pieces[0][0], pieces[0][1] if pieces[0][3] else np.array(pieces[0][1], dtype=np.float32)
            elif not any(blk for _, _, blk, _ in pieces):
                ids, X = np.asarray([k for k, _, _, _ in pieces]), np.stack([x for _, x, _, _ in pieces])
            else:
                ids = np.concatenate([i if blk else np.asarray([i]) for i, _, blk, _ in pieces])
                X = np.concatenate([x if blk else x[None] for _, x, blk, _ in pieces]).astype(np.float32, copy=False)
            return ids, torch.from_numpy(X)

        for item in items:
            if isinstance(item, _Block):
                ids, X = item
                while len(X):
                    take = min(batch_size - held, len(X))
                    pieces.append((ids[:take], X[:take], True, item.owned))
                    held += take
                    ids, X = ids[take:], X[take:]
                    if held == batch_size:
                        yield emit()
                        pieces, held = [], 0
            else:
                pieces.append((item[0], item[1], False, False))
                held += 1
                if held == batch_size:
                    yield emit()
                    pieces, held = [], 0
        if held:
            yield emit()

    return stage


def _collate(samples):
    keys = [k for k, _ in samples]
    xs = [x for _, x in samples]
    X = torch.stack(xs) if isinstance(xs[0], Tensor) else torch.from_numpy(np.stack(xs))
    return keys, X


class WebDatasetSource:
    """Stream WebDataset shards as ``(keys, features)`` batches on a device.

    Each sample's id is its shard key (``__key__``). Features come from one field of the
    sample (``npy``, ``pth`` or ``safetensors``), or from an image field passed through
    ``encoder`` (a torch module mapping a batch of image tensors to feature rows) on ``device``.

    Parameters
    ----------
    urls : str or list of str
        Shard paths or URLs; a string may use brace patterns, ``"data-{000000..000099}.tar"``.
    field : str or sequence of str, default="npy"
        The field (the file extension after the key) holding the features or the image;
        several names are alternatives, as in ``("jpg", "png")``.
    encoder : callable or None
        Required for image fields: maps an (n, 3, H, W) float tensor in [0, 1] to (n, d).
    transform : callable or None
        Applied to each decoded image tensor (3, H, W) before batching (resize, normalise...).
        Images of one batch must end up the same size.
    batch_size : int, default=1024
    device : str or torch.device, default="cpu"
    shuffle : int, default=0
        Size of the sample shuffle buffer (0: shard order). Seeded by ``seed`` and the epoch.
    seed : int, default=0
    split_by_node, split_by_worker : bool, default=True
        Give each ``torch.distributed`` rank, and each DataLoader worker, its own shards.
    num_workers : int, default=0
        Read and decode in this many DataLoader worker processes (0: in this process).
    n_features : int or None
        Expected feature width; None takes it from the first sample.
    handler : callable, default=raise_errors
        Receives a :class:`DataError` naming the shard and key for an unreadable shard, a
        missing field, a sample that does not decode or has the wrong size.

    Examples
    --------
    >>> import numpy as np, tempfile, os, webdataset as wds
    >>> path = os.path.join(tempfile.mkdtemp(), "feat-000000.tar")
    >>> with wds.TarWriter(path) as w:
    ...     for i in range(3):
    ...         _ = w.write({"__key__": f"s{i}", "npy": np.full(4, i, np.float32)})
    >>> [(b.ids.tolist(), tuple(b.features.shape)) for b in WebDatasetSource(path, batch_size=2)]
    [(['s0', 's1'], (2, 4)), (['s2'], (1, 4))]
    """

    def __init__(self, urls, field="npy", *, encoder: Callable | None = None, transform: Callable | None = None,
                 batch_size: int = 1024, device="cpu", shuffle: int = 0, seed: int = 0,
                 split_by_node: bool = True, split_by_worker: bool = True, num_workers: int = 0,
                 n_features: int | None = None, handler: Callable = raise_errors):
        self.urls = urls if isinstance(urls, str) else [str(u) for u in urls]
        self.fields = [field] if isinstance(field, str) else list(field)
        exts = {f.rsplit(".", 1)[-1].lower() for f in self.fields}
        self.image = bool(exts & set(IMAGE_EXTENSIONS))
        if self.image and encoder is None:
            raise ValueError(f"field {field!r} holds images: pass an encoder that maps them to features")
        if not self.image and not exts <= set(FEATURE_DECODERS):
            raise ValueError(f"field {field!r}: features must be one of {sorted(FEATURE_DECODERS)}, "
                             f"images one of {list(IMAGE_EXTENSIONS)}")
        self.encoder, self.transform = encoder, transform
        self.batch_size, self.device = int(batch_size), device
        self.shuffle, self.seed = int(shuffle), seed
        self.split_by_node, self.split_by_worker = split_by_node, split_by_worker
        self.num_workers = int(num_workers)
        self.n_features = n_features
        self.handler = handler

    def pipeline(self, epoch: int = 0) -> wds.DataPipeline:
        """The webdataset pipeline of one pass, yielding (keys, host tensor) batches."""
        stages = [wds.SimpleShardList(self.urls)]
        if self.split_by_node:
            stages.append(wds.split_by_node)
        if self.split_by_worker:
            stages.append(wds.split_by_worker)
        # Runs of one-row .npy samples are read as arrays, unless samples are to be shuffled
        # one by one (a run would go through the shuffle buffer whole).
        rows_field = "npy" if not self.image and not self.shuffle and "npy" in self.fields else None
        stages.append(_tar_samples(self.handler, rows_field))
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle, initial=self.shuffle, rng=random.Random(f"{self.seed}-{epoch}")))
        n_features = None if self.image else self.n_features
        stages.append(_Decode(self.fields, self.image, self.transform, n_features, self.handler))
        if self.image:
            stages.append(wds.batched(self.batch_size, collation_fn=_collate, partial=True))
        else:
            stages.append(_batched_rows(self.batch_size))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of one pass; ``epoch`` seeds the shuffle buffer."""
        pipe = self.pipeline(epoch)
        if self.num_workers:
            # Each worker reads its own shards (split_by_worker); the loader interleaves their
            # batches in a fixed round-robin order.
            pipe = torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=self.num_workers)
        for keys, X in pipe:
            if self.encoder is not None:
                with torch.no_grad():
                    X = self.encoder(X.to(self.device)).reshape(len(keys), -1).float()
            else:
                X = to_device(X.numpy(), self.device)
            yield Batch(keys, X)
