"""Sources: streams of ``(ids, features)`` mini-batches, features already on the device.

A source knows nothing of the clusterer beyond the device it puts tensors on. Every source
has ``epoch(e)`` (the batches of pass ``e``, the same for the same ``e``: shuffling is seeded
by the epoch) and iterates as ``epoch(0)``. Bad input goes through one ``handler`` argument.

- :class:`ArraySource`: numpy arrays and ``.npy`` memory maps; the id is the row number.
- :class:`ParquetSource`: Parquet / Arrow datasets with an embedding and an id column.
- :class:`WebDatasetSource`: WebDataset tar shards of features, or of images and an encoder.

:func:`open_source` picks one from file names.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from .array_source import ArraySource
from .batch import Batch, DataError, SkipErrors, prefetch, prefetch_pays, raise_errors
from .parquet_source import IPC_SUFFIXES, ParquetSource
from .webdataset_source import WebDatasetSource

__all__ = ["Batch", "DataError", "SkipErrors", "raise_errors", "prefetch", "prefetch_pays", "ArraySource",
           "ParquetSource", "WebDatasetSource", "input_kind", "open_source"]

_BRACES = re.compile(r"\{[^{}]*\.\.[^{}]*\}")


def input_kind(path: str | os.PathLike) -> str:
    """``"webdataset"``, ``"parquet"`` or ``"array"``, from the name of an input.

    Examples
    --------
    >>> [input_kind(p) for p in ["in-{000..009}.tar", "emb/", "emb.parquet", "x.npy"]]
    ['webdataset', 'parquet', 'parquet', 'array']
    """
    p = str(path)
    if p.endswith((".tar", ".tar.gz", ".tgz")) or _BRACES.search(p):
        return "webdataset"
    if p.lower().endswith((".parquet", ".pq", "/") + IPC_SUFFIXES) or os.path.isdir(p):
        return "parquet"
    if p.endswith(".npy"):
        return "array"
    raise ValueError(f"cannot tell the kind of input {p!r}: expected .tar or a brace pattern "
                     "(WebDataset), .parquet or a directory (Parquet), .arrow, .feather or .ipc "
                     "(Arrow IPC), or .npy (array)")


def open_source(inputs: Sequence[str | os.PathLike], *, batch_size: int = 1024, device="cpu", **options):
    """One source for ``inputs``, which must all be of one kind (see :func:`input_kind`).

    ``options`` go to the source's constructor; those a source does not take are ignored, so
    one set of command-line options serves every kind.
    """
    kinds = {input_kind(p) for p in inputs}
    if len(kinds) != 1:
        raise ValueError(f"inputs mix kinds ({', '.join(sorted(kinds))}); stream one kind at a time")
    kind = kinds.pop()
    cls = {"webdataset": WebDatasetSource, "parquet": ParquetSource, "array": ArraySource}[kind]
    import inspect

    accepted = inspect.signature(cls).parameters
    kw = {k: v for k, v in options.items() if k in accepted}
    paths = [str(p) for p in inputs]
    if kind == "webdataset":
        return cls(paths[0] if len(paths) == 1 else paths, batch_size=batch_size, device=device, **kw)
    if kind == "parquet":
        return cls(paths[0] if len(paths) == 1 else paths, batch_size=batch_size, device=device, **kw)
    return cls(paths, batch_size=batch_size, device=device, **kw)
