"""The estimator's contract: results, attributes, bad input, persistence, several clusterings."""

import pickle

import numpy as np
import pytest
import torch

from streamcoke import MultiOnlineConstrainedKMeans, OnlineConstrainedKMeans
from streamcoke.datasets import imbalanced_mixture


def _state(km):
    """A deep snapshot of everything the model holds."""
    sd = km.state_dict()
    return {k: v.clone() for k, v in sd["tensors"].items()}, sd["meta"]


def _assert_same_state(a, b):
    ta, ma = a
    tb, mb = b
    assert ma == mb
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture
def stream():
    X, y, _ = imbalanced_mixture(3000, 8, 16, random_state=0)
    return X, y


def test_partial_fit_numpy_in_numpy_out(stream):
    X, _ = stream
    km = OnlineConstrainedKMeans(10, random_state=0)
    assert km.partial_fit(X[:500]) is km
    assert isinstance(km.labels_, np.ndarray) and km.labels_.shape == (500,) and km.labels_.dtype == np.int64
    assert km.cluster_centers_.shape == (10, 16) and isinstance(km.cluster_centers_, np.ndarray)
    assert km.n_features_in_ == 16 and km.n_samples_seen_ == 500 and km.n_steps_ == 1
    assert km.predict(X[:7]).shape == (7,)
    assert km.transform(X[:7]).shape == (7, 10)
    assert (km.duals_ >= 0).all()


def test_torch_in_torch_out(stream):
    X, _ = stream
    Xt = torch.from_numpy(X)
    km = OnlineConstrainedKMeans(10, random_state=0).partial_fit(Xt[:500])
    assert isinstance(km.labels_, torch.Tensor) and km.labels_.device == Xt.device
    assert isinstance(km.predict(Xt[:5]), torch.Tensor)
    assert isinstance(km.transform(Xt[:5]), torch.Tensor)
    assert isinstance(km.cluster_centers_, torch.Tensor)



def test_numpy_batches_of_any_layout_match_torch_batches(stream, tmp_path):
    # After the first batch, plain float arrays skip scikit-learn's validation; float64,
    # read-only, Fortran-ordered and memory-mapped batches must still give the same steps.
    X, _ = stream
    X32 = X.astype(np.float32)
    np.save(tmp_path / "x.npy", X32)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    readonly = X32.copy()
    readonly.flags.writeable = False
    kinds = {"float32": X32, "float64": X32.astype(np.float64), "read-only": readonly,
             "fortran": np.asfortranarray(X32), "memmap": mapped}
    ref = OnlineConstrainedKMeans(10, random_state=0)
    ref_labels = [ref.partial_fit(torch.from_numpy(X32[s:s + 300])).labels_.numpy() for s in range(0, 1500, 300)]
    for name, A in kinds.items():
        km = OnlineConstrainedKMeans(10, random_state=0)
        labels = [km.partial_fit(A[s:s + 300]).labels_ for s in range(0, 1500, 300)]
        assert all(np.array_equal(a, b) for a, b in zip(labels, ref_labels)), name
        assert np.array_equal(km.cluster_centers_, ref.cluster_centers_.numpy()), name
    assert np.array_equal(X32, np.load(tmp_path / "x.npy"))  # the caller's data untouched

@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("center_update", ["mean", "ema"])
def test_assigned_similarity_is_the_score_against_the_centers_before_the_step(stream, metric, center_update):
    X, _ = stream
    km = OnlineConstrainedKMeans(10, metric=metric, center_update=center_update, random_state=0)
    km.partial_fit(X[:500])
    assert km.assigned_similarity_.shape == (500,) and km.assigned_similarity_.dtype == np.float32
    before = OnlineConstrainedKMeans(10, metric=metric, init=km.cluster_centers_, center_update="none")
    before.partial_fit(X[:500])  # only to fit; transform uses the given centers
    km.partial_fit(X[500:1300])
    S = before.transform(X[500:1300])
    if metric == "euclidean":
        S = -S ** 2  # transform gives distances; the similarity is minus the squared distance
    expect = S[np.arange(800), km.labels_]
    np.testing.assert_allclose(km.assigned_similarity_, expect, rtol=1e-5, atol=1e-4)
    # the step moved the centers, so today's transform gives other values
    moved = km.transform(X[500:1300])[np.arange(800), km.labels_]
    assert not np.allclose(km.assigned_similarity_, -moved ** 2 if metric == "euclidean" else moved, atol=1e-4)
    # fit keeps one value per row of the last pass, in the order of X
    fitted = OnlineConstrainedKMeans(10, metric=metric, n_epochs=2, random_state=0).fit(X)
    assert fitted.assigned_similarity_.shape == (len(X),) and np.isfinite(fitted.assigned_similarity_).all()


