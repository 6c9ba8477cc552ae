"""Shards of one row per sample read as arrays (streamcoke.data.tar_rows): the same ids and
rows as webdataset's own reader gives, on regular shards and on every way a shard can stop
being regular."""

import io
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamcoke.data import DataError, SkipErrors, WebDatasetSource
from streamcoke.core.cpu import use_cpu_kernels
from streamcoke.data import tar_rows, webdataset_source
from streamcoke.data.tar_check import shard_samples
from streamcoke.io.shards import write_array_shards


@pytest.fixture
def X():
    return np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)


def collect(source):
    ids, rows = [], []
    for b in source:
        ids.extend(np.asarray(b.ids).tolist())
        rows.append(b.features.numpy())
    return ids, np.concatenate(rows) if rows else np.zeros((0, 8), np.float32)


def webdataset_reads(path):
    """The oracle: webdataset's reader, the npy field decoded with numpy."""
    ids, rows = [], []
    for s in wds.WebDataset(str(path), shardshuffle=False):
        if "npy" in s:
            ids.append(s["__key__"])
            rows.append(np.load(io.BytesIO(s["npy"]), allow_pickle=False).astype(np.float32).reshape(-1))
    return ids, np.stack(rows)


def runs_of(path):
    """(rows read as arrays, offset where the member-by-member reader takes over)."""
    with open(path, "rb") as f:
        it, n = tar_rows.row_runs(f), 0
        while True:
            try:
                n += len(next(it).rows)
            except StopIteration as stop:
                return n, stop.value


def npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


@pytest.mark.parametrize("compiled", [True, False])  # the header checks of tar_scan.cpp, or numpy's
@pytest.mark.parametrize("kind", ["pax", "array_shards", "dirs", "float64"])
def test_regular_shards_read_as_arrays_match_webdataset(tmp_path, X, kind, compiled):
    path = tmp_path / "s.tar"
    if kind == "array_shards":  # KEY.idx + KEY.npy, integer mtime: no pax headers
        path = write_array_shards(X, str(tmp_path / "s"), maxcount=1000)
    elif kind == "dirs":
        write(path, [{"__key__": f"part/{i}", "npy": X[i]} for i in range(len(X))])  # keys grow 0..299
    else:
        dtype = np.float64 if kind == "float64" else np.float32
        write(path, [{"__key__": f"k{i}", "npy": X[i].astype(dtype)} for i in range(len(X))])
    with use_cpu_kernels(compiled):
        n, _ = runs_of(path)
        ids, F = collect(WebDatasetSource(str(path), batch_size=64))
    assert n >= len(X) - 4  # all but the held-back sample of every layout
    want_ids, want = webdataset_reads(path)
    assert ids == want_ids and len(ids) == len(X)
    np.testing.assert_array_equal(F, want)


def test_irregular_samples_go_member_by_member(tmp_path, X):
    samples = [{"__key__": "__meta__x", "npy": X[0]}]  # webdataset metadata name: not a row
    samples += [{"__key__": f"k{i:03d}", "npy": X[i]} for i in range(1, 60)]
    samples += [{"__key__": "blk", "npy": X[:5], "ids.npy": np.arange(500, 505)}]  # a block
    samples += [{"__key__": f"k{i:03d}", "npy": X[i]} for i in range(60, 120)]
    samples += [{"__key__": "wide", "npy": np.ones(9, np.float32)}]  # another size
    samples += [{"__key__": f"k{i:03d}", "npy": X[i]} for i in range(120, 200)]
    write(tmp_path / "m.tar", samples)
    h = SkipErrors()
    ids, F = collect(WebDatasetSource(str(tmp_path / "m.tar"), batch_size=32, handler=h))
    assert h.count == 1 and "shape (9,), expected (8,)" in h.first
    want = ["__meta__x"] + [f"k{i:03d}" for i in range(1, 60)] + [str(i) for i in range(500, 505)] + \
        [f"k{i:03d}" for i in range(60, 200)]
    assert [str(i) for i in ids] == want
    np.testing.assert_array_equal(F, np.concatenate([X[:60], X[:5], X[60:200]]))


