"""Mini-batches from numpy arrays and ``.npy`` files; the id of a row is its position."""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import numpy as np

from .batch import Batch, DataError, finite_rows, raise_errors, to_device


class FortranOrder(ValueError):
    """An ``.npy`` file in column order: its rows cannot be read one block at a time."""


def open_npy(path) -> "NpyFile | np.memmap":
    """Rows of an ``.npy`` file: a :class:`NpyFile`, or a memory map for a Fortran-order file."""
    try:
        return NpyFile(path)
    except FortranOrder:
        return np.load(path, mmap_mode="r", allow_pickle=False)


class NpyFile:
    """Rows of a 2-D ``.npy`` file, read with ``os.pread`` as they are asked for.

    A memory map would do the same with less code, but the pages of a map that have been read
    count in the process's resident set size until the kernel needs them back, so a pass over
    a large file looked like a process using as much memory as the file. Reading into fresh
    buffers keeps the resident size at one batch. Supports ``len``, ``shape``, ``dtype``,
    ``ndim``, a slice of rows (step 1), an integer array of row numbers, and iteration by rows.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> np.save(path, np.arange(12, dtype=np.float32).reshape(4, 3))
    >>> f = NpyFile(path)
    >>> f.shape, f[1:3].tolist(), f[np.array([3, 0])].tolist()
    ((4, 3), [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]], [[9.0, 10.0, 11.0], [0.0, 1.0, 2.0]])
    """

    def __init__(self, path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if dtype.hasobject:
            raise ValueError("the array holds Python objects; refusing to unpickle")
        if len(shape) != 2:
            raise ValueError(f"expected an array of shape (n, n_features), got shape {shape}")
        if fortran and shape[0] > 1 and shape[1] > 1:
            raise FortranOrder("the array is stored in Fortran (column) order; rows are not contiguous")
        self.shape, self.dtype, self.ndim = tuple(int(v) for v in shape), dtype, 2
        self.row_bytes = self.shape[1] * dtype.itemsize
        size = os.path.getsize(self.path)
        if size < self.offset + self.shape[0] * self.row_bytes:
            raise ValueError(f"truncated file ({size} bytes for {self.shape[0]} rows of {self.row_bytes})")
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_fd"} | {"_fd": None}

    def __del__(self):
        self.close()

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def _read(self, start: int, stop: int, out: np.ndarray) -> None:
        """Rows ``start:stop`` into ``out`` (a C-contiguous array of that many rows)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(out).cast("B")
        pos, done = self.offset + start * self.row_bytes, 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], pos + done)
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file")
            done += n

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = np.empty((max(stop - start, 0), self.shape[1]), self.dtype)
            if len(out):
                self._read(start, stop, out)
            return out
        rows = np.asarray(index)
        if rows.ndim == 0:
            i = int(rows) + (len(self) if int(rows) < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {int(rows)} out of range for {len(self)} rows")
            return self[i:i + 1][0]
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = np.where(rows < 0, rows + len(self), rows).astype(np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        if not len(rows):
            return out
        # Sorted, then read in runs of consecutive rows: one read per run.
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        breaks = np.flatnonzero(np.diff(srt) != 1) + 1
        tmp = np.empty_like(out)
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(srt)]):
            self._read(int(srt[a]), int(srt[b - 1]) + 1, tmp[a:b])
        out[order] = tmp
        return out

    def __iter__(self):
        for start in range(0, len(self), 4096):
            yield from self[start:start + 4096]


class ArraySource:
    """Stream the rows of one or more 2-D arrays (or ``.npy`` files) as batches.

    Rows are numbered across the arrays in order; that number is the row's id. Only the rows
    of the current batch are read from a file (with file reads, see :class:`NpyFile`), so files
    larger than memory stream and the resident memory stays at a few batches.

    Parameters
    ----------
    arrays : array, path, or sequence of them
        Arrays of shape (n_i, n_features); paths are read as :class:`NpyFile`.
    batch_size : int, default=1024
    device : str or torch.device, default="cpu"
        Where the feature tensors are put.
    shuffle : bool, default=False
        Visit the rows in a new random order each epoch (seeded by ``seed`` and the epoch).
        Costs one permutation of the row numbers (8 bytes a row) and random reads.
    seed : int, default=0
    handler : callable, default=raise_errors
        Receives a :class:`DataError` for each row with NaN or infinity; returning skips it.

    Examples
    --------
    >>> import numpy as np
    >>> src = ArraySource(np.arange(10, dtype=np.float32).reshape(5, 2), batch_size=2)
    >>> [(b.ids.tolist(), tuple(b.features.shape)) for b in src]
    [([0, 1], (2, 2)), ([2, 3], (2, 2)), ([4], (1, 2))]
    """

    def __init__(self, arrays, batch_size: int = 1024, device="cpu", *, shuffle: bool = False,
                 seed: int = 0, handler: Callable = raise_errors):
        if isinstance(arrays, (np.ndarray, str, os.PathLike)):
            arrays = [arrays]
        self.names: list[str] = []
        self.arrays: list[np.ndarray | NpyFile] = []
        for i, a in enumerate(arrays):
            name = str(a) if isinstance(a, (str, os.PathLike)) else f"array {i}"
            if isinstance(a, (str, os.PathLike)):
                try:
                    a = open_npy(a)
                except (OSError, ValueError) as exc:
                    raise DataError(f"cannot read array file: {exc}", source=name) from None
            a = np.asarray(a) if not isinstance(a, (np.ndarray, NpyFile)) else a
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
                raise DataError(f"expected a real array of shape (n, n_features), got {a.dtype} {a.shape}",
                                source=name)
            if self.arrays and a.shape[1] != self.arrays[0].shape[1]:
                raise DataError(f"{a.shape[1]} features, but {self.names[0]} has {self.arrays[0].shape[1]}",
                                source=name)
            self.names.append(name)
            self.arrays.append(a)
        if not self.arrays:
            raise ValueError("ArraySource needs at least one array")
        self.batch_size = int(batch_size)
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.handler = handler
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    @property
    def n_features(self) -> int:
        return int(self.arrays[0].shape[1])

    def __len__(self) -> int:
        """Number of rows per epoch."""
        return int(self.offsets[-1])

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of one pass; ``epoch`` seeds the order when shuffling."""
        n, b = len(self), self.batch_size
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else None
        for start in range(0, n, b):
            rows = np.arange(start, min(start + b, n)) if order is None else order[start:start + b]
            X = self._gather(rows)
            keep = finite_rows(X, rows, self._name_of(rows), self.handler)
            if keep is not None:
                rows, X = rows[keep], X[keep]
                if not len(rows):
                    continue
            yield Batch(rows, to_device(X, self.device))

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        if len(self.arrays) == 1:
            a = self.arrays[0]
            # A contiguous slice is one sequential read.
            return a[rows[0]:rows[-1] + 1] if self.order_is_contiguous(rows) else a[rows]
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((len(rows), self.n_features), dtype=np.result_type(*[a.dtype for a in self.arrays]))
        for j in np.unique(which):
            m = which == j
            out[m] = self.arrays[j][rows[m] - self.offsets[j]]
        return out

    @staticmethod
    def order_is_contiguous(rows: np.ndarray) -> bool:
        return len(rows) > 0 and rows[-1] - rows[0] == len(rows) - 1 and bool((np.diff(rows) == 1).all())

    def _name_of(self, rows: Sequence[int]) -> str:
        if len(self.arrays) == 1:
            return self.names[0]
        return self.names[int(np.searchsorted(self.offsets, rows[0], side="right") - 1)]
