"""Sources: arrays, Parquet datasets, WebDataset shards (made by the converter) and images."""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds

from streamcoke.data import (ArraySource, DataError, ParquetSource, SkipErrors, WebDatasetSource, input_kind,
                             open_source, prefetch, prefetch_pays)
from streamcoke.data.array_source import NpyFile
from streamcoke.io.shards import write_array_shards, write_image_folder_shards


@pytest.fixture
def X():
    return np.random.default_rng(0).normal(size=(103, 8)).astype(np.float32)


def collect(source, epoch=0):
    ids, feats = [], []
    for b in source.epoch(epoch):
        assert b.features.dtype == torch.float32 and b.features.device.type == "cpu"
        ids.extend(np.asarray(b.ids).tolist())
        feats.append(b.features.numpy())
    return ids, np.concatenate(feats)


def fixed_list(X):
    return pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), X.shape[1])


# ------------------------------------------------------------------------------------ arrays
def test_array_source_memmap_in_order(tmp_path, X):
    np.save(tmp_path / "a.npy", X[:50])
    np.save(tmp_path / "b.npy", X[50:])
    src = ArraySource([tmp_path / "a.npy", tmp_path / "b.npy"], batch_size=16)
    ids, F = collect(src)
    assert ids == list(range(103))
    np.testing.assert_array_equal(F, X)
    assert [len(b.ids) for b in src][:-1] == [16] * 6


def test_array_source_shuffle_is_seeded_per_epoch(X):
    src = ArraySource(X, batch_size=10, shuffle=True, seed=3)
    a0, F0 = collect(src, 0)
    assert a0 == collect(src, 0)[0]
    assert a0 != collect(src, 1)[0] and sorted(a0) == list(range(103))
    np.testing.assert_array_equal(F0, X[a0])


def test_array_source_bad_row_names_the_row(X):
    X = X.copy()
    X[37, 2] = np.nan
    with pytest.raises(DataError, match="sample 37"):
        collect(ArraySource(X, batch_size=16))
    h = SkipErrors()
    ids, _ = collect(ArraySource(X, batch_size=16, handler=h))
    assert h.count == 1 and 37 not in ids and len(ids) == 102


def _rss_file_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])


def test_npy_files_are_read_not_mapped(tmp_path, X):
    np.save(tmp_path / "a.npy", X)
    src = ArraySource(tmp_path / "a.npy", batch_size=10, shuffle=True, seed=2)
    assert isinstance(src.arrays[0], NpyFile)
    ids, F = collect(src)
    np.testing.assert_array_equal(F, X[ids])  # shuffled rows: read in runs of consecutive rows
    f = NpyFile(tmp_path / "a.npy")
    np.testing.assert_array_equal(f[np.array([5, 5, 102, 0, 1, 2])], X[[5, 5, 102, 0, 1, 2]])
    np.testing.assert_array_equal(f[-1], X[-1])
    np.testing.assert_array_equal(f[100:200], X[100:])
    np.save(tmp_path / "f.npy", np.asfortranarray(X))  # column order: falls back to a memory map
    np.testing.assert_array_equal(collect(ArraySource(tmp_path / "f.npy", batch_size=16))[1], X)
    (tmp_path / "t.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:-8])
    with pytest.raises(DataError, match="truncated.*t.npy"):
        ArraySource(tmp_path / "t.npy")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_npy_pass_does_not_grow_resident_memory(tmp_path):
    big = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float32, shape=(131072, 96))
    big[:] = 1.0  # 48 MiB, in the page cache but not mapped by this process once closed
    del big
    before, grown, n = _rss_file_kib(), 0, 0
    for b in ArraySource(tmp_path / "big.npy", batch_size=4096):
        n += len(b.ids)
        grown = max(grown, _rss_file_kib() - before)
    assert n == 131072
    assert grown < 16 * 1024  # a memory map's pages read so far count: up to the whole 48 MiB


# ----------------------------------------------------------------------------------- parquet
def test_parquet_batches_do_not_depend_on_file_layout(tmp_path, X):
    ids = [f"s{i}" for i in range(len(X))]
    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"id": ids[:40], "embedding": fixed_list(X[:40])}), tmp_path / "d" / "0.parquet",
                   row_group_size=7)
    pq.write_table(pa.table({"id": ids[40:], "embedding": pa.array(X[40:].astype(np.float64).tolist())}),
                   tmp_path / "d" / "1.parquet", row_group_size=11)
    src = ParquetSource(tmp_path / "d", batch_size=16)
    assert len(src) == 103 and src.n_features == 8
    got_ids, F = collect(src)
    assert got_ids == ids
    np.testing.assert_allclose(F, X, rtol=1e-6)
    assert [len(b.ids) for b in src] == [16] * 6 + [7]