def test_a_damaged_header_is_an_error_naming_shard_byte_and_sample(tmp_path, X):
    # webdataset's reader (tarfile) ends a shard quietly at a damaged header past the first;
    # here it is an error, after the samples before it, whichever reader met it.
    path = tmp_path / "d.tar"
    write(path, [{"__key__": f"k{i:03d}", "npy": X[i]} for i in range(len(X))])
    with tarfile.open(path) as tar:
        at = tar.getmember("k150.npy").offset
    data = bytearray(path.read_bytes())
    data[at + 2] ^= 0x01  # its pax header's name: the checksum no longer matches
    path.write_bytes(bytes(data))
    n, resume = runs_of(path)
    assert n < 150 and resume <= at  # the arrays stop before the damage
    assert 0 < len(webdataset_reads(path)[0]) <= 150  # what webdataset makes of it: fewer samples
    with pytest.raises(DataError, match=rf"invalid tar header at byte {at}\) after sample 'k148'.*d\.tar"):
        collect(WebDatasetSource(str(path), batch_size=64))
    h = SkipErrors()
    ids, F = collect(WebDatasetSource(str(path), batch_size=64, handler=h))
    assert h.count == 1 and ids == [f"k{i:03d}" for i in range(149)]  # k149 went with the shard's rest
    np.testing.assert_array_equal(F, X[:149])


def test_duplicate_adjacent_keys_are_not_read_as_two_rows(tmp_path, X, monkeypatch):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate([f"k{i:03d}" for i in range(50)] + ["k049"] + [f"k{i:03d}" for i in range(50, 99)]):
            payload = npy(X[i])
            info = tarfile.TarInfo(f"{key}.npy")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    n, _ = runs_of(path)
    assert 0 < n < 50  # the run stops before the repeated key
    h, h_members = SkipErrors(), SkipErrors()
    ids, F = collect(WebDatasetSource(str(path), batch_size=16, handler=h))
    with monkeypatch.context() as m:
        m.setattr(webdataset_source, "shard_samples",
                  lambda shard, writable=False, rows_field=None: shard_samples(shard, writable))
        want, want_F = collect(WebDatasetSource(str(path), batch_size=16, handler=h_members))
    assert ids == want and h.count == h_members.count == 1 and h.first == h_members.first
    assert "duplicate" in h.first and ids == [f"k{i:03d}" for i in range(49)]
    np.testing.assert_array_equal(F, want_F)


def test_bad_rows_in_a_run_are_named(tmp_path, X):
    Xb = X.copy()
    Xb[77, 3] = np.nan
    path = tmp_path / "n.tar"
    write(path, [{"__key__": f"k{i:03d}", "npy": Xb[i]} for i in range(len(X))])
    with pytest.raises(DataError, match=r"NaN or infinity.*n\.tar.*sample 'k077'"):
        collect(WebDatasetSource(str(path), batch_size=64))
    h = SkipErrors()
    ids, F = collect(WebDatasetSource(str(path), batch_size=64, handler=h))
    assert h.count == 1 and "k077" not in ids and len(ids) == len(X) - 1
    np.testing.assert_array_equal(F, np.delete(X, 77, 0))
    with pytest.raises(DataError, match=r"shape \(8,\), expected \(5,\).*sample 'k000'"):
        collect(WebDatasetSource(str(path), batch_size=64, n_features=5))


def test_chunks_much_smaller_than_a_shard(tmp_path, X, monkeypatch):
    monkeypatch.setattr(tar_rows, "CHUNK_BYTES", 3 * 2560)  # a few samples a chunk
    path = write_array_shards(X, str(tmp_path / "c"), maxcount=1000)
    ids, F = collect(WebDatasetSource(path, batch_size=50))
    assert ids == [f"{i:09d}" for i in range(len(X))]
    np.testing.assert_array_equal(F, X)


