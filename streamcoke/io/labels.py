"""A label sink: pseudo-labels streamed into a Parquet file that appears only when complete.

Rows are ``(id, label, similarity, epoch)``; with several clusterings, one ``label_h`` and one
``similarity_h`` column per clustering ``h``. Rows are buffered into row groups and written to
part files in a hidden folder beside the target (``.NAME.parts/``); :meth:`checkpoint` seals
the current part so a resumed run can carry on after it, and :meth:`close` joins the parts
into a temporary file in the target's folder and renames it to the target. An interrupted run
leaves only hidden, temporary names: never a file that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


def _host(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


class ParquetLabelSink:
    """Write pseudo-labels row group by row group; publish the file atomically at :meth:`close`.

    Parameters
    ----------
    path : str or path
        The Parquet file to publish.
    n_clusterings : int, default=1
        Label and similarity columns per row: ``label``/``similarity`` for one clustering,
        ``label_0``, ``similarity_0``, ``label_1``, ... for several.
    row_group_size : int, default=65536
        Rows buffered in memory before a row group is written.
    resume_parts : int or None
        Continue an interrupted sink after its first ``resume_parts`` sealed parts (the number
        :meth:`checkpoint` returned), discarding anything written after them. None starts anew.
    metadata : mapping, optional
        Key/value pairs stored in the file's schema metadata (JSON-encoded).

    Examples
    --------
    >>> import numpy as np, pyarrow.parquet as pq, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "labels.parquet")
    >>> with ParquetLabelSink(path) as sink:
    ...     sink.write(["a", "b"], np.array([3, 1]), np.array([0.9, 0.5]), epoch=0)
    ...     os.path.exists(path)
    False
    >>> pq.read_table(path).to_pydict()["label"]
    [3, 1]
    """

    def __init__(self, path, n_clusterings: int = 1, *, row_group_size: int = 65536,
                 resume_parts: int | None = None, metadata: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.n_clusterings = int(n_clusterings)
        self.row_group_size = int(row_group_size)
        self.metadata = {f"streamcoke.{k}": json.dumps(v) for k, v in (metadata or {}).items()}
        self.parts_dir = self.path.parent / f".{self.path.name}.parts"
        self.schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._buffer: list[tuple] = []
        self._buffered = 0
        self.rows_written = 0
        if resume_parts is None:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self.n_parts = 0
        else:
            sealed = [self._part(i) for i in range(int(resume_parts))]
            missing = [p.name for p in sealed if not p.exists()]
            if missing:
                raise FileNotFoundError(f"cannot resume {self.path}: sealed parts are missing ({', '.join(missing)})")
            for p in self.parts_dir.iterdir():  # written after the checkpoint: redone on resume
                if p not in sealed:
                    p.unlink()
            self.n_parts = int(resume_parts)
            if sealed:
                self.schema = pq.read_schema(sealed[0])
        self.parts_dir.mkdir(parents=True, exist_ok=True)

    def _part(self, i: int) -> Path:
        return self.parts_dir / f"part-{i:06d}.parquet"

    @property
    def label_columns(self) -> list[str]:
        return ["label"] if self.n_clusterings == 1 else [f"label_{h}" for h in range(self.n_clusterings)]

    @property
    def similarity_columns(self) -> list[str]:
        return ["similarity"] if self.n_clusterings == 1 else [f"similarity_{h}" for h in range(self.n_clusterings)]

    def write(self, ids, labels, similarity, epoch: int) -> None:
        """Add one batch: ``ids`` (n,), ``labels`` and ``similarity`` (n,) or (n, n_clusterings).

        Tensors may stay on the GPU: they are copied to the host when a row group is written,
        so writing a batch does not wait for the device. Numpy ids are copied: ids that view
        a larger buffer (a column of a record batch read from Parquet or Arrow, say) would
        otherwise keep that whole buffer alive until the row group is written.
        """
        n = len(ids)
        if labels.shape[0] != n or similarity.shape[0] != n:
            raise ValueError(f"{n} ids but {labels.shape[0]} labels and {similarity.shape[0]} similarities")
        if isinstance(ids, np.ndarray):
            ids = ids.copy()
        self._buffer.append((ids, labels, similarity, int(epoch)))
        self._buffered += n
        if self._buffered >= self.row_group_size:
            self._flush()

    def _table(self) -> pa.Table:
        ids = [b[0] for b in self._buffer]
        if isinstance(ids[0], pa.Array):
            id_col = pa.concat_arrays(ids)
        else:
            id_col = _id_array(np.concatenate([np.asarray(i) for i in ids]) if len(ids) > 1 else np.asarray(ids[0]))
        if isinstance(self._buffer[0][1], torch.Tensor):  # one device-to-host copy per row group
            lab = _host(torch.cat([b[1].reshape(b[1].shape[0], -1) for b in self._buffer]))
            sim = _host(torch.cat([b[2].reshape(b[2].shape[0], -1) for b in self._buffer]))
        else:
            lab = np.concatenate([_host(b[1]).reshape(len(b[0]), -1) for b in self._buffer])
            sim = np.concatenate([_host(b[2]).reshape(len(b[0]), -1) for b in self._buffer])
        if lab.shape[1] != self.n_clusterings:
            raise ValueError(f"labels have {lab.shape[1]} columns, the sink was made for {self.n_clusterings}")
        epoch = np.concatenate([np.full(len(b[0]), b[3], np.int32) for b in self._buffer])
        cols = {"id": id_col}
        for h, name in enumerate(self.label_columns):
            cols[name] = pa.array(lab[:, h].astype(np.int32))
        for h, name in enumerate(self.similarity_columns):
            cols[name] = pa.array(sim[:, h].astype(np.float32))
        cols["epoch"] = pa.array(epoch)
        table = pa.table(cols)
        if self.schema is None:
            self.schema = table.schema.with_metadata(self.metadata)
        return table.cast(self.schema)

    def _writer_options(self) -> dict:
        # Dictionary-encode only the small-valued columns: ids and similarities are (nearly)
        # unique, so their dictionaries were built, then thrown away, at a cost in memory of
        # several times the row group. Integer ids mostly count up: stored as deltas they take
        # about a byte a row instead of eight.
        # Page checksums let a reader that verifies them (pyarrow's page_checksum_verification,
        # streamcoke's Parquet source) tell a damaged file from a good one.
        options = {"use_dictionary": self.label_columns + ["epoch"], "write_page_checksum": True}
        if self.schema is not None and pa.types.is_integer(self.schema.field("id").type):
            options["column_encoding"] = {"id": "DELTA_BINARY_PACKED"}
        return options

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = self._table()
        self._buffer, self._buffered = [], 0
        if self._writer is None:
            tmp = self._part(self.n_parts).with_suffix(".parquet.tmp")
            self._writer = pq.ParquetWriter(tmp, self.schema, **self._writer_options())
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self.rows_written += table.num_rows
        del table
        pa.default_memory_pool().release_unused()  # the writer's scratch; else mimalloc keeps it

    def checkpoint(self) -> int:
        """Write out buffered rows and seal the current part; returns the number of sealed parts
        (keep it with the run's checkpoint and pass it back as ``resume_parts``)."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            tmp = self._part(self.n_parts).with_suffix(".parquet.tmp")
            os.replace(tmp, self._part(self.n_parts))
            self.n_parts += 1
        return self.n_parts

    def close(self) -> Path:
        """Seal the last part and publish the file; returns its path."""
        self.checkpoint()
        parts = [self._part(i) for i in range(self.n_parts)]
        if self.schema is None:  # no rows at all: still publish an (empty) file with the columns
            self.schema = pa.schema([("id", pa.int64())] + [(c, pa.int32()) for c in self.label_columns]
                                    + [(c, pa.float32()) for c in self.similarity_columns]
                                    + [("epoch", pa.int32())], metadata=self.metadata)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            if len(parts) == 1:
                os.replace(parts[0], tmp)
            else:
                with pq.ParquetWriter(tmp, self.schema, **self._writer_options()) as out:
                    for part in parts:  # one row group in memory at a time
                        with pq.ParquetFile(part) as f:
                            for g in range(f.num_row_groups):
                                out.write_table(f.read_row_group(g), row_group_size=self.row_group_size)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return self.path

    def abort(self, keep_parts: bool = False) -> None:
        """Stop without publishing. ``keep_parts`` keeps the sealed parts for a resumed run."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._buffer, self._buffered = [], 0
        if keep_parts:
            self._part(self.n_parts).with_suffix(".parquet.tmp").unlink(missing_ok=True)
        else:
            shutil.rmtree(self.parts_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort(keep_parts=False)


def _id_array(ids: np.ndarray) -> pa.Array:
    """The ids as an Arrow array. Numpy str ids of one length in ASCII (shard keys, as a rule)
    are laid out as Arrow strings directly, their code points being their bytes: pyarrow's
    conversion encodes them one by one, which costs more."""
    if ids.dtype.kind == "U" and ids.ndim == 1 and len(ids) and ids.dtype.itemsize:
        width = ids.dtype.itemsize // 4
        points = np.ascontiguousarray(ids).view(np.uint32).reshape(len(ids), width)
        if (len(ids) + 1) * width < 2**31 and bool(((points > 0) & (points < 128)).all()):
            offsets = np.arange(0, (len(ids) + 1) * width, width, dtype=np.int32)
            return pa.Array.from_buffers(pa.string(), len(ids),
                                         [None, pa.py_buffer(offsets), pa.py_buffer(points.astype(np.uint8))])
    return pa.array(ids)
