"""Writing WebDataset shards: from an image folder (ImageNet's train layout) or from arrays.

Shards are named ``PREFIX-000000.tar``, ``PREFIX-000001.tar``, ... (read them back with the
brace pattern :func:`write_image_folder_shards` returns). Each shard is written under a
temporary name and renamed when it is complete, so an interrupted conversion leaves no
truncated file with a shard's name. Order and content are deterministic (sorted names, fixed
tar timestamps), so the same input gives byte-identical shards.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


class _AtomicShardWriter(wds.ShardWriter):
    """ShardWriter whose shards appear under their names only once closed."""

    def __init__(self, pattern: str, maxcount: int):
        self.written: list[str] = []
        super().__init__(pattern, maxcount=maxcount, verbose=0, opener=self._open, post=self._publish,
                         mtime=0)  # an int: a float mtime costs a PAX header per file

    def _open(self, fname: str):
        Path(fname).parent.mkdir(parents=True, exist_ok=True)
        self._file = open(f"{fname}.tmp", "wb")
        return self._file

    def _publish(self, fname: str) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(f"{fname}.tmp", fname)
        self.written.append(fname)

    def discard(self) -> None:
        """Drop the shard being written (after an error)."""
        if getattr(self, "tarstream", None) is not None:
            self._file.close()
            Path(f"{self.fname}.tmp").unlink(missing_ok=True)
            self.tarstream = None


def _write(samples: Iterable[dict], prefix: str, maxcount: int) -> str:
    pattern = f"{prefix}-%06d.tar"
    writer = _AtomicShardWriter(pattern, maxcount)
    try:
        for sample in samples:
            writer.write(sample)
        writer.close()
    except BaseException:
        writer.discard()
        raise
    n = len(writer.written)
    return f"{prefix}-{{000000..{n - 1:06d}}}.tar" if n > 1 else writer.written[0]


def image_folder_samples(root: str | os.PathLike, shuffle_seed: int | None = None) -> Iterator[dict]:
    """Samples of an image folder of class sub-folders: ``KEY.jpg`` (the file's bytes, not
    re-encoded), ``KEY.cls`` (class index, sorted folder names) and ``KEY.idx`` (running index
    in sorted order). KEY is ``class/stem``, with dots in the stem replaced by underscores
    (webdataset splits keys from extensions at the first dot).

    ``shuffle_seed`` writes the samples in a seeded random order (their ``idx`` stays the
    sorted one), so that every shard holds a mix of classes: a reader's shuffle buffer then
    needs to hold far fewer samples to give well-mixed batches."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders (expected ROOT/CLASS/IMAGE.jpg)")
    entries = [(c, name, f) for c, name in enumerate(classes)
               for f in sorted(p for p in (root / name).iterdir() if p.suffix in IMAGE_SUFFIXES and p.is_file())]
    order = range(len(entries)) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(len(entries))
    for idx in order:
        c, name, f = entries[idx]
        ext = "jpg" if f.suffix.lower() in (".jpg", ".jpeg") else f.suffix.lower()[1:]
        yield {"__key__": f"{name}/{f.stem.replace('.', '_')}", ext: f.read_bytes(),
               "cls": str(c).encode(), "idx": str(int(idx)).encode()}


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def array_samples(arrays: Sequence, rows_per_sample: int = 1) -> Iterator[dict]:
    """Samples of the rows of 2-D arrays (or ``.npy`` paths, read a block at a time).

    ``rows_per_sample=1``: ``KEY.npy`` (the row, float32) and ``KEY.idx`` (the row number
    across the arrays); KEY is the zero-padded row number. ``rows_per_sample=n > 1``: blocks,
    ``KEY.npy`` an (n, d) float32 block of consecutive rows (the last may be shorter) and
    ``KEY.ids.npy`` their row numbers (int64); KEY is the zero-padded number of the first row.
    """
    from ..data.array_source import open_npy

    rows_per_sample = int(rows_per_sample)
    if rows_per_sample < 1:
        raise ValueError(f"rows_per_sample must be at least 1, got {rows_per_sample}")
    idx = 0
    for a in arrays:
        if isinstance(a, (str, os.PathLike)):
            a = open_npy(a)
        if a.ndim != 2:
            raise ValueError(f"expected arrays of shape (n, n_features), got {a.shape}")
        step = rows_per_sample if rows_per_sample > 1 else 4096
        for start in range(0, len(a), step):
            block = np.asarray(a[start:start + step], dtype=np.float32)
            if rows_per_sample > 1:
                yield {"__key__": f"{idx:09d}", "npy": _npy_bytes(np.ascontiguousarray(block)),
                       "ids.npy": _npy_bytes(np.arange(idx, idx + len(block), dtype=np.int64))}
                idx += len(block)
                continue
            for row in block:
                yield {"__key__": f"{idx:09d}", "npy": _npy_bytes(row), "idx": str(idx).encode()}
                idx += 1


def write_image_folder_shards(root, prefix: str, maxcount: int = 10000, shuffle_seed: int | None = None) -> str:
    """Convert an image folder to shards of ``maxcount`` samples; returns their brace pattern.
    ``shuffle_seed`` mixes the classes across shards (see :func:`image_folder_samples`).

    Examples
    --------
    >>> import tempfile, os
    >>> from PIL import Image
    >>> d = tempfile.mkdtemp()
    >>> for c in ("cat", "dog"):
    ...     os.makedirs(f"{d}/img/{c}")
    ...     for i in range(3):
    ...         Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(f"{d}/img/{c}/{c}{i}.jpg")
    >>> write_image_folder_shards(f"{d}/img", f"{d}/shards/train", maxcount=4).endswith("train-{000000..000001}.tar")
    True
    """
    return _write(image_folder_samples(root, shuffle_seed), str(prefix), maxcount)


def write_array_shards(arrays, prefix: str, maxcount: int = 100000, rows_per_sample: int = 1) -> str:
    """Convert arrays (or ``.npy`` files) to shards of feature rows; returns their pattern.

    ``maxcount`` is the number of rows per shard (rounded up to whole samples);
    ``rows_per_sample > 1`` writes blocks of rows (see :func:`array_samples`), which read
    much faster than one row per sample.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from streamcoke.data import WebDatasetSource
    >>> d = tempfile.mkdtemp()
    >>> X = np.arange(20, dtype=np.float32).reshape(10, 2)
    >>> pattern = write_array_shards(X, f"{d}/b", maxcount=8, rows_per_sample=4)
    >>> pattern.endswith("b-{000000..000001}.tar")
    True
    >>> [b.ids.tolist() for b in WebDatasetSource(pattern, batch_size=3)]
    [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    """
    if isinstance(arrays, (np.ndarray, str, os.PathLike)):
        arrays = [arrays]
    per_shard = max(1, -(-int(maxcount) // int(rows_per_sample)))
    return _write(array_samples(arrays, rows_per_sample), str(prefix), per_shard)