def test_assigned_similarity_per_clustering_and_after_loading(stream, tmp_path):
    X, _ = stream
    m = MultiOnlineConstrainedKMeans((3, 5), random_state=0).partial_fit(torch.from_numpy(X[:500]))
    assert isinstance(m.assigned_similarity_, torch.Tensor) and m.assigned_similarity_.shape == (500, 2)
    for h, k in enumerate((3, 5)):
        single = OnlineConstrainedKMeans(k, init=m.published_centers_[h], center_update="none")
        S = single.partial_fit(X[:500]).transform(X[:500])
        assert torch.allclose(m.assigned_similarity_[:, h], torch.from_numpy(S[np.arange(500), m.labels_[:, h].numpy()]),
                              atol=1e-5)
    m.save(tmp_path / "m.st")
    assert torch.equal(MultiOnlineConstrainedKMeans.load(tmp_path / "m.st").assigned_similarity_,
                       m.assigned_similarity_)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_inputs_are_accepted(stream, dtype):
    X, _ = stream
    ref = OnlineConstrainedKMeans(10, random_state=0).partial_fit(torch.from_numpy(X[:500]))
    km = OnlineConstrainedKMeans(10, random_state=0).partial_fit(torch.from_numpy(X[:500]).to(dtype))
    agree = (km.labels_ == ref.labels_).float().mean().item()
    assert agree > 0.95  # rounding of the inputs only flips near-ties


def test_constraint_holds_on_an_imbalanced_stream():
    X, _, _ = imbalanced_mixture(20000, 8, 16, random_state=0)
    # Unconstrained k-means leaves some clusters nearly empty on this stream ...
    free = OnlineConstrainedKMeans(10, min_size_ratio=0.0, center_update="none", random_state=0)
    for b in np.array_split(X, 100):
        free.partial_fit(b)
    floor = 0.6 * len(X) / 10
    assert free.cluster_sizes_.min() < 0.5 * floor
    # ... the constraint gives every cluster its share, up to a small online slack.
    km = OnlineConstrainedKMeans(10, min_size_ratio=0.6, center_update="none", random_state=0)
    for b in np.array_split(X, 100):
        km.partial_fit(b)
    shortfall = np.clip(floor - km.cluster_sizes_, 0, None).sum()
    assert shortfall <= 0.01 * 0.6 * len(X)
    assert km.cluster_sizes_.sum() == len(X)


def test_max_size_ratio_caps_clusters(stream):
    X, _ = stream
    km = OnlineConstrainedKMeans(6, min_size_ratio=0.0, max_size_ratio=1.5, center_update="none", random_state=0)
    for b in np.array_split(X, 30):
        km.partial_fit(b)
    cap = 1.5 * len(X) / 6
    assert np.clip(km.cluster_sizes_ - cap, 0, None).sum() <= 0.05 * len(X)
    assert (km.upper_duals_ > 0).any()


def test_fit_predict_and_epochs(stream):
    X, y = stream
    km = OnlineConstrainedKMeans(8, batch_size=256, n_epochs=3, random_state=0)
    labels = km.fit_predict(X)
    assert np.array_equal(labels, km.labels_)
    assert km.n_epochs_completed_ == 3 and km.n_samples_seen_ == 3 * len(X)
    assert np.array_equal(km.published_centers_, km.cluster_centers_)
    assert km.last_epoch_cluster_sizes_.sum() == len(X)
    assert km.cluster_sizes_.sum() == 0  # a new epoch has begun
    assert km.score(X) > OnlineConstrainedKMeans(8, n_epochs=1, center_update="none", random_state=0).fit(X).score(X)


