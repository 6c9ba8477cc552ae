"""Shards of one feature row per sample, read as arrays.

A shard written one sample at a time (``KEY.npy`` holding one feature vector, perhaps beside
small fields such as ``KEY.idx``, as ``webdataset.TarWriter`` and ``streamcoke shards`` write
it) costs tar headers, a Python dict and an ``.npy`` decode per row when read member by member:
about 40 microseconds, many times the clustering step of that row. But such a shard is
regular: every sample has the same members in the same order, each taking the same number of
blocks (a header, the padded payload, and before the header the pax header that carries a
fractional mtime), so the file is a matrix with one sample per row. :func:`row_runs` reads it
in chunks of thousands of samples and checks every header of a chunk at once: checksum, member
type, size, the name (``KEY.EXT``, the key without dots, ASCII, not webdataset metadata), one
key per sample and another for the next sample, and the feature payload's ``.npy`` header (in
one pass of ``tar_scan.cpp`` where :mod:`streamcoke.core.cpu` is built, else in numpy). Rows
come out as a copy of a strided view of the chunk, ids are the keys.

Where a sample does not fit, a layout is learnt from it (keys ``k9`` then ``k10``, a field
that changes size); where none can be (another field, a long name, the end of the archive,
damage), the rest of the shard, from the last sample checked (held back: it could still group
with what follows), goes through the member-by-member reader, which gives what webdataset
gives and names what is wrong.
"""

from __future__ import annotations

import tarfile
from typing import Iterator, NamedTuple

import numpy as np
import torch

from ..core import cpu
from .npy_header import npy_header

BLOCK = 512
CHUNK_BYTES = 4 << 20  # read and checked at once

_DOT, _SLASH, _NEWLINE, _NUL = ord("."), ord("/"), ord("\n"), 0
_REGULAR = (ord("0"), 0)
_POSIX_MAGIC = b"ustar\x0000"
_MTIME_RECORD = b" mtime="
_MAX_MEMBERS = 8  # members per sample looked at when learning the layout


class RowRun(NamedTuple):
    """Consecutive one-row samples of a shard: their keys (str array) and rows (n, d), in the
    payload's dtype."""

    keys: np.ndarray
    rows: np.ndarray


class _Member(NamedTuple):
    at: int  # offset of the member's first block (its pax header, if any) within a sample
    pax: bool  # preceded by a pax header of one mtime record
    ext: bytes
    data_blocks: int  # padded payload length in blocks


class _Layout(NamedTuple):
    stride: int  # bytes per sample
    key: str  # the key of the sample the layout was learnt from
    members: tuple[_Member, ...]
    feature: int  # index of the feature member
    size_field: bytes  # the feature member's size field, the same in every sample
    magic: bytes
    npy_header: bytes  # the feature payload's .npy header, the same in every sample
    dtype: np.dtype
    count: int  # values per row


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def _single_mtime_pax(data: bytes, size: int) -> bool:
    """Whether a pax header's payload is one ``NN mtime=...`` record and nothing else."""
    return 10 <= size <= 99 and len(data) > size and data[:2].isdigit() and int(data[:2]) == size \
        and data[2:9] == _MTIME_RECORD and data[size - 1] == _NEWLINE and data[size] == _NUL


def _split(name: str) -> tuple[str, str] | None:
    """(key, ext) of a member name whose key has no dot, as webdataset splits it; else None."""
    key, dot, ext = name.partition(".")
    if not dot or not key or key.endswith("/") or not ext or "/" in ext or not name.isascii():
        return None
    return key, ext


def _layout(f, start: int, field: str) -> _Layout | None:
    """The layout of the sample at ``start``, learnt from its members; None where it is not a
    one-row sample that :func:`row_runs` can read."""
    try:
        return _learn(f, start, field)
    except (tarfile.TarError, ValueError, IndexError, UnicodeDecodeError):
        return None


def _learn(f, start: int, field: str) -> _Layout | None:
    members: list[_Member] = []
    key = magic = size_field = npy = None
    at = 0
    while len(members) <= _MAX_MEMBERS:
        f.seek(start + at)
        hdr = f.read(BLOCK)
        if len(hdr) < BLOCK or hdr.count(0) == BLOCK:
            return None  # the archive ends within the first sample: nothing to gain
        info = tarfile.TarInfo.frombuf(hdr, "utf-8", "strict")
        pax = info.type == tarfile.XHDTYPE
        if pax:
            if not _single_mtime_pax(f.read(BLOCK), info.size):
                return None
            hdr = f.read(BLOCK)
            info = tarfile.TarInfo.frombuf(hdr, "utf-8", "strict")
        split = _split(info.name)
        if hdr[156] not in _REGULAR or split is None or (magic is not None and hdr[257:265] != magic):
            return None
        if key is not None and split[0] != key:
            break  # the next sample
        key, ext = split
        if any(m.ext == ext.encode() for m in members):
            return None
        magic = bytes(hdr[257:265])
        if magic == _POSIX_MAGIC and hdr[345] != 0:
            return None
        if ext == field:
            payload = f.read(min(info.size, 256))
            npy, dtype, count = _npy_header(payload, info.size)
            if npy is None:
                return None
            size_field = bytes(hdr[124:136])
        members.append(_Member(at, pax, ext.encode(), _blocks(info.size)))
        at += (3 if pax else 1) * BLOCK + _blocks(info.size) * BLOCK
    else:
        return None
    if size_field is None or any(m.ext in (b"ids.npy",) for m in members):
        return None  # no feature member, or a block of rows (read whole already)
    feature = next(i for i, m in enumerate(members) if m.ext == field.encode())
    return _Layout(at, key, tuple(members), feature, size_field, magic, npy, dtype, count)


