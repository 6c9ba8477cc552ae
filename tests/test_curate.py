"""Cluster-balanced sampling: exactly min(m, n_k) per cluster, the right ones, in one pass."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcoke.cli import main
from streamcoke.curate import ClusterBalancedSampler, balanced_subset
from streamcoke.curate import balanced as balanced_module
from streamcoke.io.labels import ParquetLabelSink


@st.composite
def labelled_streams(draw):
    n = draw(st.integers(0, 300))
    k = draw(st.integers(1, 12))
    labels = np.array(draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)), np.int64)
    sims = np.array(draw(st.lists(st.floats(-1, 1, width=32), min_size=n, max_size=n)), np.float64)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    return labels, sims, [0] + cuts + [n]


def _feed(sampler, labels, sims, cuts):
    for a, b in zip(cuts[:-1], cuts[1:]):
        sampler.update(np.arange(a, b), labels[a:b], sims[a:b])
    return sampler.result()


@settings(max_examples=60, deadline=None)
@given(labelled_streams(), st.integers(1, 20), st.sampled_from(["random", "nearest"]))
def test_every_cluster_keeps_min_of_m_and_its_size(stream, m, pick):
    labels, sims, cuts = stream
    ids, kept = _feed(ClusterBalancedSampler(m, pick=pick, random_state=0), labels, sims, cuts)
    sizes = np.bincount(labels, minlength=12)
    assert np.array_equal(np.bincount(kept.astype(np.int64), minlength=12), np.minimum(sizes, m))
    assert len(set(ids.tolist())) == len(ids)                       # no sample twice
    assert np.array_equal(labels[ids.astype(np.int64)], kept)       # each with its own label


@settings(max_examples=60, deadline=None)
@given(labelled_streams(), st.integers(1, 20))
def test_nearest_keeps_each_clusters_most_similar_samples_first_come_on_ties(stream, m):
    labels, sims, cuts = stream
    ids, kept = _feed(ClusterBalancedSampler(m, pick="nearest"), labels, sims, cuts)
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        best = members[np.lexsort((members, -sims[members]))][:m]   # most similar, then earliest
        assert ids[kept == k].tolist() == best.tolist()


def test_small_buffers_give_the_same_result(monkeypatch):
    g = np.random.default_rng(0)
    labels, sims = g.integers(0, 30, 5000), g.normal(size=5000)
    cuts = list(range(0, 5001, 100))
    reference = _feed(ClusterBalancedSampler(7, pick="nearest"), labels, sims, cuts)
    monkeypatch.setattr(balanced_module, "MIN_BUFFER", 10)  # cut back after almost every batch
    again = _feed(ClusterBalancedSampler(7, pick="nearest"), labels, sims, cuts)
    assert all(np.array_equal(a, b) for a, b in zip(reference, again))
    r_ids, _ = _feed(ClusterBalancedSampler(7, random_state=3), labels, sims, cuts)
    s_ids, _ = _feed(ClusterBalancedSampler(7, random_state=3), labels, sims, cuts)
    assert np.array_equal(r_ids, s_ids)  # seeded


def test_random_pick_is_uniform_within_a_cluster():
    # 10 samples in one cluster, keep 3: each should be kept 3/10 of the time.
    hits = np.zeros(10)
    for seed in range(2000):
        sampler = ClusterBalancedSampler(3, random_state=seed)
        sampler.update(np.arange(5), np.zeros(5, np.int64)).update(np.arange(5, 10), np.zeros(5, np.int64))
        hits[sampler.result()[0]] += 1
    assert np.allclose(hits / 2000, 0.3, atol=0.04)  # 4 standard deviations of a binomial(2000, 0.3) share


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="per_cluster must be a positive integer"):
        ClusterBalancedSampler(0)
    with pytest.raises(ValueError, match="pick must be one of"):
        ClusterBalancedSampler(3, pick="far")
    s = ClusterBalancedSampler(3, pick="nearest")
    with pytest.raises(ValueError, match="needs the similarity"):
        s.update([1, 2], [0, 1])
    with pytest.raises(ValueError, match="labels must be >= 0"):
        s.update([1, 2], [0, -1], [0.5, 0.5])
    with pytest.raises(ValueError, match="one length"):
        s.update([1, 2, 3], [0, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        s.update([1, 2], [0, 1], [0.5, np.nan])
    assert s.n_samples_seen_ == 0  # nothing half-applied


def _label_file(path, n=3000, k=20, epochs=(0, 1), n_clusterings=1):
    g = np.random.default_rng(1)
    with ParquetLabelSink(path, n_clusterings) as sink:
        for e in epochs:
            for s in range(0, n, 500):
                rows = min(500, n - s)
                sink.write(np.arange(s, s + rows), g.integers(0, k, (rows, n_clusterings)).squeeze(1)
                           if n_clusterings == 1 else g.integers(0, k, (rows, n_clusterings)),
                           g.random((rows, n_clusterings)).squeeze(1) if n_clusterings == 1
                           else g.random((rows, n_clusterings)), epoch=e)
    return path


def test_balanced_subset_of_a_label_file(tmp_path):
    labels = _label_file(tmp_path / "labels.parquet")
    summary = balanced_subset(labels, tmp_path / "subset.parquet", 40, pick="nearest")
    out = pq.read_table(tmp_path / "subset.parquet").to_pandas()
    table = pq.read_table(labels).to_pandas()
    last = table[table.epoch == 1]
    assert summary["epoch"] == 1 and summary["rows"] == len(last) == 3000
    assert summary["kept"] == len(out) == int(np.minimum(last.label.value_counts(), 40).sum())
    for k, group in out.groupby("label"):
        members = last[last.label == k].sort_values("similarity", ascending=False, kind="stable")
        assert set(group.id) == set(members.id[:40])
    bare = tmp_path / "no_stats.parquet"  # a file without column statistics: the epochs are read
    pq.write_table(pq.read_table(labels), bare, write_statistics=False)
    assert balanced_subset(bare, tmp_path / "b.parquet", 40, pick="nearest")["epoch"] == 1
    first = balanced_subset(labels, tmp_path / "first.parquet", 40, epoch=0)
    assert first["epoch"] == 0 and first["rows"] == 3000
    multi = _label_file(tmp_path / "multi.parquet", n_clusterings=2, epochs=(0,))
    assert balanced_subset(multi, tmp_path / "m.parquet", 5, clustering=1)["kept"] == 100
    with pytest.raises(ValueError, match="no column 'label_2'"):
        balanced_subset(multi, tmp_path / "m.parquet", 5, clustering=2)
    pq.write_table(pa.table({"id": [1, 2]}), tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="no column 'label'.*streamcoke cluster --out"):
        balanced_subset(tmp_path / "plain.parquet", tmp_path / "x.parquet", 5)
    assert not (tmp_path / "x.parquet").exists()


def test_sample_command(tmp_path, capsys):
    labels = _label_file(tmp_path / "labels.parquet")
    assert main(["sample", str(labels), "--per-cluster", "10", "--out", str(tmp_path / "s.parquet")]) == 0
    assert "kept 200 of 3,000 samples from 20 clusters" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "s.parquet").num_rows == 200
    with pytest.raises(SystemExit, match="cannot read the label file"):
        main(["sample", str(tmp_path / "missing.parquet"), "--per-cluster", "10", "--out", str(tmp_path / "t.parquet")])