def test_end_epoch_publishes_and_resets(stream):
    X, _ = stream
    km = OnlineConstrainedKMeans(10, random_state=0).partial_fit(X[:500])
    initial = km.published_centers_.copy()
    km.partial_fit(X[500:1000])
    assert np.array_equal(km.published_centers_, initial)  # published only at the boundary
    assert not np.array_equal(km.cluster_centers_, initial)
    km.end_epoch()
    assert np.array_equal(km.published_centers_, km.cluster_centers_)
    assert km.last_epoch_cluster_sizes_.sum() == 1000 and km.cluster_sizes_.sum() == 0


def test_duality_certificate_with_fixed_centers(stream):
    X, _ = stream
    km = OnlineConstrainedKMeans(10, center_update="none", random_state=0)
    for b in np.array_split(X, 20):
        km.partial_fit(b)
    assert km.epoch_dual_bound_ >= km.epoch_objective_
    assert km.duality_gap_ == pytest.approx((km.epoch_dual_bound_ - km.epoch_objective_) / len(X))


# ------------------------------------------------------------------------------ bad input
BAD_BATCHES = {
    "nan": (lambda X: np.where(np.arange(X.size).reshape(X.shape) == 5, np.nan, X), "NaN"),
    "inf": (lambda X: np.where(np.arange(X.size).reshape(X.shape) == 5, np.inf, X), "infinity"),
    "features": (lambda X: X[:, :-1], "features"),
    "empty": (lambda X: X[:0], "sample"),
    "1d": (lambda X: X[0], "2D|2-D"),
}


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batches_raise_and_leave_state_unchanged(stream, case, as_torch):
    X, _ = stream
    km = OnlineConstrainedKMeans(10, random_state=0).partial_fit(X[:500])
    before = _state(km)
    make_bad, message = BAD_BATCHES[case]
    bad = make_bad(X[500:700].astype(np.float32))
    if as_torch:
        bad = torch.from_numpy(np.ascontiguousarray(bad))
    with pytest.raises(ValueError, match=message):
        km.partial_fit(bad)
    _assert_same_state(before, _state(km))
    km.partial_fit(X[500:700])  # and it goes on working


def test_bad_first_batches_leave_the_model_unfitted(stream):
    X, _ = stream
    km = OnlineConstrainedKMeans(10, init=np.zeros((9, 16)))
    with pytest.raises(ValueError, match=r"init array has shape \(9, 16\), expected .*\(10, 16\)"):
        km.partial_fit(X[:100])
    assert not km.__sklearn_is_fitted__() and not hasattr(km, "n_features_in_")
    km = OnlineConstrainedKMeans(50)
    with pytest.raises(ValueError, match="n_samples=20 should be >= n_clusters=50"):
        km.partial_fit(X[:20])
    assert not km.__sklearn_is_fitted__() and not hasattr(km, "n_features_in_")
    with pytest.raises(ValueError, match="sample_weight"):
        OnlineConstrainedKMeans(5).partial_fit(X[:100], sample_weight=-np.ones(100))
    with pytest.raises(ValueError, match="min_size_ratio"):
        OnlineConstrainedKMeans(5, min_size_ratio=1.5).partial_fit(X[:100])


# ----------------------------------------------------------------------------- persistence
def test_save_load_continues_bit_identically(stream, tmp_path):
    X, _ = stream
    batches = np.array_split(X, 12)
    ref = OnlineConstrainedKMeans(10, max_size_ratio=2.0, random_state=0)
    for b in batches[:5]:
        ref.partial_fit(b)
    ref.end_epoch()
    ref.partial_fit(batches[5])
    ref.save(tmp_path / "model.st")
    loaded = OnlineConstrainedKMeans.load(tmp_path / "model.st")
    assert loaded.get_params() == ref.get_params()
    _assert_same_state(_state(ref), _state(loaded))
    for b in batches[6:]:
        ref.partial_fit(b)
        loaded.partial_fit(b)
        assert np.array_equal(ref.labels_, loaded.labels_)
    _assert_same_state(_state(ref), _state(loaded))