def _npy_header(payload: bytes, size: int):
    """The feature payload's header, dtype and value count where it is a flat array of
    numbers filling the member exactly; else (None, None, 0)."""
    try:
        h = npy_header(payload)
    except ValueError:
        return None, None, 0
    if h.dtype.kind not in "fiu" or (h.fortran and len(h.shape) > 1) or h.count == 0 \
            or h.end + h.count * h.dtype.itemsize != size:
        return None, None, 0
    return bytes(payload[:h.end]), h.dtype, h.count


def _octal(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of (m, n + 1) bytes written as ``%0no\\0``: whether it reads so, and the value."""
    digits = field[:, :-1].astype(np.int64) - ord("0")
    ok = ((digits >= 0) & (digits <= 7)).all(axis=1) & (field[:, -1] == 0)
    shifts = 3 * np.arange(digits.shape[1] - 1, -1, -1)
    return ok, (digits << shifts).sum(axis=1)


def _checksums_ok(h: np.ndarray) -> np.ndarray:
    """Per row of (m, 512) headers: the checksum field reads ``%06o\\0 `` (as Python's tarfile
    and GNU tar write it) and matches the bytes, the field itself counted as spaces."""
    total = h.sum(axis=1, dtype=np.uint32).astype(np.int64) - h[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    ok, value = _octal(h[:, 148:155])
    return ok & (h[:, 155] == 32) & (value == total)


def _pax_ok(p: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Per row: a pax header whose payload is one ``NN mtime=...`` record."""
    ok, size = _octal(p[:, 124:136])
    ok &= _checksums_ok(p) & (p[:, 156] == ord("x")) & (size >= 10) & (size <= 99)
    size = np.clip(size, 10, 99)
    rows = np.arange(len(p))
    ok &= ((data[:, :2] >= ord("0")) & (data[:, :2] <= ord("9"))).all(axis=1)
    ok &= (data[:, 0].astype(np.int64) - ord("0")) * 10 + data[:, 1] - ord("0") == size
    ok &= (data[:, 2:9] == np.frombuffer(_MTIME_RECORD, np.uint8)).all(axis=1)
    return ok & (data[rows, size - 1] == _NEWLINE) & (data[rows, size] == _NUL)


# Bytes a key may hold: printable ASCII but the dot (webdataset splits the key at the first).
_KEY_BYTE = np.zeros(256, bool)
_KEY_BYTE[33:127] = True
_KEY_BYTE[_DOT] = False


def _name_ok(name: np.ndarray, key_len: int, ext: bytes) -> np.ndarray:
    """Per row of (m, 100) name fields: whether it reads ``KEY.<ext>``, NUL-padded, with a key of
    ``key_len`` bytes of printable ASCII without a dot, not ending in a slash, not webdataset
    metadata (``__meta__`` and the like)."""
    tail = np.zeros(100 - key_len, np.uint8)
    tail[:len(ext) + 1] = np.frombuffer(b"." + ext, np.uint8)
    ok = (name[:, key_len:] == tail).all(axis=1)
    ok &= _KEY_BYTE[name[:, :key_len]].all(axis=1) & (name[:, key_len - 1] != _SLASH)
    return ok & ~((name[:, 0] == ord("_")) & (name[:, 1] == ord("_")))


def _conforming(v: np.ndarray, lay: _Layout, previous: np.ndarray | None) -> np.ndarray:
    """Per sample of a chunk (m, stride): whether it is a one-row sample of the layout, its key
    as long as the layout's and unlike the sample's before (``previous``: its key bytes).

    One pass of :mod:`streamcoke.core.cpu` where it is built (``tar_scan.cpp``), else
    :func:`_conforming_numpy`; the tests check that the two agree."""
    kernels = cpu.kernels()
    if kernels is None:
        return _conforming_numpy(v, lay, previous)
    m = lay.members
    return kernels.tar_rows_ok(
        torch.from_numpy(v), [x.at for x in m], [x.pax for x in m], [x.ext for x in m], [x.data_blocks for x in m],
        lay.feature, len(lay.key), lay.magic, lay.size_field, lay.npy_header,
        b"" if previous is None else previous.tobytes()).numpy()


def _conforming_numpy(v: np.ndarray, lay: _Layout, previous: np.ndarray | None) -> np.ndarray:
    """:func:`_conforming` in numpy: some twenty row-wise passes over the headers."""
    ok = np.ones(len(v), bool)
    key_len = len(lay.key)
    first_name = None
    for i, mem in enumerate(lay.members):
        at = mem.at
        if mem.pax:
            ok &= _pax_ok(v[:, at:at + BLOCK], v[:, at + BLOCK:at + 2 * BLOCK])
            at += 2 * BLOCK
        h = v[:, at:at + BLOCK]
        ok &= _checksums_ok(h) & np.isin(h[:, 156], _REGULAR)
        ok &= (h[:, 257:265] == np.frombuffer(lay.magic, np.uint8)).all(axis=1)
        if lay.magic == _POSIX_MAGIC:
            ok &= h[:, 345] == 0  # no name prefix
        if i == lay.feature:
            ok &= (h[:, 124:136] == np.frombuffer(lay.size_field, np.uint8)).all(axis=1)
            npy = np.frombuffer(lay.npy_header, np.uint8)
            ok &= (v[:, at + BLOCK:at + BLOCK + len(npy)] == npy).all(axis=1)
        else:
            size_ok, size = _octal(h[:, 124:136])
            ok &= size_ok & (-(-size // BLOCK) == mem.data_blocks)
        if first_name is None:
            ok &= _name_ok(h[:, :100], key_len, mem.ext)
            first_name = h[:, :key_len]
        else:  # the sample's members share its key
            ok &= _name_ok(h[:, :100], key_len, mem.ext) & (h[:, :key_len] == first_name).all(axis=1)
    same = np.zeros(len(v), bool)  # the key of the sample before: webdataset would join them
    same[1:] = (first_name[1:] == first_name[:-1]).all(axis=1)
    if previous is not None:
        same[0] = bool((first_name[0] == previous).all())
    return ok & ~same


def _keys(v: np.ndarray, at: int, key_len: int) -> np.ndarray:
    # The keys are ASCII (checked), so each byte widened to 32 bits is its code point: a numpy
    # str array without decoding (bytes.astype(str) costs ten times as much).
    return v[:, at:at + key_len].astype(np.uint32).view(f"U{key_len}").ravel()


def row_runs(f, field: str = "npy") -> Iterator[RowRun]:
    """One-row samples of the open, uncompressed tar file ``f`` from its start, in runs;
    returns (as the generator's value) the offset from which the member-by-member reader must
    go on. ``field`` is the feature field, ``.npy``.

    A layout holds while the samples keep their members, sizes and key length; where one
    changes (keys ``k9`` then ``k10``), the layout is learnt anew from the sample there."""
    lay = _layout(f, 0, field)
    off, previous, buf = 0, None, None
    while lay is not None:
        per_chunk = max(2, CHUNK_BYTES // lay.stride)
        first, feat = lay.members[0], lay.members[lay.feature]
        name_at = first.at + (2 * BLOCK if first.pax else 0)
        rows_at = feat.at + (3 if feat.pax else 1) * BLOCK + len(lay.npy_header)
        key_len = len(lay.key)
        if buf is None or len(buf) < per_chunk * lay.stride:  # reused: the rows handed out are copies
            buf = np.empty(per_chunk * lay.stride, np.uint8)
        f.seek(off)
        m = f.readinto(buf) // lay.stride
        v = np.frombuffer(buf, np.uint8, count=m * lay.stride).reshape(m, lay.stride)
        ok = _conforming(v, lay, previous) if m else np.zeros(0, bool)
        run = m if ok.all() else int(ok.argmin())
        if run == 0:
            return off
        nxt = None
        if run == m == per_chunk:  # the chunk is all good: hold the last sample back for the next
            take = run - 1
        else:  # the layout ends at sample `run`: go on past it only where a new one starts there
            nxt = _layout(f, off + run * lay.stride, field)
            if nxt is not None:
                last = v[run - 1, name_at:name_at + key_len].tobytes().decode()
                nxt = nxt if nxt.key != last else None
            take = run if nxt is not None else run - 1
        if take > 0:
            rows = np.array(np.ndarray((take, lay.count), dtype=lay.dtype, buffer=buf, offset=rows_at,
                                       strides=(lay.stride, lay.dtype.itemsize)))
            yield RowRun(_keys(v[:take], name_at, key_len), rows)
            off += take * lay.stride
        if run == m == per_chunk:
            previous = v[take - 1, name_at:name_at + key_len].copy()
        elif nxt is None:
            return off
        else:  # the new layout's first sample was checked against this one's last key
            lay, previous = nxt, None
    return off