def test_parquet_tensor_column_and_row_numbers(tmp_path, X):
    arr = pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float32(), [8]), fixed_list(X))
    pq.write_table(pa.table({"embedding": arr}), tmp_path / "t.parquet")
    ids, F = collect(ParquetSource(tmp_path / "t.parquet", id_column=None, batch_size=32))
    assert ids == list(range(103))
    np.testing.assert_array_equal(F, X)


def test_parquet_wrong_type_names_the_file(tmp_path, X):
    pq.write_table(pa.table({"id": np.arange(103), "embedding": fixed_list(X)}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": np.arange(5), "embedding": pa.array(["x"] * 5)}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet.*|.*b\.parquet"):
        collect(ParquetSource(tmp_path, batch_size=16))
    h = SkipErrors()
    ids, _ = collect(ParquetSource(tmp_path, batch_size=16, handler=h))
    assert len(ids) == 103 and h.count == 5


def test_parquet_wrong_width_file_and_row(tmp_path, X):
    pq.write_table(pa.table({"id": np.arange(103), "embedding": fixed_list(X)}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": [1000, 1001], "embedding": fixed_list(np.ones((2, 5), np.float32))}),
                   tmp_path / "b.parquet")
    with pytest.raises(DataError, match="5 values, expected 8.*b.parquet"):
        collect(ParquetSource(tmp_path, batch_size=16))
    rows = X[:3].tolist()
    rows[1] = rows[1][:7]
    pq.write_table(pa.table({"id": [7, 8, 9], "embedding": pa.array(rows)}), tmp_path / "v.parquet")
    with pytest.raises(DataError, match="7 values, expected 8.*sample 8"):
        collect(ParquetSource(tmp_path / "v.parquet", batch_size=2))


def test_arrow_ipc_files_are_told_by_their_names(tmp_path, X):
    table = pa.table({"id": [f"s{i}" for i in range(len(X))], "embedding": fixed_list(X)})
    (tmp_path / "d").mkdir()
    for name, part in (("0.arrow", table.slice(0, 50)), ("1.feather", table.slice(50))):
        with pa.ipc.new_file(str(tmp_path / "d" / name), table.schema) as w:
            for rb in part.to_batches(max_chunksize=9):
                w.write_batch(rb)
    for src in (ParquetSource(tmp_path / "d", batch_size=16),
                ParquetSource([tmp_path / "d" / "0.arrow", tmp_path / "d" / "1.feather"], batch_size=16),
                open_source([tmp_path / "d" / "0.arrow", tmp_path / "d" / "1.feather"], batch_size=16)):
        assert src.format == "ipc" and len(src) == 103
        ids, F = collect(src)
        assert ids == table.column("id").to_pylist()
        np.testing.assert_array_equal(F, X)
    with pytest.raises(DataError, match="0.arrow"):  # told to read Arrow IPC as Parquet
        ParquetSource(tmp_path / "d" / "0.arrow", format="parquet")
    with pytest.raises(ValueError, match="format must be"):
        ParquetSource(tmp_path / "d", format="csv")


def test_parquet_missing_column(tmp_path, X):
    pq.write_table(pa.table({"key": np.arange(103), "embedding": fixed_list(X)}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="missing column 'id'.*a.parquet"):
        collect(ParquetSource(tmp_path / "a.parquet"))


def test_parquet_reads_less_than_a_row_group(tmp_path):
    # One row group of 16 MiB of floats: the dataset scanner decoded (and read ahead) whole
    # row groups, so memory followed the file's layout rather than the batch size.
    n, d = 65536, 64
    X = np.arange(n * d, dtype=np.float32).reshape(n, d)
    pq.write_table(pa.table({"id": np.arange(n), "embedding": fixed_list(X)}), tmp_path / "one.parquet",
                   row_group_size=n)
    assert pq.ParquetFile(tmp_path / "one.parquet").num_row_groups == 1
    base = pa.total_allocated_bytes()
    peak, rows = 0, 0
    for b in ParquetSource(tmp_path / "one.parquet", batch_size=512):
        peak = max(peak, pa.total_allocated_bytes() - base)
        assert b.ids[0] == rows and b.features[0, 0] == rows * d
        rows += len(b.ids)
    assert rows == n
    assert peak < 8 << 20, f"{peak / 2**20:.1f} MiB of Arrow memory held while reading"


# ------------------------------------------------------------------------------- webdataset
def test_array_shards_round_trip(tmp_path, X):
    pattern = write_array_shards(X, str(tmp_path / "f"), maxcount=30)
    assert pattern.endswith("f-{000000..000003}.tar")
    assert sorted(os.listdir(tmp_path)) == [f"f-{i:06d}.tar" for i in range(4)]
    keys, F = collect(WebDatasetSource(pattern, batch_size=16))
    assert keys == [f"{i:09d}" for i in range(103)]
    np.testing.assert_array_equal(F, X)
    idx = [int(s["idx"]) for s in wds.WebDataset(pattern, shardshuffle=False)]
    assert idx == list(range(103))


def test_block_shards_round_trip(tmp_path, X):
    pattern = write_array_shards(X, str(tmp_path / "b"), maxcount=40, rows_per_sample=16)
    assert pattern.endswith("b-{000000..000002}.tar")  # 48 + 48 + 7 rows: 3 blocks a shard
    samples = list(wds.WebDataset(pattern, shardshuffle=False))
    assert [s["__key__"] for s in samples][:4] == ["000000000", "000000016", "000000032", "000000048"]
    assert set(samples[0]) >= {"npy", "ids.npy"}
    src = WebDatasetSource(pattern, batch_size=10)
    ids, F = collect(src)
    assert ids == list(range(103))  # block ids: the row numbers
    np.testing.assert_array_equal(F, X)
    assert [len(b.ids) for b in src] == [10] * 10 + [3]  # batches cut across blocks and shards
    k0, F0 = collect(WebDatasetSource(pattern, batch_size=10, shuffle=4, seed=1))
    assert sorted(k0) == list(range(103)) and k0 != list(range(103))  # blocks shuffled
    np.testing.assert_array_equal(F0, X[k0])


def test_whole_block_batches_from_local_and_streamed_shards(tmp_path, X):
    # One block a batch: local shards hand the member's own buffer on, streamed ones (bytes,
    # read-only) a copy; both give the rows, as writable tensors, one batch apart from the next.
    pattern = write_array_shards(X, str(tmp_path / "b"), maxcount=48, rows_per_sample=16)
    shards = sorted(str(p) for p in tmp_path.glob("b-*.tar"))
    for urls in (pattern, [f"pipe:cat {p}" for p in shards]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch warns when it wraps a read-only array
            batches = list(WebDatasetSource(urls, batch_size=16))
        assert [len(b.ids) for b in batches] == [16] * 6 + [7]
        np.testing.assert_array_equal(np.concatenate([b.features.numpy() for b in batches]), X)
        batches[0].features.add_(1.0)  # each batch is its own memory
        np.testing.assert_array_equal(batches[1].features.numpy(), X[16:32])


def test_block_bad_rows_and_mixed_layouts(tmp_path, X):
    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    Xb = X[:20].copy()
    Xb[13, 0] = np.inf
    samples = [{"__key__": "r0", "npy": npy(X[20])},
               {"__key__": "b0", "npy": npy(Xb), "ids.npy": npy(np.arange(100, 120))},
               {"__key__": "r1", "npy": npy(X[21])},
               {"__key__": "b1", "npy": npy(X[:3, :5]), "ids.npy": npy(np.arange(3))},
               {"__key__": "b2", "npy": npy(X[:3]), "ids.npy": npy(np.arange(2))}]
    _write(tmp_path / "m.tar", samples)
    with pytest.raises(DataError, match="NaN or infinity.*m.tar.*sample 113"):
        collect(WebDatasetSource(str(tmp_path / "m.tar"), batch_size=8))
    h = SkipErrors()
    ids, F = collect(WebDatasetSource(str(tmp_path / "m.tar"), batch_size=8, handler=h))
    assert h.count == 3  # the row with infinity, the block of width 5, the block with too few ids
    expect = ["r0"] + [str(i) for i in range(100, 120) if i != 113] + ["r1"]
    assert [str(i) for i in ids] == expect
    np.testing.assert_array_equal(F, np.concatenate([X[20:21], np.delete(X[:20], 13, 0), X[21:22]]))


def test_shuffle_buffer_seeded_by_epoch(tmp_path, X):
    pattern = write_array_shards(X, str(tmp_path / "f"), maxcount=30)
    src = WebDatasetSource(pattern, batch_size=16, shuffle=50, seed=1)
    k0, F0 = collect(src, 0)
    assert k0 == collect(src, 0)[0] != collect(src, 1)[0]
    assert sorted(k0) == [f"{i:09d}" for i in range(103)] and k0 != sorted(k0)
    np.testing.assert_array_equal(F0, X[[int(k) for k in k0]])


def _write(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def test_pth_and_safetensors_fields(tmp_path, X):
    from safetensors.numpy import save

    def pth(a):
        buf = io.BytesIO()
        torch.save(torch.from_numpy(a), buf)
        return buf.getvalue()

    _write(tmp_path / "p.tar", [{"__key__": f"k{i}", "pth": pth(X[i])} for i in range(5)])
    _write(tmp_path / "s.tar", [{"__key__": f"k{i}", "safetensors": save({"emb": X[i]})} for i in range(5)])
    for name, field in (("p.tar", "pth"), ("s.tar", "safetensors")):
        keys, F = collect(WebDatasetSource(str(tmp_path / name), field=field, batch_size=4))
        assert keys == [f"k{i}" for i in range(5)]
        np.testing.assert_array_equal(F, X[:5])


class Evil:
    """Unpickles to a valid tensor by calling a function: only a full unpickler would run it."""

    def __reduce__(self):
        return (torch.full, ((8,), 1.0))


def test_pth_is_not_unpickled(tmp_path):
    buf = io.BytesIO()
    torch.save(Evil(), buf)
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=False).shape == (8,)
    _write(tmp_path / "e.tar", [{"__key__": "bad", "pth": buf.getvalue()}])
    with pytest.raises(DataError, match="e.tar.*sample 'bad'"):
        collect(WebDatasetSource(str(tmp_path / "e.tar"), field="pth"))


def test_npy_of_objects_is_not_unpickled(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([Evil()], dtype=object), allow_pickle=True)
    good = io.BytesIO()
    np.save(good, np.ones(8, np.float32))
    # Enough regular samples before it that the row reader is the one that meets it.
    samples = [{"__key__": f"k{i}", "npy": good.getvalue()} for i in range(50)]
    _write(tmp_path / "o.tar", samples + [{"__key__": "bad", "npy": buf.getvalue()}])
    with pytest.raises(DataError, match="refusing to unpickle.*o.tar, sample 'bad'"):
        collect(WebDatasetSource(str(tmp_path / "o.tar"), batch_size=16))
    h = SkipErrors()
    keys, F = collect(WebDatasetSource(str(tmp_path / "o.tar"), batch_size=16, handler=h))
    assert h.count == 1 and keys == [f"k{i}" for i in range(50)] and (F == 1).all()


def test_truncated_shard_missing_field_wrong_size(tmp_path, X):
    pattern = write_array_shards(X, str(tmp_path / "f"), maxcount=40)  # 40 + 40 + 23
    data = (tmp_path / "f-000001.tar").read_bytes()
    (tmp_path / "f-000001.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DataError, match="f-000001.tar"):
        collect(WebDatasetSource(pattern, batch_size=16))
    h = SkipErrors()
    keys, _ = collect(WebDatasetSource(pattern, batch_size=16, handler=h))
    # Cut inside a header, which tarfile takes for the end of the archive: one error, naming
    # the shard, the byte and the last good sample; the sample being read when the cut came
    # is lost with the rest of the shard.
    assert h.count == 1 and keys[:40] == [f"{i:09d}" for i in range(40)] and keys[-23:] == \
        [f"{i:09d}" for i in range(80, 103)]
    assert re.search(r"invalid tar header at byte \d+.*after sample '0000000\d\d'.*f-000001\.tar", h.first)

    samples = [{"__key__": f"k{i}", "npy": X[i]} for i in range(6)]
    samples[2] = {"__key__": "k2", "cls": 1}
    samples[4] = {"__key__": "k4", "npy": X[4, :5]}
    _write(tmp_path / "m.tar", samples)
    with pytest.raises(DataError, match="missing field 'npy'.*m.tar.*sample 'k2'"):
        collect(WebDatasetSource(str(tmp_path / "m.tar")))
    h = SkipErrors()
    keys, _ = collect(WebDatasetSource(str(tmp_path / "m.tar"), handler=h))
    assert keys == ["k0", "k1", "k3", "k5"] and h.count == 2

    def skip_missing_only(exc):
        if "missing field" not in str(exc):
            raise exc

    with pytest.raises(DataError, match=r"shape \(5,\), expected \(8,\).*sample 'k4'"):
        collect(WebDatasetSource(str(tmp_path / "m.tar"), handler=skip_missing_only))


@pytest.mark.parametrize("layout", ["rows", "blocks"])
def test_shard_cut_at_a_header_is_not_taken_for_complete(tmp_path, X, layout):
    # Cut exactly at a member's header, the file is a valid tar archive to tarfile: only the
    # missing end-of-archive marker tells it lost its tail.
    pattern = write_array_shards(X, str(tmp_path / "f"), maxcount=40,
                                 rows_per_sample=1 if layout == "rows" else 8)  # 40 + 40 + 23 rows
    path = tmp_path / "f-000001.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    firsts = [m for i, m in enumerate(members)  # each sample's first member
              if i == 0 or m.name.split(".")[0] != members[i - 1].name.split(".")[0]]
    cut = firsts[len(firsts) // 2].offset
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with tarfile.open(path, "r|") as tar:
        assert 0 < len(tar.getnames()) < len(members)  # tarfile alone sees no damage
    with pytest.raises(DataError, match=r"unreadable shard.*end-of-archive.*f-000001\.tar"):
        collect(WebDatasetSource(pattern, batch_size=16))
    h = SkipErrors()
    ids, F = collect(WebDatasetSource(pattern, batch_size=16, handler=h))
    ids = [int(i) for i in ids]
    assert h.count == 1 and ids[:40] == list(range(40)) and ids[-23:] == list(range(80, 103))
    assert 0 < len(ids) - 63 < 40 and ids[40:-23] == list(range(40, len(ids) - 23))  # read before the cut
    np.testing.assert_array_equal(F, X[ids])

    # A compressed shard ends with its compressor's marker, not zeros: it is not mistaken for cut.
    (tmp_path / "z.tar.gz").write_bytes(gzip.compress(data))
    assert [int(i) for i in collect(WebDatasetSource(str(tmp_path / "z.tar.gz"), batch_size=16))[0]] == \
        list(range(40, 80))


def test_split_by_node_and_worker_are_disjoint(tmp_path, X, monkeypatch):
    pattern = write_array_shards(X, str(tmp_path / "f"), maxcount=10)  # 11 shards
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        keys, _ = collect(WebDatasetSource(pattern, batch_size=8))
        seen.append(set(keys))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 103
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    keys, F = collect(WebDatasetSource(pattern, batch_size=8, num_workers=2))
    assert sorted(keys) == [f"{i:09d}" for i in range(103)] and len(keys) == 103
    np.testing.assert_array_equal(F, X[[int(k) for k in keys]])


def test_image_folder_shards_and_encoder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("b_dog", "a_cat"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"x.{i}.jpg")
    pattern = write_image_folder_shards(tmp_path / "img", str(tmp_path / "sh" / "train"), maxcount=4)
    assert pattern.endswith("train-{000000..000002}.tar")
    samples = list(wds.WebDataset(pattern, shardshuffle=False))
    assert [s["__key__"] for s in samples][:2] == ["a_cat/x_0", "a_cat/x_1"]
    assert [int(s["cls"]) for s in samples] == [0] * 5 + [1] * 5
    assert [int(s["idx"]) for s in samples] == list(range(10))
    assert samples[0]["jpg"] == (tmp_path / "img" / "a_cat" / "x.0.jpg").read_bytes()  # not re-encoded
    mixed = write_image_folder_shards(tmp_path / "img", str(tmp_path / "mix" / "train"), maxcount=4, shuffle_seed=0)
    shuffled = list(wds.WebDataset(mixed, shardshuffle=False))
    by_key = {s["__key__"]: (int(s["cls"]), int(s["idx"]), s["jpg"]) for s in samples}
    assert {s["__key__"]: (int(s["cls"]), int(s["idx"]), s["jpg"]) for s in shuffled} == by_key
    assert [s["__key__"] for s in shuffled] != [s["__key__"] for s in samples]  # same samples, mixed order
    encoder = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())
    with pytest.raises(ValueError, match="encoder"):
        WebDatasetSource(pattern, field="jpg")
    keys, F = collect(WebDatasetSource(pattern, field="jpg", encoder=encoder, batch_size=4))
    assert len(keys) == 10 and F.shape == (10, 12) and 0 <= F.min() and F.max() <= 1


def test_input_kind_and_open_source(tmp_path, X):
    assert input_kind("a/b-{0000..0009}.tar") == "webdataset"
    assert input_kind(tmp_path) == "parquet"
    assert [input_kind(f"x{s}") for s in (".arrow", ".feather", ".ipc")] == ["parquet"] * 3
    with pytest.raises(ValueError, match="cannot tell"):
        input_kind("x.csv")
    np.save(tmp_path / "x.npy", X)
    src = open_source([tmp_path / "x.npy"], batch_size=50, field="npy", feature_column="e")
    assert isinstance(src, ArraySource) and len(list(src)) == 3


def test_prefetch_keeps_order_and_raises_in_place():
    def gen():
        yield from range(3)
        raise DataError("boom", source="f", key=3)

    out = []
    with pytest.raises(DataError, match="boom"):
        for v in prefetch(gen(), depth=1):
            out.append(v)
    assert out == [0, 1, 2]


def test_prefetch_pays_on_a_gpu_or_with_a_core_to_spare(monkeypatch):
    from streamcoke.data import batch

    monkeypatch.setattr(batch.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert not prefetch_pays() and not prefetch_pays("cpu")  # the step's threads hold every core
    assert prefetch_pays("cuda") and prefetch_pays(torch.device("cuda", 1))  # the step leaves the cores free
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert prefetch_pays("cpu")


def test_local_shards_read_as_webdataset_reads_them(tmp_path, X):
    # The member-by-member reader of local uncompressed shards must give the samples (keys,
    # fields, bytes) that webdataset's stream reader gives, leaving out what it leaves out.
    from streamcoke.data.tar_check import local_tar_path, shard_samples

    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        def add(name, payload):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        add("__meta__", b"ignored")
        tar.addfile(tarfile.TarInfo("folder"))  # a directory entry
        tar.getmember("folder").type = tarfile.DIRTYPE
        for i in range(5):
            buf = io.BytesIO()
            np.save(buf, X[i])
            add(f"{'a' * 120}/k{i}.npy", buf.getvalue())  # a long name: a GNU/pax header first
            add(f"{'a' * 120}/k{i}.cls", str(i).encode())
    ours = list(shard_samples({"url": str(path)}))
    theirs = list(wds.tarfile_samples([{"url": str(path)}]))
    assert local_tar_path(str(path)) == str(path) and local_tar_path(f"file:{path}") == str(path)
    assert [sorted(s) for s in ours] == [sorted(s) for s in theirs] and len(ours) == 5
    assert all(bytes(a[k]) == bytes(b[k]) for a, b in zip(ours, theirs) for k in a if not k.startswith("__"))
    assert all(a["__key__"] == b["__key__"] for a, b in zip(ours, theirs))
    writable = list(shard_samples({"url": str(path)}, writable=True))
    assert all(isinstance(s["npy"], bytearray) for s in writable)

    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(path.read_bytes()))
    assert local_tar_path(str(tmp_path / "s.tar.gz")) is None  # compressed: webdataset reads it
    assert [s["__key__"] for s in shard_samples({"url": str(tmp_path / "s.tar.gz")})] == [s["__key__"] for s in ours]

    # Cut inside a member's data: named, with the last sample yielded (a sample is complete
    # only once the next one starts, so k2 goes with k3, as in webdataset's reader).
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        cut = tar.getmember(f"{'a' * 120}/k3.npy").offset_data + 10
    path.write_bytes(data[:cut])
    got = []
    with pytest.raises(DataError, match=r"unreadable shard.*end of data.*k3\.npy.*after sample '.*k1'.*s\.tar"):
        for s in shard_samples({"url": str(path)}):
            got.append(s["__key__"])
    assert got == [f"{'a' * 120}/k{i}" for i in range(2)]
