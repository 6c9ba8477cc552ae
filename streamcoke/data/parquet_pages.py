"""An embedding column read straight from its Parquet pages, where its layout allows.

pyarrow builds a list column from its repetition and definition levels one value at a time:
about half a microsecond a row of 128 floats on one core (apache/arrow#34510), two to three
times what this reader takes for the same rows (``benchmarks/bench_streaming.py``, ``read
alone``). An embedding column is the easy case of that format: every row holds the same
number of values and none is null. Here that is checked from the levels themselves, cheaply,
because the level bytes of such a column are one row's bytes over and over; the values are
then taken as they lie in the page.

:func:`read_row_group` reads one row group of one column this way, page by page. Whatever it
does not take for certain (a null, a row of another length, an encoding, codec or page kind not
listed below, a page that does not parse, a page whose CRC-32 does not match the one its header
holds) makes it raise :class:`Decline` before it yields that
page, and the caller reads the rest of the row group with pyarrow, which also reports any error.
So a file reads the same either way; only the time differs.

Taken: data pages v1 and v2; values PLAIN, dictionary-encoded (``RLE_DICTIONARY`` or
``PLAIN_DICTIONARY``) or ``BYTE_STREAM_SPLIT``, of FLOAT or DOUBLE; codecs uncompressed,
Snappy, gzip, Brotli, Zstandard and LZ4_RAW. Layout: one leaf under the column, with
repetition level 1 (a list).
"""

from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Codecs as pyarrow's metadata names them (Arrow's names: "LZ4" is Parquet's LZ4_RAW, a bare
# LZ4 block; Parquet's older Hadoop-framed LZ4 is "LZ4_HADOOP", not taken) to pyarrow's codecs.
CODECS = {"SNAPPY": "snappy", "GZIP": "gzip", "BROTLI": "brotli", "ZSTD": "zstd", "LZ4": "lz4_raw",
          "LZ4_RAW": "lz4_raw"}
VALUE_TYPES = {"FLOAT": np.dtype("<f4"), "DOUBLE": np.dtype("<f8")}
# Encoding numbers of parquet.thrift.
PLAIN, PLAIN_DICTIONARY, RLE, RLE_DICTIONARY, BYTE_STREAM_SPLIT = 0, 2, 3, 8, 9
DATA_PAGE, INDEX_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 1, 2, 3
HEADER_WINDOW = 1024  # bytes read for a page header; more only when a header is longer


class Decline(Exception):
    """The page (or column) is not one this reader takes for certain; read it with pyarrow."""


# ------------------------------------------------------------------------------------ thrift
class _Compact:
    """Reader of Thrift's compact protocol, for the few structs of a page header."""

    def __init__(self, buf: bytes, pos: int = 0):
        self.buf, self.pos = buf, pos

    def _byte(self) -> int:
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self._byte()
            out |= (b & 0x7F) << shift
            if b < 0x80:
                return out
            shift += 7

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def skip(self, kind: int) -> None:
        if kind in (1, 2):  # booleans live in the field header
            return
        if kind == 3:
            self.pos += 1
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 7:
            self.pos += 8
        elif kind == 8:
            n = self.varint()  # read before the position it moves is taken
            self.pos += n
        elif kind in (9, 10):
            h = self._byte()
            n, elem = h >> 4, h & 0x0F
            if n == 15:
                n = self.varint()
            for _ in range(n):
                self.skip(3 if elem in (1, 2) else elem)  # booleans in a list take a byte each
        elif kind == 11:
            n = self.varint()
            if n:
                kv = self._byte()
                for _ in range(n):
                    self.skip(kv >> 4)
                    self.skip(kv & 0x0F)
        elif kind == 12:
            self.struct({})
        else:
            raise Decline(f"unknown Thrift type {kind}")

    def struct(self, fields: dict) -> dict:
        """Read a struct; ``fields`` maps a field id to (name, reader) for the fields wanted."""
        out: dict = {}
        fid = 0
        while True:
            h = self._byte()
            if h == 0:
                return out
            kind, delta = h & 0x0F, h >> 4
            fid = fid + delta if delta else self.zigzag()
            if fid in fields:
                name, read = fields[fid]
                out[name] = read(self, kind)
            else:
                self.skip(kind)