@pytest.mark.parametrize("kind", ["pax", "array_shards"])
def test_compiled_header_check_agrees_with_numpy(tmp_path, X, kind):
    from streamcoke.core import cpu

    if cpu.kernels() is None:
        pytest.skip("the CPU kernels are not built here")
    if kind == "pax":
        path = tmp_path / "s.tar"
        write(path, [{"__key__": f"k{i:04d}", "npy": X[i % len(X)]} for i in range(2000)])
    else:
        path = write_array_shards(np.tile(X, (7, 1)), str(tmp_path / "s"), maxcount=5000)
    with open(path, "rb") as f:
        lay = tar_rows._layout(f, 0, "npy")
        f.seek(0)
        data = f.read(1500 * lay.stride)
    v = np.frombuffer(bytearray(data), np.uint8).reshape(1500, lay.stride).copy()
    # Every row but the first gets one byte changed, most in the headers; some rows repeat the
    # key of the row before.
    rng = np.random.default_rng(1)
    headers = np.concatenate([np.arange(m.at, m.at + (3 if m.pax else 1) * 512) for m in lay.members])
    where = np.where(rng.random(1499) < 0.7, rng.choice(headers, 1499), rng.integers(0, lay.stride, 1499))
    v[np.arange(1, 1500), where] = rng.integers(0, 256, 1499)
    first = lay.members[0].at + (1024 if lay.members[0].pax else 0)
    for r in rng.choice(np.arange(2, 1500), 20, replace=False):
        v[r, first:first + len(lay.key)] = v[r - 1, first:first + len(lay.key)]
    previous = np.frombuffer(b"x" * len(lay.key), np.uint8)
    for prev in (None, previous, v[0, first:first + len(lay.key)].copy()):
        fast = tar_rows._conforming(v, lay, prev)
        slow = tar_rows._conforming_numpy(v, lay, prev)
        np.testing.assert_array_equal(fast, slow)
        assert slow.sum() > 20 and not slow.all()  # both kinds of row are there


def _member_by_member(monkeypatch, source):
    with monkeypatch.context() as m:
        m.setattr(webdataset_source, "shard_samples",
                  lambda shard, writable=False, rows_field=None: shard_samples(shard, writable))
        return source()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_shard_reads_as_member_by_member(tmp_path_factory, monkeypatch, data):
    # Runs of regular samples broken by every kind of irregular one, and perhaps a damaged or cut
    # file: the arrays and the member-by-member reader give the same ids, rows and errors.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    kinds = data.draw(st.lists(st.sampled_from(["row", "row", "row", "idx", "wide", "block", "cls", "nan", "upper"]),
                               min_size=1, max_size=60))
    names = data.draw(st.sampled_from(["k{}", "s{:05d}", "d/k{}", "a.b/k{}"]))  # growing, fixed, in folders
    samples = []
    for i, kind in enumerate(kinds):
        key = names.format(i)
        x = rng.normal(size=4).astype(np.float32)
        if kind == "idx":
            samples.append({"__key__": key, "npy": x, "idx": str(i).encode()})
        elif kind == "wide":
            samples.append({"__key__": key, "npy": np.ones(5, np.float32)})
        elif kind == "block":
            samples.append({"__key__": key, "npy": rng.normal(size=(3, 4)).astype(np.float32),
                            "ids.npy": np.arange(3) + 1000 * i})
        elif kind == "cls":
            samples.append({"__key__": key, "cls": b"1"})
        elif kind == "upper":  # webdataset lowercases the extension
            samples.append({"__key__": key, "NPY": npy(x)})
        else:
            if kind == "nan":
                x[1] = np.nan
            samples.append({"__key__": key, "npy": x})
    path = tmp_path_factory.mktemp("shard") / "s.tar"
    write(path, samples)
    damage = data.draw(st.sampled_from(["none", "none", "flip", "cut"]))
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    elif damage == "cut":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    path.write_bytes(bytes(raw))
    batch = data.draw(st.integers(1, 16))

    def read():
        h = SkipErrors()
        ids, F = collect(WebDatasetSource(str(path), batch_size=batch, handler=h))
        return [str(i) for i in ids], F, h.count, h.first

    got, want = read(), _member_by_member(monkeypatch, read)
    assert got[0] == want[0] and got[2:] == want[2:]
    np.testing.assert_array_equal(got[1], want[1])


def _rss_anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_large_shard_streams_in_flat_memory(tmp_path):
    # 30,000 rows of 128 floats, 77 MB of tar: read a chunk at a time, never whole.
    rows = np.ones((30_000, 128), np.float32)
    path = write_array_shards(rows, str(tmp_path / "big"), maxcount=30_000)
    assert os.path.getsize(path) > 70e6
    before, grown, n = _rss_anon_kib(), 0, 0
    for b in WebDatasetSource(path, batch_size=1024):
        n += len(b.ids)
        grown = max(grown, _rss_anon_kib() - before)
    assert n == 30_000
    assert grown < 24 * 1024  # a 4 MiB chunk, its rows and a batch or two; not the 77 MB shard
