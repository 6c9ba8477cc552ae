"""Mini-batches from Parquet (or Arrow IPC) datasets of embeddings, read as record batches."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from . import parquet_pages
from .batch import Batch, DataError, finite_rows, item, raise_errors, rebatch, report, to_device

# Bytes read from a Parquet file at a time (a buffered stream, not whole column chunks).
READ_BUFFER = 1 << 20

IPC_SUFFIXES = (".arrow", ".feather", ".ipc")


def guess_format(path) -> str:
    """``"ipc"`` when every file named (or found under a named directory) is Arrow IPC by its
    suffix (``.arrow``, ``.feather``, ``.ipc``), else ``"parquet"``.

    Examples
    --------
    >>> guess_format("emb.arrow"), guess_format(["a.feather", "b.ipc"]), guess_format("emb.parquet")
    ('ipc', 'ipc', 'parquet')
    """
    files = []
    for p in (path if isinstance(path, (list, tuple)) else [path]):
        p = str(p)
        if os.path.isdir(p):
            files += [f for _, _, names in os.walk(p) for f in names if not f.startswith((".", "_"))]
        else:
            files.append(p)
    return "ipc" if files and all(f.lower().endswith(IPC_SUFFIXES) for f in files) else "parquet"


class ParquetSource:
    """Stream an embedding column and an id column of a ``pyarrow.dataset`` in mini-batches.

    The files are read one record batch at a time, never as a whole table, in a fixed order
    (files sorted by path, rows in file order), so every pass yields the same batches. The
    embedding column may be a fixed-size list of floats, a ``fixed_shape_tensor`` of one
    dimension, or a variable list whose rows all have ``n_features`` values.

    Parameters
    ----------
    path : str, path, or list of them
        A Parquet file, a directory of them (searched recursively), or a list of files.
    feature_column : str, default="embedding"
    id_column : str or None, default="id"
        None numbers the rows instead (0, 1, ... across files, in order).
    batch_size : int, default=1024
    device : str or torch.device, default="cpu"
    format : {"parquet", "arrow", "feather", "ipc"} or None, default=None
        None tells by the file names: Arrow IPC when they all end in ``.arrow``, ``.feather``
        or ``.ipc``, Parquet otherwise.
    handler : callable, default=raise_errors
        Receives a :class:`DataError` for a file with a wrong column type or width (its rows
        are counted as skipped), and for a row of the wrong length or with NaN or infinity.
    page_reader : bool, default=True
        Read a Parquet embedding column straight from its pages where its layout allows
        (:mod:`streamcoke.data.parquet_pages`: rows of one length, no nulls; two to three times
        faster than pyarrow's list decoding), pyarrow otherwise. The batches are the same.

    Examples
    --------
    >>> import numpy as np, pyarrow as pa, pyarrow.parquet as pq, tempfile, os
    >>> X = np.eye(3, dtype=np.float32)
    >>> emb = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), 3)
    >>> path = os.path.join(tempfile.mkdtemp(), "emb.parquet")
    >>> pq.write_table(pa.table({"id": ["a", "b", "c"], "embedding": emb}), path)
    >>> [(b.ids.tolist(), tuple(b.features.shape)) for b in ParquetSource(path, batch_size=2)]
    [(['a', 'b'], (2, 3)), (['c'], (1, 3))]
    """

    def __init__(self, path, feature_column: str = "embedding", id_column: str | None = "id",
                 batch_size: int = 1024, device="cpu", *, format: str | None = None,
                 n_features: int | None = None, handler: Callable = raise_errors, page_reader: bool = True):
        paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else str(path)
        if format is None:
            format = guess_format(paths)
        if format not in ("parquet", "arrow", "feather", "ipc"):
            raise ValueError(f"format must be 'parquet', 'arrow', 'feather' or 'ipc', got {format!r}")
        format = "ipc" if format == "arrow" else format
        try:
            self.dataset = ds.dataset(paths, format=format)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"cannot open dataset: {exc}", source=path) from None
        self.fragments = sorted(self.dataset.get_fragments(), key=lambda f: f.path)
        if not self.fragments:
            raise DataError("no data files found", source=path)
        self.feature_column, self.id_column = feature_column, id_column
        self.batch_size = int(batch_size)
        self.device = device
        self.format = "parquet" if format == "parquet" else "ipc"
        self.handler = handler
        self._n_features = n_features
        self.page_reader = page_reader
        self.rows_from_pages = 0  # rows the page reader delivered (the rest came through pyarrow)

    @property
    def n_features(self) -> int:
        """Width of the embeddings (from the first file's schema, or the first row)."""
        if self._n_features is None:
            for frag in self.fragments:
                try:
                    self._n_features = self._width(frag)
                except DataError:
                    continue
                if self._n_features is not None:
                    break
        return self._n_features

    def __len__(self) -> int:
        """Rows per epoch, from the files' metadata."""
        return sum(f.count_rows() for f in self.fragments)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """The batches of one pass (the same every epoch: the order is the files')."""
        for ids, X in rebatch(self._chunks(), self.batch_size):
            yield Batch(ids, to_device(X, self.device))

    # ------------------------------------------------------------------------------ reading
    def _width(self, frag) -> int | None:
        """Embedding width from a file's schema; None for variable lists (checked per row)."""
        schema = frag.physical_schema
        for name in (self.feature_column, self.id_column):
            if name is not None and schema.get_field_index(name) < 0:
                raise DataError(f"missing column {name!r} (columns: {', '.join(schema.names)})",
                                source=frag.path)
        t = schema.field(self.feature_column).type
        if isinstance(t, pa.FixedShapeTensorType):
            if len(t.shape) != 1:
                raise DataError(f"column {self.feature_column!r} holds tensors of shape {t.shape}, "
                                "expected one dimension", source=frag.path)
            t = t.storage_type
        if pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t):
            v = t.value_type
            if pa.types.is_floating(v) or pa.types.is_integer(v):
                return t.list_size if pa.types.is_fixed_size_list(t) else None
        raise DataError(f"column {self.feature_column!r} has type {t}, expected a list of floats "
                        "(fixed_size_list<float>[d], fixed_shape_tensor or list<float>)", source=frag.path)

    def _chunks(self):
        row = 0
        for frag in self.fragments:
            try:
                width = self._width(frag)
                if width is not None and self.n_features is not None and width != self.n_features:
                    raise DataError(f"embeddings have {width} values, expected {self.n_features}",
                                    source=frag.path)
            except DataError as exc:  # the whole file
                report(self.handler, exc, n=_rows(frag))
                row += _rows(frag)
                continue
            columns = [self.feature_column] + ([self.id_column] if self.id_column else [])
            self._file_rows = 0  # rows of this file read so far (the readers count them)
            try:
                yield from (self._parquet_chunks(frag, columns, row) if self.format == "parquet" else
                            self._ipc_chunks(frag, columns, row))
            except (OSError, pa.ArrowException) as exc:  # the rest of the file
                total = max(_rows(frag), self._file_rows)
                report(self.handler, DataError(f"cannot read the file: {' '.join(str(exc).split())}",
                                               source=frag.path), n=total - self._file_rows)
                self._file_rows = total
            row += self._file_rows  # counting an Arrow IPC file's rows reads its record batches again

    def _ids(self, rb: pa.RecordBatch, row: int) -> np.ndarray:
        # A copy: a view would keep the record batch's buffer alive for as long as the ids are
        # held downstream (a label sink holds a row group of them).
        return np.array(rb.column(self.id_column).to_numpy(zero_copy_only=False)) if self.id_column \
            else np.arange(row, row + rb.num_rows)

    def _ipc_chunks(self, frag, columns, row: int):
        """An Arrow IPC file, one record batch at a time."""
        with frag.filesystem.open_input_file(frag.path) as stream:
            reader = pa.ipc.open_file(stream)
            for i in range(reader.num_record_batches):
                rb = reader.get_batch(i).select(columns)
                X, ids = self._matrix(rb.column(self.feature_column), self._ids(rb, row), frag.path)
                row += rb.num_rows
                self._file_rows += rb.num_rows
                if len(X):
                    yield ids, X

    def _parquet_chunks(self, frag, columns, row: int):
        """A Parquet file, row group by row group, with memory bounded by the batch, not the file.

        A row group is read from its pages where :mod:`.parquet_pages` takes the embedding
        column's layout (two to three times faster). Otherwise, and from where that reader declined,
        it is read by ``ParquetFile.iter_batches`` on a buffered stream without pre-buffering:
        the dataset scanner (``Fragment.to_batches``) reads whole row groups ahead, and decoding
        a row group of a list column at once costs several times its size (values plus
        repetition and definition levels), so peak memory grew with the row-group size.
        """
        f = pq.ParquetFile(frag.filesystem.open_input_file(frag.path), buffer_size=READ_BUFFER,
                           pre_buffer=False, page_checksum_verification=True)
        leaf = parquet_pages.embedding_leaf(f, self.feature_column) if self.page_reader else None
        pages = frag.filesystem.open_input_file(frag.path) if leaf is not None else None
        pattern = parquet_pages.RowPattern()
        try:
            for g in range(f.num_row_groups):
                done = 0  # rows of this row group already yielded
                if leaf is not None:
                    ids = _Ids(f, g, self.id_column) if self.id_column else None
                    try:
                        for X in parquet_pages.read_row_group(pages, f, g, leaf, self.n_features, pattern):
                            if self._n_features is None:  # variable lists: the first row sets the width
                                self._n_features = X.shape[1]
                            rows = ids.take(len(X)) if ids is not None else np.arange(row, row + len(X))
                            done, row = done + len(X), row + len(X)
                            self.rows_from_pages += len(X)
                            self._file_rows += len(X)
                            ok = finite_rows(X, rows, frag.path, self.handler)
                            if ok is not None:
                                X, rows = X[ok], rows[ok]
                            if len(X):
                                yield rows, X
                        continue
                    except parquet_pages.Decline:
                        # pyarrow reads the rest of the row group (and names any error). A
                        # row group declined at its first page is declined for its layout
                        # (narrow rows, an encoding or codec not taken) more often than for
                        # its data: the rest of the file goes to pyarrow, not read twice.
                        if done == 0:
                            leaf = None
                for rb in f.iter_batches(batch_size=self.batch_size, row_groups=[g], columns=columns,
                                         use_threads=False):
                    if done >= rb.num_rows:
                        done -= rb.num_rows
                        continue
                    rb, done = rb.slice(done), 0
                    X, ids = self._matrix(rb.column(self.feature_column), self._ids(rb, row), frag.path)
                    row += rb.num_rows
                    self._file_rows += rb.num_rows
                    if len(X):
                        yield ids, X
        finally:
            f.close()
            if pages is not None:
                pages.close()

    def _matrix(self, col: pa.Array, ids: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(n, d) numpy view of an embedding column; drops (and reports) rows that do not fit."""
        if isinstance(col, pa.ExtensionArray):
            col = col.storage
        d = self.n_features
        keep = np.ones(len(col), bool)
        if col.null_count:
            for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)):
                report(self.handler, DataError("embedding is null", source=path, key=item(ids[i])))
            keep &= col.is_valid().to_numpy(zero_copy_only=False)
            if not keep.any():  # every row null: nothing to read, and a variable list no width yet
                return np.empty((0, d or 0), np.float32), ids[:0]
        if pa.types.is_fixed_size_list(col.type):
            values = col.flatten().to_numpy(zero_copy_only=False)  # flatten() leaves out null rows
            if col.null_count:
                X = np.zeros((len(col), d), values.dtype)
                X[keep] = values.reshape(-1, d)
            else:
                X = values.reshape(-1, d)
        else:
            lengths = col.value_lengths().to_numpy(zero_copy_only=False)
            if d is None and keep.any():  # variable lists: the first row sets the width
                d = self._n_features = int(lengths[np.argmax(keep)])
            bad = keep & (lengths != d)
            for i in np.flatnonzero(bad):
                report(self.handler, DataError(f"embedding has {lengths[i]} values, expected {d}",
                                               source=path, key=item(ids[i])))
            keep &= ~bad
            col = col.filter(pa.array(keep))
            ids = ids[keep]
            keep = np.ones(len(col), bool)
            X = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
        if not keep.all():
            X, ids = X[keep], ids[keep]
        ok = finite_rows(X, ids, path, self.handler)
        if ok is not None:
            X, ids = X[ok], ids[ok]
        return X, ids



def _rows(frag) -> int:
    """Rows of a file by its metadata; 0 where even that cannot be read."""
    try:
        return frag.count_rows()
    except (OSError, pa.ArrowException):
        return 0


class _Ids:
    """The id column of one row group, taken a page's worth of rows at a time."""

    def __init__(self, f: pq.ParquetFile, group: int, column: str):
        self._batches = f.iter_batches(batch_size=65536, row_groups=[group], columns=[column], use_threads=False)
        self._held: list[np.ndarray] = []
        self._n = 0

    def take(self, n: int) -> np.ndarray:
        while self._n < n:
            rb = next(self._batches, None)
            if rb is None:
                raise parquet_pages.Decline("fewer ids than embeddings")
            self._held.append(np.array(rb.column(0).to_numpy(zero_copy_only=False)))  # a copy, as in _ids
            self._n += len(self._held[-1])
        held = np.concatenate(self._held) if len(self._held) > 1 else self._held[0]
        out, rest = held[:n], held[n:]
        self._held, self._n = ([rest] if len(rest) else []), len(rest)
        return out