def _i32(r: _Compact, kind: int) -> int:
    if kind != 5:
        raise Decline("page header field of an unexpected type")
    return r.zigzag()


def _bool(r: _Compact, kind: int) -> bool:
    return kind == 1


_DATA_V1 = {1: ("num_values", _i32), 2: ("encoding", _i32)}
_DICT = {1: ("num_values", _i32), 2: ("encoding", _i32)}
_DATA_V2 = {1: ("num_values", _i32), 2: ("num_nulls", _i32), 3: ("num_rows", _i32), 4: ("encoding", _i32),
            5: ("def_bytes", _i32), 6: ("rep_bytes", _i32), 7: ("is_compressed", _bool)}
_PAGE = {1: ("type", _i32), 2: ("uncompressed_size", _i32), 3: ("compressed_size", _i32), 4: ("crc", _i32),
         5: ("v1", lambda r, k: r.struct(_DATA_V1)), 7: ("dict", lambda r, k: r.struct(_DICT)),
         8: ("v2", lambda r, k: r.struct(_DATA_V2))}


def page_header(buf: bytes) -> tuple[dict, int]:
    """The fields of a ``PageHeader`` at the start of ``buf`` that are used here, and its length."""
    r = _Compact(buf)
    return r.struct(_PAGE), r.pos


# -------------------------------------------------------------------------- RLE / bit-packed
def hybrid_runs(buf, pos: int, end: int, bit_width: int) -> list[tuple[bool, int, int]]:
    """The runs of Parquet's RLE / bit-packed hybrid encoding in ``buf[pos:end]``, as
    ``(packed, count, start)``: ``count`` values; for a packed run, ``start`` is the byte where
    its bits begin, for a repeated run, the value itself."""
    return [run for run, _ in _runs_from(buf, pos, end, bit_width)]


def _runs_from(buf, pos: int, end: int, bit_width: int) -> Iterator[tuple[tuple[bool, int, int], int]]:
    """The runs of :func:`hybrid_runs` one at a time, each with the byte offset where the next
    begins, so a caller that needs only the first few parses only those."""
    r = _Compact(buf, pos)
    width = (bit_width + 7) // 8
    while r.pos < end:
        h = r.varint()
        if h & 1:
            groups = h >> 1
            run = (True, groups * 8, r.pos)
            r.pos += groups * bit_width
        else:
            run = (False, h >> 1, int.from_bytes(buf[r.pos:r.pos + width], "little"))
            r.pos += width
        yield run, r.pos
    if r.pos != end:
        raise Decline("an encoded run goes past its section")


def unpack(buf, runs: list[tuple[bool, int, int]], bit_width: int, count: int) -> np.ndarray:
    """The first ``count`` values of ``runs`` as uint32 (bit widths up to 25)."""
    if bit_width > 25:
        raise Decline("bit width over 25")
    at = np.cumsum([0] + [n for _, n, _ in runs])
    if at[-1] < count:
        raise Decline("fewer encoded values than the page holds")
    packed = [(a, n, first) for a, (is_packed, n, first) in zip(at, runs) if is_packed]
    if len(packed) == len(runs):
        return _unpack_bits(buf, packed, bit_width)[:count]
    out = np.zeros(at[-1], np.uint32)
    for a, (is_packed, n, value) in zip(at, runs):
        if not is_packed and value:
            out[a:a + n] = value
    if packed:
        a, n = (np.array(v, np.int64) for v in list(zip(*packed))[:2])
        where = np.repeat(a - (np.cumsum(n) - n), n) + np.arange(n.sum())
        out[where] = _unpack_bits(buf, packed, bit_width)
    return out[:count]


