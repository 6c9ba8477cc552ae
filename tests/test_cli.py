"""`streamcoke cluster` and `streamcoke shards`, run in-process through ``main``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamcoke import MultiOnlineConstrainedKMeans, OnlineConstrainedKMeans
from streamcoke.cli import main
from streamcoke.datasets import imbalanced_mixture


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    X, _, _ = imbalanced_mixture(3000, 12, 16, random_state=0)
    np.save(d / "x.npy", X)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), 16)
    pq.write_table(pa.table({"id": np.arange(len(X)), "embedding": emb}), d / "x.parquet", row_group_size=500)
    return d, X


def run(capsys, *argv):
    assert main(["cluster", "--quiet", *map(str, argv)]) == 0
    return capsys.readouterr().out


def test_digits_main_job(capsys):
    out = run(capsys)
    lines = out.splitlines()
    assert lines[0].startswith("clustered 1797 samples x 5 epochs into 10 clusters")
    assert lines[1].startswith("cluster sizes (last epoch): min ")
    assert lines[2].startswith("duality gap of the last epoch: ")
    assert lines[3].startswith("digits (1797 images, 10 classes): ACC ") and "NMI" in lines[3] and "ARI" in lines[3]


def test_parquet_labels_and_similarity(capsys, data, tmp_path):
    d, X = data
    out = run(capsys, d / "x.parquet", "--n-clusters", 12, "--batch-size", 128, "--epochs", 2,
              "--out", tmp_path / "l.parquet", "--save", tmp_path / "m.st")
    assert "labels written to" in out
    t = pq.read_table(tmp_path / "l.parquet").to_pydict()
    assert t["id"] == list(range(3000)) and set(t["epoch"]) == {1}
    km = OnlineConstrainedKMeans.load(tmp_path / "m.st")
    assert km.n_samples_seen_ == 6000 and not (tmp_path / "l.parquet.ckpt").exists()
    # Each batch is scored against the centers that assigned it: replaying the run batch by
    # batch, every row's similarity is the transform of the centers as they were before its step.
    replay = OnlineConstrainedKMeans(12, random_state=0)
    batches = [X[s:s + 128] for s in range(0, 3000, 128)]
    for b in batches:
        replay.partial_fit(b)
    replay.end_epoch()
    labels, sims = [], []
    for b in batches:
        C = replay.cluster_centers_
        replay.partial_fit(b)
        labels.append(replay.labels_)
        sims.append((b / np.linalg.norm(b, axis=1, keepdims=True) @ C.T)[np.arange(len(b)), replay.labels_])
    assert t["label"] == np.concatenate(labels).tolist()
    np.testing.assert_allclose(t["similarity"], np.concatenate(sims), atol=1e-5)


def test_npy_parquet_and_block_shards_give_the_same_labels(capsys, data, tmp_path):
    d, _ = data
    assert main(["shards", str(d / "x.npy"), "--prefix", str(tmp_path / "sh" / "b"), "--maxcount", "1000",
                 "--rows-per-sample", "64"]) == 0
    pattern = capsys.readouterr().out.strip()
    assert pattern.endswith("b-{000000..000002}.tar")  # 1000 rows a shard: 16 blocks of 64
    inputs = {"npy": d / "x.npy", "parquet": d / "x.parquet", "blocks": pattern}
    for name, path in inputs.items():
        out = run(capsys, path, "--n-clusters", 12, "--batch-size", 200, "--epochs", 2, "--out", tmp_path / f"{name}.pq")
        assert "samples/s after the first batch)" in out.splitlines()[0]
    tables = {n: pq.read_table(tmp_path / f"{n}.pq").to_pydict() for n in inputs}
    assert tables["npy"]["label"] == tables["parquet"]["label"] == tables["blocks"]["label"]
    assert tables["blocks"]["id"] == list(range(3000))  # block ids are the row numbers


def test_shards_rows_per_sample_checks(data, tmp_path):
    d, _ = data
    with pytest.raises(SystemExit, match="at least 1"):
        main(["shards", str(d / "x.npy"), "--prefix", str(tmp_path / "b"), "--rows-per-sample", "0"])


def test_resume_gives_the_same_labels(capsys, data, tmp_path, monkeypatch):
    d, _ = data
    args = [d / "x.parquet", "--n-clusters", 12, "--batch-size", 100, "--epochs", 3, "--all-epochs",
            "--checkpoint-every", 7, "--save", tmp_path / "m.st"]
    run(capsys, *args, "--out", tmp_path / "full.parquet")

    real, calls = OnlineConstrainedKMeans.partial_fit, [0]

    def dies(self, X, *a, **k):
        calls[0] += 1
        if calls[0] == 50:  # epoch 1, batch 20: after the checkpoint at batch 14 of that epoch
            raise KeyboardInterrupt
        return real(self, X, *a, **k)

    monkeypatch.setattr(OnlineConstrainedKMeans, "partial_fit", dies)
    out = tmp_path / "part.parquet"
    with pytest.raises(KeyboardInterrupt):
        run(capsys, *args, "--out", out)
    assert not out.exists() and (tmp_path / "part.parquet.ckpt").exists()
    monkeypatch.setattr(OnlineConstrainedKMeans, "partial_fit", real)
    with pytest.raises(SystemExit, match="different options.*batch_size"):
        run(capsys, *args[:3], "--batch-size", 50, *args[5:], "--out", out, "--resume")
    with pytest.raises(SystemExit, match=r"different options \(dual_lr\)"):
        run(capsys, *args, "--dual-lr", 0.01, "--out", out, "--resume")
    run(capsys, *args, "--out", out, "--resume")
    full, part = pq.read_table(tmp_path / "full.parquet"), pq.read_table(out)
    assert part.num_rows == 9000 and part.to_pydict() == full.to_pydict()
    assert not (tmp_path / "part.parquet.ckpt").exists()


def test_several_clusterings(capsys, data, tmp_path):
    d, _ = data
    run(capsys, d / "x.npy", "--n-clusters", 4, 9, "--batch-size", 256, "--epochs", 1,
        "--out", tmp_path / "l.parquet", "--save", tmp_path / "m.st")
    t = pq.read_table(tmp_path / "l.parquet")
    assert t.schema.names == ["id", "label_0", "label_1", "similarity_0", "similarity_1", "epoch"]
    assert max(t.column("label_0").to_pylist()) < 4 and max(t.column("label_1").to_pylist()) == 8
    assert MultiOnlineConstrainedKMeans.load(tmp_path / "m.st").n_clusters == (4, 9)


def test_shards_bad_input_and_skip(capsys, data, tmp_path):
    d, X = data
    assert main(["shards", str(d / "x.npy"), "--prefix", str(tmp_path / "sh" / "x"), "--maxcount", "1000"]) == 0
    pattern = capsys.readouterr().out.strip()
    assert pattern.endswith("x-{000000..000002}.tar")
    bad = tmp_path / "sh" / "x-000001.tar"
    bad.write_bytes(bad.read_bytes()[:200_000])
    with pytest.raises(SystemExit, match="x-000001.tar"):
        run(capsys, pattern, "--n-clusters", 12, "--epochs", 1, "--out", tmp_path / "l.parquet")
    assert not (tmp_path / "l.parquet").exists()
    out = run(capsys, pattern, "--n-clusters", 12, "--epochs", 1, "--out", tmp_path / "l.parquet",
              "--on-error", "skip")
    # one error, for the shard cut inside a header; the rest of that shard is skipped with it
    assert "skipped 1 bad sample (first: unreadable shard (ReadError: invalid tar header at byte" in out
    ids = pq.read_table(tmp_path / "l.parquet").column("id").to_pylist()
    assert ids[:1000] == [f"{i:09d}" for i in range(1000)] and ids[-1000:] == [f"{i:09d}" for i in range(2000, 3000)]


def test_prefetch_on_and_off_give_the_same_labels_and_errors(capsys, data, tmp_path):
    # Reading ahead in a thread or between steps changes only when the reading happens.
    d, _ = data
    assert main(["shards", str(d / "x.npy"), "--prefix", str(tmp_path / "sh" / "x"), "--maxcount", "1000"]) == 0
    pattern = capsys.readouterr().out.strip()
    bad = tmp_path / "sh" / "x-000001.tar"
    bad.write_bytes(bad.read_bytes()[:200_000])
    for mode in ("on", "off"):
        with pytest.raises(SystemExit, match="x-000001.tar"):
            run(capsys, pattern, "--n-clusters", 12, "--epochs", 1, "--prefetch", mode, "--out", tmp_path / "raised.pq")
        assert not (tmp_path / "raised.pq").exists()
        out = run(capsys, pattern, "--n-clusters", 12, "--batch-size", 200, "--epochs", 2, "--on-error", "skip",
                  "--prefetch", mode, "--out", tmp_path / f"{mode}.pq")
        assert "skipped 2 bad samples" in out  # the cut shard, once an epoch
    on, off = (pq.read_table(tmp_path / f"{m}.pq").to_pydict() for m in ("on", "off"))
    assert on == off
    assert on["id"][:1000] == [f"{i:09d}" for i in range(1000)] and on["id"][-1000:] == [f"{i:09d}" for i in range(2000, 3000)]


def test_constant_dual_step_option(capsys, data, tmp_path):
    d, _ = data
    run(capsys, d / "x.parquet", "--n-clusters", 12, "--batch-size", 100, "--epochs", 1, "--dual-lr", 0.05,
        "--save", tmp_path / "m.st")
    assert OnlineConstrainedKMeans.load(tmp_path / "m.st").dual_lr == 0.05
