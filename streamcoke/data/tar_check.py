"""Reading one tar shard, with a check that it is complete; shared by the feature and image
shard sources.

Python's :mod:`tarfile`, reading a stream as webdataset does, stops quietly at the end of the
data: a shard cut exactly at a member's header reads as a complete archive holding fewer
samples. A complete tar file ends with an end-of-archive marker, two blocks of 512 zero bytes
(then padding), so a file that does not end that way has lost its tail.
"""

from __future__ import annotations

import os
import re
import tarfile
from typing import Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys

from .batch import DataError
from .tar_rows import row_runs

END_OF_ARCHIVE = 1024  # two zero blocks of 512 bytes

# Compressed shards need no check: gzip, bzip2 and xz streams carry their own end marker, and
# tarfile raises on a cut one.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


def tar_end_missing(url: str) -> bool:
    """True when ``url`` is a local, uncompressed file that does not end with a tar
    end-of-archive marker: the shard was truncated. ``file:`` URLs count as local; remote
    shards (``http:``, ``pipe:``, ...) and compressed ones are not checked (False).

    A file cut where its last 1024 bytes happen to be zeros (a member whose data ends in that
    many zero bytes) passes; any other cut is caught.

    Examples
    --------
    >>> import io, os, tarfile, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "s.tar")
    >>> with tarfile.open(path, "w") as tar:
    ...     for name in ("a.txt", "b.txt"):
    ...         info = tarfile.TarInfo(name); info.size = 3
    ...         tar.addfile(info, io.BytesIO(b"abc"))
    >>> tar_end_missing(path)
    False
    >>> data = open(path, "rb").read()
    >>> _ = open(path, "wb").write(data[:1024])  # cut at the second member's header
    >>> tar_end_missing(path), len(tarfile.open(path, "r|").getnames())
    (True, 1)
    """
    path = url[5:] if url.startswith("file:") else url
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        if f.read(6).startswith(_COMPRESSED_MAGIC):
            return False
        size = f.seek(0, os.SEEK_END)
        if size < END_OF_ARCHIVE:
            return True
        f.seek(size - END_OF_ARCHIVE)
        return f.read(END_OF_ARCHIVE).count(0) != END_OF_ARCHIVE


# Members webdataset's tar reader leaves out: metadata such as ``__meta__``, and directories.
_SKIPPED_MEMBER = re.compile(r"__[^/]*__($|/)")


def local_tar_path(url: str) -> str | None:
    """The path of ``url`` when it is a local, uncompressed tar file (a bare path or a
    ``file:`` URL), else None."""
    path = url[5:] if url.startswith("file:") else url
    if "://" in path or path.startswith("pipe:") or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return None if f.read(6).startswith(_COMPRESSED_MAGIC) else path


def local_tar_members(path: str, url: str, writable: bool = False) -> Iterator[dict]:
    """The members of a local uncompressed tar file as webdataset's tar reader yields them
    (``fname``, ``data``, ``__url__``), each read with one system call. webdataset reads any
    shard as a stream, in records of 10 KiB that it joins again: for members of hundreds of
    KiB (blocks of rows) that cost more than decoding them. ``writable`` reads into a
    ``bytearray``, which arrays can then use in place (``bytes`` would need a copy)."""
    with open(path, "rb", buffering=0) as f:
        yield from _members(f, url, writable)


def _members(f, url: str, writable: bool) -> Iterator[dict]:
    with tarfile.open(fileobj=f, mode="r:") as tar:
        while (info := tar.next()) is not None:  # next() seeks to the header itself
            tar.members = []  # its index of the members read so far: not needed, keep memory flat
            if not info.isreg() or _SKIPPED_MEMBER.match(info.name):
                continue
            f.seek(info.offset_data)
            if writable:
                data = bytearray(info.size)
                got = f.readinto(data)
            else:
                data = f.read(info.size)
                got = len(data)
            if got != info.size:
                raise tarfile.ReadError(f"unexpected end of data in member {info.name!r}")
            yield {"fname": info.name, "data": data, "__url__": url}
        # tarfile also ends quietly at a damaged header past the first: only an end-of-archive
        # block (zeros) or the end of the file (checked by tar_end_missing) is a proper end.
        f.seek(tar.offset)
        block = f.read(tarfile.BLOCKSIZE)
        if block.count(0) != len(block):
            raise tarfile.ReadError(f"invalid tar header at byte {tar.offset}")


def shard_samples(shard: dict, writable: bool = False, rows_field: str | None = None) -> Iterator[dict]:
    """The samples of one shard (``{"url": ...}``, a webdataset shard-list item). A corrupt or
    truncated shard raises :class:`DataError` naming it and its last good sample key, after
    the samples read before the damage. Local uncompressed shards are read member by member
    with :func:`local_tar_members` (``writable`` passes on), others by webdataset.

    With ``rows_field`` (``"npy"``), a local shard's leading run of one-row samples of that
    field comes first as array samples, ``{"__key__": last key, "__url__": url, "__rows__":``
    :class:`~streamcoke.data.tar_rows.RowRun` ``}``, many rows each
    (:func:`~streamcoke.data.tar_rows.row_runs`); the rest of the shard as above."""
    url, last = shard["url"], None
    try:
        path = local_tar_path(url)
        if path is None:
            samples = wds.tarfile_samples([dict(shard)])
        elif rows_field is None:
            samples = group_by_keys(local_tar_members(path, url, writable))
        else:
            samples = _rows_then_members(path, url, writable, rows_field)
        for sample in samples:
            last = sample["__key__"]
            yield sample
        if tar_end_missing(url):
            raise EOFError("no end-of-archive marker: the file is truncated")
    except Exception as exc:
        msg = f"unreadable shard ({type(exc).__name__}: {exc.args[0] if exc.args else exc})"
        raise DataError(msg + (f" after sample {last!r}" if last else ""), source=url) from None


def _rows_then_members(path: str, url: str, writable: bool, field: str) -> Iterator[dict]:
    with open(path, "rb", buffering=0) as f:
        runs = row_runs(f, field)
        while True:
            try:
                run = next(runs)
            except StopIteration as stop:
                start = stop.value
                break
            yield {"__key__": str(run.keys[-1]), "__url__": url, "__rows__": run}
        f.seek(start)
        yield from group_by_keys(_members(f, url, writable))