def _unpack_bits(buf, packed: list[tuple[int, int, int]], bit_width: int) -> np.ndarray:
    """The values of bit-packed runs, in order. Their bytes, joined, are one packed stream in
    groups of eight values, ``bit_width`` bytes a group; value ``j`` of every group lies within
    the four bytes from byte ``j * bit_width // 8`` of its group, so each of the eight is read as
    a strided view of (unaligned, overlapping) little-endian words, shifted and masked."""
    stream = b"".join(bytes(buf[first:first + n // 8 * bit_width]) for _, n, first in packed) + bytes(4)
    groups = (len(stream) - 4) // bit_width if bit_width else sum(n for _, n, _ in packed) // 8
    out = np.zeros((groups, 8), np.uint32)
    if bit_width:
        mask = np.uint32((1 << bit_width) - 1)
        for j in range(8):
            bit = j * bit_width
            words = np.ndarray((groups,), "<u4", stream, offset=bit >> 3, strides=(bit_width,))
            out[:, j] = (words >> np.uint32(bit & 7)) & mask
    return out.reshape(-1)


# --------------------------------------------------------------------------------- levels
def _check_definitions(buf, pos: int, end: int, max_def: int, count: int) -> None:
    """Every definition level is ``max_def``: no null row, no null value, no empty list."""
    width = max_def.bit_length()
    runs = hybrid_runs(buf, pos, end, width)
    if all(not p and v == max_def for p, _, v in runs):
        if sum(n for _, n, _ in runs) != count:  # repeated runs hold no padding
            raise Decline("a count of definition levels other than the values'")
        return
    if not (unpack(buf, runs, width, count) == max_def).all():
        raise Decline("nulls or empty lists")


class RowPattern:
    """The bytes of one row's repetition levels, learnt from a page and then matched against
    each page: a page of whole rows of ``width`` values each is that pattern repeated."""

    def __init__(self):
        self.forget()

    def forget(self) -> None:
        self.pattern: bytes | None = None
        self.width: int | None = None

    def rows(self, buf, pos: int, end: int, count: int) -> int:
        """The number of rows in a page of ``count`` repetition levels at ``buf[pos:end]``,
        after checking that they are whole rows of one width."""
        if self.pattern is None or buf[pos:pos + len(self.pattern)] != self.pattern:
            self._learn(buf, pos, end, count)
        p = len(self.pattern)
        rows, rem = divmod(count, self.width)
        if rem or end - pos != rows * p:
            raise Decline("rows of different lengths, or rows split across pages")
        if rows > 1:
            got = np.frombuffer(buf, np.uint8, end - pos, pos).reshape(rows, p)
            if not (got == np.frombuffer(self.pattern, np.uint8)).all():
                raise Decline("rows of different lengths")
        return rows

    def _learn(self, buf, pos: int, end: int, count: int) -> None:
        """Take the runs that make up the first row of the page; they must end where it ends.
        Only the runs up to the first row's end are parsed: a page holds thousands of rows."""
        seen, run_start = 0, pos  # run_start: where run i begins
        for i, (run, run_end) in enumerate(_runs_from(buf, pos, end, 1)):
            packed, n, value = run
            n = min(n, count - seen)  # the last packed group is padded to eight values
            if n <= 0:
                break
            if not packed and value > 1:
                raise Decline("a repetition level over 1")
            levels = unpack(buf, [run], 1, n) if packed else np.full(n, value, np.uint32)
            if i == 0 and levels[0] != 0:
                raise Decline("a page that does not start a row")
            zeros = np.flatnonzero(levels[1:] == 0) + 1 if i == 0 else np.flatnonzero(levels == 0)
            if len(zeros):
                if i == 0 or zeros[0] != 0:
                    raise Decline("a row that ends inside an encoded run")
                self.pattern, self.width = bytes(buf[pos:run_start]), seen
                return
            seen += n
            run_start = run_end
        if seen != count or not count:
            raise Decline("fewer repetition levels than values")
        self.pattern, self.width = bytes(buf[pos:end]), count  # the page is one row


# ---------------------------------------------------------------------------------- values
def _values(data, pos: int, end: int, encoding: int, dtype: np.dtype, count: int,
            dictionary: np.ndarray | None) -> np.ndarray:
    if encoding == PLAIN:
        if end - pos != count * dtype.itemsize:
            raise Decline("value bytes do not match the count")
        return np.frombuffer(data, dtype, count, pos)
    if encoding == BYTE_STREAM_SPLIT:
        if end - pos != count * dtype.itemsize:
            raise Decline("value bytes do not match the count")
        streams = np.frombuffer(data, np.uint8, count * dtype.itemsize, pos).reshape(dtype.itemsize, count)
        return np.ascontiguousarray(streams.T).view(dtype).reshape(count)
    if encoding in (RLE_DICTIONARY, PLAIN_DICTIONARY):
        if dictionary is None:
            raise Decline("dictionary-encoded page without a dictionary")
        width = data[pos]
        index = unpack(data, hybrid_runs(data, pos + 1, end, width), width, count)
        if len(index) and int(index.max()) >= len(dictionary):
            raise Decline("dictionary index out of range")
        return dictionary[index]
    raise Decline(f"value encoding {encoding}")


# ------------------------------------------------------------------------------- the reader
def _bytes(buf) -> memoryview:
    """An unsigned-byte view (a pyarrow buffer's own view has signed bytes)."""
    return memoryview(buf).cast("B")


def embedding_leaf(pf: pq.ParquetFile, column: str) -> int | None:
    """Index of the one leaf column under ``column`` when its layout is one this reader takes."""
    leaves = [i for i in range(pf.metadata.num_columns)
              if pf.schema.column(i).path == column or pf.schema.column(i).path.startswith(column + ".")]
    if len(leaves) != 1:
        return None
    leaf = pf.schema.column(leaves[0])
    if leaf.max_repetition_level != 1 or leaf.physical_type not in VALUE_TYPES:
        return None
    return leaves[0]


def read_row_group(f: pa.NativeFile, pf: pq.ParquetFile, group: int, leaf: int, width: int | None,
                   pattern: "RowPattern | None" = None) -> Iterator[np.ndarray]:
    """The rows of row group ``group`` of leaf column ``leaf``, page by page, as arrays of shape
    (rows, width); ``width`` None takes the first row's. ``f`` is the file, opened for reading
    (its position is moved); ``pattern`` carries what one row group taught to the next.

    Raises :class:`Decline` before yielding a page it does not take for certain.
    """
    chunk = pf.metadata.row_group(group).column(leaf)
    n_rows = pf.metadata.row_group(group).num_rows
    descr = pf.schema.column(leaf)
    if chunk.compression != "UNCOMPRESSED" and chunk.compression not in CODECS:
        raise Decline(f"codec {chunk.compression}")
    codec = CODECS.get(chunk.compression)
    dtype = VALUE_TYPES[descr.physical_type]
    max_def = descr.max_definition_level
    pattern = pattern if pattern is not None else RowPattern()
    if width is not None and pattern.width not in (None, width):
        pattern.forget()
    pos = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o)
    end = pos + chunk.total_compressed_size
    dictionary = None
    values_seen = rows_seen = 0
    while pos < end:
        try:
            header, body_at = _header(f, pos, end)
            stored, plain_size = header.get("compressed_size", -1), header.get("uncompressed_size", -1)
            if stored < 0 or plain_size < 0 or body_at + stored > end:
                raise Decline("a page that does not fit its column chunk")
            pos = body_at + stored
            kind = header.get("type")
            if kind == INDEX_PAGE:
                continue
            f.seek(body_at)
            body = f.read_buffer(stored)
            if "crc" in header and _crc32(body) != header["crc"]:
                raise Decline("a page whose checksum does not match")
            if kind == DICTIONARY_PAGE:
                dictionary = _dictionary(header.get("dict") or {}, body, plain_size, codec, dtype)
                continue
            X, count = _data_page(header, body, plain_size, codec, dtype, max_def, pattern, dictionary)
        except (IndexError, ValueError, pa.ArrowException) as exc:  # a page that does not parse
            raise Decline(f"a page that does not parse ({exc})") from None
        if X is None:
            continue
        if width is not None and X.shape[1] != width:
            raise Decline("rows of another width")
        values_seen += count
        rows_seen += len(X)
        if rows_seen > n_rows or values_seen > chunk.num_values:
            raise Decline("more values than the column chunk holds")
        yield X
    if rows_seen != n_rows or values_seen != chunk.num_values:
        raise Decline("fewer values than the column chunk holds")


def _header(f: pa.NativeFile, pos: int, end: int) -> tuple[dict, int]:
    """The page header at ``pos`` and the position of the page's body."""
    window = HEADER_WINDOW
    while True:
        try:
            header, size = page_header(f.read_at(min(window, end - pos), pos))
            return header, pos + size
        except IndexError:  # the header is longer than the bytes read
            if window >= end - pos:
                raise Decline("a page header that does not parse") from None
            window *= 16


def _crc32(body: pa.Buffer) -> int:
    """CRC-32 of a page as stored (compressed), as the signed int32 its header holds."""
    crc = zlib.crc32(body)
    return crc - (1 << 32) if crc >= 1 << 31 else crc


def _decompress(buf: pa.Buffer, size: int, codec: str | None) -> pa.Buffer:
    out = pa.decompress(buf, size, codec=codec) if codec else buf
    if len(out) != size:
        raise Decline("a page of another size than its header says")
    return out


def _dictionary(h: dict, body: pa.Buffer, plain_size: int, codec: str | None, dtype: np.dtype) -> np.ndarray:
    if h.get("encoding") not in (PLAIN, PLAIN_DICTIONARY):
        raise Decline("dictionary page encoding")
    n = h.get("num_values", -1)
    data = _decompress(body, plain_size, codec)
    if n < 0 or len(data) < n * dtype.itemsize:
        raise Decline("dictionary page size")
    return np.frombuffer(data, dtype, n).copy()


def _data_page(header: dict, body: pa.Buffer, plain_size: int, codec: str | None, dtype: np.dtype,
               max_def: int, pattern: RowPattern, dictionary: np.ndarray | None) -> tuple[np.ndarray | None, int]:
    """The rows of one data page (None for a page of no values), and its count of values."""
    kind = header.get("type")
    if kind == DATA_PAGE and "v1" in header:
        # Levels and values are compressed together; each level section has a 4-byte length.
        h = header["v1"]
        data = _bytes(_decompress(body, plain_size, codec))
        rep_at, rep_len = 4, int.from_bytes(data[0:4], "little")
        def_at, def_len = rep_at + rep_len, 0
        if max_def:
            def_len = int.from_bytes(data[def_at:def_at + 4], "little")
            def_at += 4
        levels, values, values_at = data, data, def_at + def_len
        if values_at > len(data):
            raise Decline("level sections past the page")
    elif kind == DATA_PAGE_V2 and "v2" in header:
        # Levels come first, uncompressed, with their lengths in the header.
        h = header["v2"]
        rep_len, def_len = h.get("rep_bytes", -1), h.get("def_bytes", -1)
        if h.get("num_nulls", 0) or rep_len < 0 or def_len < 0 or rep_len + def_len > len(body):
            raise Decline("nulls, or level sections past the page")
        levels = _bytes(body.slice(0, rep_len + def_len))
        values = body.slice(rep_len + def_len)
        if codec and h.get("is_compressed", True):
            values = _decompress(values, plain_size - rep_len - def_len, codec)
        values, values_at = _bytes(values), 0
        rep_at, def_at = 0, rep_len
    else:
        raise Decline(f"page type {kind}")
    count = h.get("num_values", -1)
    if count < 0:
        raise Decline("a data page without a value count")
    if count == 0:  # pyarrow writes these, between small pages
        return None, 0
    if max_def:
        _check_definitions(levels, def_at, def_at + def_len, max_def, count)
    rows = pattern.rows(levels, rep_at, rep_at + rep_len, count)
    if h.get("num_rows", rows) != rows:
        raise Decline("a row count other than the levels'")
    X = _values(values, values_at, len(values), h.get("encoding", -1), dtype, count, dictionary)
    return X.reshape(rows, pattern.width), count