def test_state_dict_round_trip_and_parameter_mismatch(stream):
    X, _ = stream
    km = OnlineConstrainedKMeans(10, random_state=0).partial_fit(X[:500])
    other = OnlineConstrainedKMeans(10, random_state=0).load_state_dict(km.state_dict())
    _assert_same_state(_state(km), _state(other))
    with pytest.raises(ValueError, match="n_clusters"):
        OnlineConstrainedKMeans(11, random_state=0).load_state_dict(km.state_dict())


class _Payload:
    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_load_rejects_foreign_and_corrupt_files_without_running_code(stream, tmp_path):
    X, _ = stream
    marker = tmp_path / "executed"
    payload = _Payload()
    payload.marker = str(marker)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match="not a streamcoke checkpoint"):
        OnlineConstrainedKMeans.load(evil)
    assert not marker.exists()

    torch.save({"w": torch.zeros(3)}, tmp_path / "torch.pt")
    with pytest.raises(ValueError, match="not a streamcoke checkpoint"):
        OnlineConstrainedKMeans.load(tmp_path / "torch.pt")

    good = tmp_path / "good.st"
    OnlineConstrainedKMeans(10, random_state=0).partial_fit(X[:500]).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.st").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a streamcoke checkpoint"):
        OnlineConstrainedKMeans.load(tmp_path / "truncated.st")
    with pytest.raises(ValueError, match="MultiOnlineConstrainedKMeans"):
        MultiOnlineConstrainedKMeans.load(good)
    with pytest.raises(FileNotFoundError):
        OnlineConstrainedKMeans.load(tmp_path / "missing.st")


def test_save_is_atomic(stream, tmp_path, monkeypatch):
    X, _ = stream
    path = tmp_path / "model.st"
    km = OnlineConstrainedKMeans(10, random_state=0).partial_fit(X[:500])
    km.save(path)
    before = path.read_bytes()
    import streamcoke.io.checkpoint as ck

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ck.os, "replace", broken_replace)
    km.partial_fit(X[500:1000])
    with pytest.raises(OSError):
        km.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.st"]  # no temporary left behind


# ------------------------------------------------------------------------ several clusterings
@pytest.mark.parametrize("center_update", ["mean", "ema"])
def test_multi_equals_independent_single_clusterings(stream, center_update):
    X, _ = stream
    rng = np.random.default_rng(0)
    inits = [X[rng.choice(len(X), k, replace=False)] for k in (4, 7, 9)]
    multi = MultiOnlineConstrainedKMeans((4, 7, 9), init=inits, center_update=center_update, max_size_ratio=3.0)
    singles = [OnlineConstrainedKMeans(k, init=a, center_update=center_update, max_size_ratio=3.0)
               for k, a in zip((4, 7, 9), inits)]
    for b in np.array_split(X, 10):
        multi.partial_fit(b)
        for h, s in enumerate(singles):
            s.partial_fit(b)
            assert np.array_equal(multi.labels_[:, h], s.labels_)
    for h, s in enumerate(singles):
        assert np.allclose(multi.cluster_centers_[h], s.cluster_centers_, atol=1e-6)
        assert np.allclose(multi.duals_[h], s.duals_, atol=1e-6)
        assert multi.duality_gap_[h] == pytest.approx(s.duality_gap_, rel=1e-6, abs=1e-9)


def test_multi_save_load(stream, tmp_path):
    X, _ = stream
    m = MultiOnlineConstrainedKMeans((3, 5), random_state=0).partial_fit(X[:500])
    m.save(tmp_path / "m.st")
    m2 = MultiOnlineConstrainedKMeans.load(tmp_path / "m.st")
    _assert_same_state(_state(m), _state(m2))
    m.partial_fit(X[500:900])
    m2.partial_fit(X[500:900])
    assert np.array_equal(m.labels_, m2.labels_)


def test_pickle_round_trip(stream):
    X, _ = stream
    km = OnlineConstrainedKMeans(10, random_state=0).partial_fit(X[:500])
    km2 = pickle.loads(pickle.dumps(km))
    assert np.array_equal(km.predict(X), km2.predict(X))
