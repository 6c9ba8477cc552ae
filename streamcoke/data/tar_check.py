"""Reading one tar shard, with a check that it is complete; shared by the feature and image
shard sources.

Python's :mod:`tarfile`, reading a stream as webdataset does, stops quietly at the end of the
data: a shard cut exactly at a member's header reads as a complete archive holding fewer
samples. A complete tar file ends with an end-of-archive marker, two blocks of 512 zero bytes
(then padding), so a file that does not end that way has lost its tail.
"""

from __future__ import annotations

import os
from typing import Iterator

import webdataset as wds

from .batch import DataError

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


def shard_samples(shard: dict) -> Iterator[dict]:
    """The samples of one shard (``{"url": ...}``, a webdataset shard-list item). A corrupt or
    truncated shard raises :class:`DataError` naming it and its last good sample key, after
    the samples read before the damage."""
    url, last = shard["url"], None
    try:
        for sample in wds.tarfile_samples([dict(shard)]):
            last = sample["__key__"]
            yield sample
        if tar_end_missing(url):
            raise EOFError("no end-of-archive marker: the file is truncated")
    except Exception as exc:
        msg = f"unreadable shard ({type(exc).__name__}: {exc.args[0] if exc.args else exc})"
        raise DataError(msg + (f" after sample {last!r}" if last else ""), source=url) from None
