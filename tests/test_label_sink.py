"""The Parquet label sink: streamed row groups, published only when complete, resumable."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from streamcoke.io.labels import ParquetLabelSink


def batch(start, n, heads=1):
    ids = np.arange(start, start + n)
    labels = np.stack([(ids * (h + 3)) % 7 for h in range(heads)], 1)
    sim = np.stack([ids / 1000 + h for h in range(heads)], 1).astype(np.float32)
    return ids, labels, sim


def test_rows_row_groups_and_publish_at_close(tmp_path):
    path = tmp_path / "labels.parquet"
    sink = ParquetLabelSink(path, row_group_size=100)
    for s in range(0, 350, 50):
        sink.write(*batch(s, 50), epoch=2)
    assert not path.exists()  # two row groups are on disk, but not under the final name
    assert [p.name for p in tmp_path.iterdir()] == [".labels.parquet.parts"]
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.parquet"]
    f = pq.ParquetFile(path)
    assert f.num_row_groups == 4 and f.metadata.num_rows == 350
    t = f.read().to_pydict()
    ids, labels, sim = batch(0, 350)
    assert t["id"] == ids.tolist() and t["label"] == labels[:, 0].tolist() and set(t["epoch"]) == {2}
    np.testing.assert_allclose(t["similarity"], sim[:, 0])
    assert "DELTA_BINARY_PACKED" in f.metadata.row_group(0).column(0).encodings  # integer ids as deltas


def test_counting_ids_take_about_a_byte(tmp_path):
    path = tmp_path / "labels.parquet"
    rng = np.random.default_rng(0)
    with ParquetLabelSink(path) as sink:
        for s in range(0, 655_360, 8192):
            sink.write(np.arange(s, s + 8192), rng.integers(0, 1000, 8192), rng.random(8192).astype(np.float32), 0)
    per_row = path.stat().st_size / 655_360
    assert 5.0 < per_row < 5.6  # ids ~1 byte, labels ~1.3 (10-bit dictionary codes), similarity 4 (~9.4 plain)


def test_string_ids_are_written_plain(tmp_path):
    path = tmp_path / "labels.parquet"
    with ParquetLabelSink(path, row_group_size=2) as sink:
        sink.write(["a", "b", "c"], np.array([3, 1, 2]), np.array([0.9, 0.5, 0.1]), epoch=0)
    f = pq.ParquetFile(path)
    assert f.read().column("id").to_pylist() == ["a", "b", "c"]
    assert "DELTA_BINARY_PACKED" not in f.metadata.row_group(0).column(0).encodings


def test_several_clusterings_and_tensors(tmp_path):
    path = tmp_path / "l.parquet"
    with ParquetLabelSink(path, n_clusterings=3, metadata={"n_clusters": [5, 6, 7]}) as sink:
        ids, labels, sim = batch(0, 20, heads=3)
        sink.write([f"k{i}" for i in ids], torch.from_numpy(labels), torch.from_numpy(sim), epoch=0)
    t = pq.read_table(path)
    assert t.schema.names == ["id", "label_0", "label_1", "label_2", "similarity_0", "similarity_1",
                              "similarity_2", "epoch"]
    assert t.column("label_2").to_pylist() == labels[:, 2].tolist()
    assert t.schema.metadata[b"streamcoke.n_clusters"] == b"[5, 6, 7]"


def test_error_leaves_nothing(tmp_path):
    path = tmp_path / "l.parquet"
    with pytest.raises(RuntimeError):
        with ParquetLabelSink(path, row_group_size=10) as sink:
            sink.write(*batch(0, 30), epoch=0)
            sink.checkpoint()
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_resume_after_sealed_parts(tmp_path):
    path = tmp_path / "l.parquet"
    sink = ParquetLabelSink(path, row_group_size=16)
    sink.write(*batch(0, 40), epoch=0)
    parts = sink.checkpoint()
    sink.write(*batch(40, 40), epoch=0)  # lost: written after the last checkpoint
    sink.checkpoint()
    sink.write(*batch(80, 5), epoch=0)
    sink.abort(keep_parts=True)  # the process dies
    assert not path.exists()

    sink = ParquetLabelSink(path, row_group_size=16, resume_parts=parts)
    sink.write(*batch(40, 60), epoch=0)
    sink.close()
    assert pq.read_table(path).column("id").to_pylist() == list(range(100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.parquet"]


def test_resume_with_missing_parts_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="sealed parts are missing"):
        ParquetLabelSink(tmp_path / "l.parquet", resume_parts=2)


def test_mismatched_lengths_and_empty_sink(tmp_path):
    sink = ParquetLabelSink(tmp_path / "l.parquet")
    with pytest.raises(ValueError, match="3 ids but 2 labels"):
        sink.write([1, 2, 3], np.zeros(2), np.zeros(3), epoch=0)
    sink.close()
    t = pq.read_table(tmp_path / "l.parquet")
    assert t.num_rows == 0 and t.schema.names == ["id", "label", "similarity", "epoch"]


def test_holds_no_views_and_at_most_a_row_group(tmp_path):
    sink = ParquetLabelSink(tmp_path / "l.parquet", row_group_size=64)
    big = np.arange(100_000)  # stands for a record batch's buffer that ids are a view of
    ref = weakref.ref(big)
    sink.write(big[:10], np.zeros(10, np.int64), np.zeros(10, np.float32), epoch=0)
    del big
    gc.collect()
    assert ref() is None  # the sink copied the 10 ids, it does not keep the whole buffer
    for s in range(10, 1000, 30):
        sink.write(*batch(s, 30), epoch=0)
        assert sink._buffered < 64 + 30
    sink.close()
    assert pq.read_table(tmp_path / "l.parquet").column("id").to_pylist()[10:] == list(range(10, 1000))


def test_join_of_parts_streams_row_groups(tmp_path, monkeypatch):
    path = tmp_path / "l.parquet"
    sink = ParquetLabelSink(path, row_group_size=50)
    for s in range(0, 300, 25):
        sink.write(*batch(s, 25), epoch=1)
        if s % 100 == 75:
            sink.checkpoint()  # three sealed parts of two row groups
    assert sink.n_parts == 3
    read = []
    orig = pq.ParquetFile.read_row_group

    def read_row_group(self, i, *a, **kw):
        read.append(i)
        return orig(self, i, *a, **kw)

    def whole(*a, **kw):
        raise AssertionError("the join must not read a whole file")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    sink.close()
    monkeypatch.undo()
    assert read == [0, 1] * 3
    f = pq.ParquetFile(path)
    assert f.num_row_groups == 6 and f.read().column("id").to_pylist() == list(range(300))
    assert not (tmp_path / ".l.parquet.parts").exists()


@pytest.mark.parametrize("ids", [
    np.array([f"{i:09d}" for i in range(1000)]),  # one length, ASCII: laid out directly
    np.array(["k1", "k22", "k333"]),  # padded to one width: pyarrow converts them
    np.array(["caf\u00e9", "naive"]),  # not ASCII
    np.array(["", "a"]),
    np.array([], dtype="U3"),
])
def test_str_ids_give_pyarrows_strings(ids):
    import pyarrow as pa

    from streamcoke.io.labels import _id_array

    got = _id_array(ids)
    assert got.type == pa.string() and got.equals(pa.array(ids, type=pa.string()))
    assert got.to_pylist() == ids.tolist()


def test_pages_carry_checksums(tmp_path):
    path = tmp_path / "labels.parquet"
    with ParquetLabelSink(path, row_group_size=100) as sink:
        for s in range(0, 300, 50):
            sink.write(*batch(s, 50), epoch=0)
    assert pq.ParquetFile(path, page_checksum_verification=True).read().num_rows == 300
    meta = pq.ParquetFile(path).metadata.row_group(1).column(2)  # the similarities of the second row group
    raw = bytearray(path.read_bytes())
    raw[meta.data_page_offset + meta.total_compressed_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(OSError, match="CRC"):
        pq.ParquetFile(path, page_checksum_verification=True).read()
