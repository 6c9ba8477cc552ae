"""The Parquet page reader: the same batches as pyarrow's, or it declines and pyarrow reads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamcoke.data import DataError, ParquetSource, SkipErrors
from streamcoke.data import parquet_pages as pp


def write(path, X, *, ids=None, kind="fixed", nulls=(), **options):
    """X as an embedding column of ``kind``; rows in ``nulls`` are null; options go to pyarrow."""
    rows = [None if i in nulls else list(map(float, x)) for i, x in enumerate(X)]
    if kind == "fixed":
        typ = pa.list_(pa.float32(), X.shape[1])
    elif kind == "f64":
        typ = pa.list_(pa.float64())
    else:
        typ = pa.list_(pa.float32())
    emb = pa.array(rows, typ)
    if kind == "tensor":
        emb = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [X.shape[1]]),
                                             pa.array(rows, pa.list_(pa.float32(), X.shape[1])))
    ids = np.arange(len(X)) if ids is None else ids
    pq.write_table(pa.table({"id": ids, "embedding": emb}), path, **options)
    return path


def read(path, page_reader=True, **kw):
    src = ParquetSource(path, batch_size=kw.pop("batch_size", 64), page_reader=page_reader, **kw)
    ids, feats = [], []
    for b in src:
        ids.extend(np.asarray(b.ids).tolist())
        feats.append(b.features.numpy())
    return src, ids, (np.concatenate(feats) if feats else np.empty((0, 0), np.float32))


OPTIONS = {
    "defaults": {},
    "uncompressed": dict(compression="none"),
    "zstd": dict(compression="zstd"),
    "gzip": dict(compression="gzip"),
    "brotli": dict(compression="brotli"),
    "lz4": dict(compression="lz4"),
    "no dictionary": dict(use_dictionary=False),
    "data page v2": dict(data_page_version="2.0"),
    "small pages": dict(data_page_size=2048),
    "small pages v2 zstd": dict(data_page_size=2048, data_page_version="2.0", compression="zstd"),
    "small dictionary": dict(dictionary_pagesize_limit=1024),  # dictionary, then plain pages
    "byte stream split": dict(use_dictionary=False, column_encoding={"embedding": "BYTE_STREAM_SPLIT"}),
    "page index and crc": dict(write_page_index=True, write_page_checksum=True),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("kind", ["fixed", "list", "f64", "tensor"])
def test_pages_read_as_pyarrow_reads_them(tmp_path, options, kind):
    X = np.random.default_rng(1).normal(size=(500, 24)).astype(np.float32)
    X[::7] = X[3]  # repeated rows: dictionaries with repeated indices (runs) as well as packed ones
    path = write(tmp_path / "e.parquet", X, kind=kind, row_group_size=150, **options)
    fast, ids, F = read(path)
    slow, ids0, F0 = read(path, page_reader=False)
    assert pq.ParquetFile(path).num_row_groups == 4
    assert fast.rows_from_pages == 500 and slow.rows_from_pages == 0  # every row from its page
    assert ids == ids0 == list(range(500))
    np.testing.assert_array_equal(F, F0)
    np.testing.assert_array_equal(F, X)  # float64 values of float32 numbers come back exactly


@pytest.mark.parametrize("d", [16, 100, 300, 1024])
def test_widths_that_are_not_a_multiple_of_eight(tmp_path, d):
    X = np.random.default_rng(d).normal(size=(40, d)).astype(np.float32)
    fast, ids, F = read(write(tmp_path / "e.parquet", X, row_group_size=15))
    assert fast.rows_from_pages == 40
    np.testing.assert_array_equal(F, X)


def test_narrow_rows_are_left_to_pyarrow(tmp_path, monkeypatch):
    # Rows under 16 values leave no row-long run of repetition levels, so one row's bytes are not
    # a fixed pattern: the reader declines and pyarrow reads every row group. Declined at the
    # first page, the page reader is not tried again on the same file (a page read twice per
    # row group cost a third of the rate with small row groups).
    tries = []
    real = pp.read_row_group
    monkeypatch.setattr(pp, "read_row_group", lambda *a, **k: tries.append(1) or real(*a, **k))
    X = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    fast, ids, F = read(write(tmp_path / "e.parquet", X, row_group_size=10))
    assert fast.rows_from_pages == 0 and len(tries) == 1
    np.testing.assert_array_equal(F, X)


def test_a_null_in_a_later_page_hands_the_rest_to_pyarrow(tmp_path):
    X = np.random.default_rng(2).normal(size=(300, 32)).astype(np.float32)
    path = write(tmp_path / "e.parquet", X, ids=[f"r{i}" for i in range(300)], nulls={250},
                 row_group_size=300, data_page_size=4096, use_dictionary=False)
    handler_fast, handler_slow = SkipErrors(), SkipErrors()
    fast, ids, F = read(path, handler=handler_fast, batch_size=48)
    slow, ids0, F0 = read(path, page_reader=False, handler=handler_slow, batch_size=48)
    assert 0 < fast.rows_from_pages < 250  # the pages before the null one; pyarrow read on from there
    assert ids == ids0 == [f"r{i}" for i in range(300) if i != 250]
    np.testing.assert_array_equal(F, F0)
    np.testing.assert_array_equal(F, np.delete(X, 250, axis=0))
    assert handler_fast.count == handler_slow.count == 1
    with pytest.raises(DataError, match=r"embedding is null.*e\.parquet.*sample 'r250'"):
        read(path)


def test_a_short_row_is_named_as_pyarrow_names_it(tmp_path):
    X = np.random.default_rng(3).normal(size=(200, 16)).astype(np.float32)
    rows = [list(map(float, x)) for x in X]
    rows[170] = rows[170][:15]
    path = tmp_path / "v.parquet"
    pq.write_table(pa.table({"id": np.arange(200), "embedding": pa.array(rows, pa.list_(pa.float32()))}), path,
                   data_page_size=2048)
    with pytest.raises(DataError, match="15 values, expected 16.*sample 170"):
        read(path)
    h = SkipErrors()
    fast, ids, F = read(path, handler=h)
    assert h.count == 1 and ids == [i for i in range(200) if i != 170]
    np.testing.assert_array_equal(F, np.delete(X, 170, axis=0))


def test_a_corrupt_page_header_names_the_file(tmp_path):
    X = np.random.default_rng(4).normal(size=(400, 32)).astype(np.float32)
    good = write(tmp_path / "a.parquet", X[:100])
    path = write(tmp_path / "c.parquet", X, row_group_size=200, data_page_size=8192, use_dictionary=False)
    meta = pq.ParquetFile(path).metadata.row_group(1).column(1)
    raw = bytearray(path.read_bytes())
    raw[meta.data_page_offset:meta.data_page_offset + 8] = b"\xff" * 8  # the second row group's first page
    path.write_bytes(bytes(raw))
    for page_reader in (True, False):
        with pytest.raises(DataError, match=r"cannot read the file.*c\.parquet"):
            read(path, page_reader=page_reader)
        h = SkipErrors()
        src, ids, F = read([good, path], page_reader=page_reader, handler=h)
        assert h.count == 200 and len(ids) == 300  # the first row group of c.parquet, then the rest skipped
        np.testing.assert_array_equal(F, np.concatenate([X[:100], X[:200]]))


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_page_that_fails_its_checksum_names_the_file(tmp_path, compression):
    X = np.random.default_rng(5).normal(size=(400, 32)).astype(np.float32)
    path = write(tmp_path / "c.parquet", X, row_group_size=200, use_dictionary=False, compression=compression,
                 write_page_checksum=True)
    src, ids, F = read(path)
    assert src.rows_from_pages == 400  # checksums that match: the page reader takes the file
    np.testing.assert_array_equal(F, X)
    meta = pq.ParquetFile(path).metadata.row_group(1).column(1)
    raw = bytearray(path.read_bytes())
    raw[meta.data_page_offset + meta.total_compressed_size // 2] ^= 0x40  # a byte inside the page body
    path.write_bytes(bytes(raw))
    for page_reader in (True, False):
        with pytest.raises(DataError, match=r"CRC.*c\.parquet"):
            read(path, page_reader=page_reader)


def test_hybrid_runs_of_the_format_description():
    # Bit width 3, the values 0..7 bit-packed (one group: header (1 << 1) | 1), then a run of
    # five 4s (header 5 << 1, one byte of value).
    buf = bytes([0x03, 0x88, 0xC6, 0xFA, 0x0A, 0x04])
    runs = pp.hybrid_runs(buf, 0, len(buf), 3)
    assert runs == [(True, 8, 1), (False, 5, 4)]
    assert pp.unpack(buf, runs, 3, 13).tolist() == list(range(8)) + [4] * 5
    assert pp.unpack(buf, runs[:1], 3, 6).tolist() == list(range(6))
    with pytest.raises(pp.Decline):
        pp.hybrid_runs(buf, 0, len(buf) - 1, 3)  # a run that goes past its section


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 260), d=st.integers(16, 40), group=st.integers(1, 300), page=st.sampled_from([512, 4096, 1 << 20]),
       compression=st.sampled_from(["none", "snappy", "zstd"]), dictionary=st.booleans(),
       version=st.sampled_from(["1.0", "2.0"]), kind=st.sampled_from(["fixed", "list"]),
       nulls=st.sets(st.integers(0, 259), max_size=2), repeat=st.booleans(), seed=st.integers(0, 2**16))
def test_any_layout_reads_as_pyarrow_reads_it(tmp_path_factory, n, d, group, page, compression, dictionary, version,
                                              kind, nulls, repeat, seed):
    X = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    if repeat:
        X[::3] = X[0]
    path = write(tmp_path_factory.mktemp("p") / "e.parquet", X, kind=kind, nulls={i for i in nulls if i < n},
                 row_group_size=group, data_page_size=page, compression=compression, use_dictionary=dictionary,
                 data_page_version=version)
    h1, h0 = SkipErrors(), SkipErrors()
    fast, ids, F = read(path, handler=h1, batch_size=37)
    slow, ids0, F0 = read(path, page_reader=False, handler=h0, batch_size=37)
    assert ids == ids0 and h1.count == h0.count
    np.testing.assert_array_equal(F, F0)
    if not nulls:
        assert fast.rows_from_pages == n
