"""Mini-batches from numpy arrays and ``.npy`` memory maps; the id of a row is its position."""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import numpy as np

from .batch import Batch, DataError, finite_rows, raise_errors, to_device


class ArraySource:
    """Stream the rows of one or more 2-D arrays (or ``.npy`` files, memory-mapped) as batches.

    Rows are numbered across the arrays in order; that number is the row's id. Only the rows
    of the current batch are read from a memory map, so files larger than memory stream.

    Parameters
    ----------
    arrays : array, path, or sequence of them
        Arrays of shape (n_i, n_features); paths are opened with ``np.load(mmap_mode="r")``.
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
        self.arrays: list[np.ndarray] = []
        for i, a in enumerate(arrays):
            name = str(a) if isinstance(a, (str, os.PathLike)) else f"array {i}"
            if isinstance(a, (str, os.PathLike)):
                try:
                    a = np.load(a, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as exc:
                    raise DataError(f"cannot read array file: {exc}", source=name) from None
            a = np.asarray(a) if not isinstance(a, np.ndarray) else a
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
            # A contiguous slice of a memory map reads sequentially; fancy indexing would not.
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
