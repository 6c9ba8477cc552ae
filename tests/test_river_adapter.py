"""The river adapter: river's estimator checks, the river conventions, and the maths it shares
with the library's core."""

from __future__ import annotations

import copy
import doctest
import importlib
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest

river = pytest.importorskip("river")
pd = pytest.importorskip("pandas")

from river import checks, datasets, preprocessing  # noqa: E402
from river.checks import common  # noqa: E402

import streamcoke.adapters.river as adapter  # noqa: E402
from streamcoke.adapters.river import OnlineConstrainedKMeans  # noqa: E402
from streamcoke.core.duals import dual_step  # noqa: E402


def unit_test_models():
    return [OnlineConstrainedKMeans(**params) for params in OnlineConstrainedKMeans._unit_test_params()]


# --------------------------------------------------------------------------- river's own checks
@pytest.mark.parametrize(
    "model, check",
    [
        pytest.param(model, check, id=f"{i}:{check.__name__}")
        for i, model in enumerate(unit_test_models())
        for check in checks.yield_checks(model)
        if check.__name__ not in model._unit_test_skips()
    ],
)
def test_river_check(model, check):
    check(model.clone())


def unlabelled_segments(n=200):
    return list(datasets.ImageSegments().take(n))


# river yields no dataset checks for clusterers (it has no clustering data set), so the same
# checks run here on ImageSegments, the way river runs them on its classifiers.
DATASET_CHECKS = [
    common.check_learn_one,
    common.check_pickling,
    common.check_shuffle_features_no_impact,
    common.check_emerging_features,
    common.check_disappearing_features,
    common.check_radically_disappearing_features,
    common.check_no_state_aliasing_with_input,
    common.check_clone_is_independent,
    common.check_seeding_is_idempotent,
    common.check_learn_many_matches_learn_one,
]


@pytest.mark.parametrize(
    "model, check",
    [
        pytest.param(model, check, id=f"{i}:{check.__name__}")
        for i, model in enumerate(unit_test_models())
        for check in DATASET_CHECKS
    ],
)
def test_river_dataset_check(model, check):
    check(model.clone(), dataset=unlabelled_segments())


def test_bounded_memory_growth():
    common.check_bounded_memory_growth(OnlineConstrainedKMeans(seed=0), dataset=unlabelled_segments(2000))


def test_docstring_example():
    result = doctest.testmod(adapter, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


# --------------------------------------------------------------------------- behaviour
def blobs(n=600, seed=0):
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(size=(int(n * 0.9), 3)) + 2, rng.normal(size=(n - int(n * 0.9), 3)) - 2])
    return [{f"f{j}": float(v) for j, v in enumerate(row)} for row in X[rng.permutation(n)]]


def test_size_constraint_feeds_every_cluster():
    xs = blobs(1500)
    sizes = {}
    for ratio in (0.0, 1.0):
        model = OnlineConstrainedKMeans(n_clusters=5, min_size_ratio=ratio, seed=3)
        for x in xs:
            model.learn_one(x)
        sizes[ratio] = model.cluster_sizes
        assert sum(model.cluster_sizes) == len(xs) == model.n_samples_seen
    floor = len(xs) / 5
    assert min(sizes[1.0]) >= 0.9 * floor
    assert min(sizes[0.0]) < 0.9 * floor  # the bound is what makes the difference


def test_max_size_ratio_caps_clusters():
    xs = blobs(1500)
    model = OnlineConstrainedKMeans(n_clusters=3, min_size_ratio=0.0, max_size_ratio=1.1, seed=0)
    for x in xs:
        model.learn_one(x)
    assert max(model.cluster_sizes) <= 1.1 * len(xs) / 3 * 1.05
    assert max(model.upper_duals) > 0


def test_step_matches_core_dual_update():
    """After seeding, one learn_one is one core dual step on the one-hot shares of its winner."""
    model = OnlineConstrainedKMeans(n_clusters=3, max_size_ratio=1.2, init_size=3, dual_lr=0.05, seed=0)
    xs = blobs(20)
    for x in xs[:10]:
        model.learn_one(x)
    rho, mu, sizes = np.array(model.duals), np.array(model.upper_duals), np.array(model.cluster_sizes)
    label = model.predict_one(xs[10])
    model.learn_one(xs[10])
    shares = np.eye(3)[label]
    eta = 0.05
    want_rho, want_mu = dual_step(rho, mu, shares, 0.4 / 3, 1.2 / 3, eta)
    np.testing.assert_allclose(model.duals, want_rho)
    np.testing.assert_allclose(model.upper_duals, want_mu)
    np.testing.assert_array_equal(np.array(model.cluster_sizes) - sizes, shares)


def test_running_mean_centers():
    model = OnlineConstrainedKMeans(n_clusters=2, init_size=2, min_size_ratio=0.0, seed=0)
    pts = [{"a": 0.0}, {"a": 10.0}, {"a": 1.0}, {"a": 2.0}, {"a": 11.0}]
    for x in pts:
        model.learn_one(x)
    got = sorted(c["a"] for c in model.centers.values())
    assert got == pytest.approx([1.0, 10.5])  # means of {0, 1, 2} and {10, 11}


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_predict_many_matches_predict_one(metric):
    xs = unlabelled_segments(120)
    model = OnlineConstrainedKMeans(n_clusters=4, metric=metric, seed=1)
    for x, _ in xs[:80]:
        model.learn_one(x)
    test = [x for x, _ in xs[80:]]
    frame = pd.DataFrame(test, index=range(100, 100 + len(test)))
    many = model.predict_many(frame)
    assert list(many.index) == list(frame.index)
    assert many.tolist() == [model.predict_one(x) for x in test]
    assert len(set(many)) > 1


def test_predict_many_during_seeding_matches_predict_one():
    model = OnlineConstrainedKMeans(n_clusters=3, init_size=10, seed=0)
    xs = blobs(5)
    for x in xs[:3]:
        model.learn_one(x)
    assert model.predict_many(pd.DataFrame(xs)).tolist() == [model.predict_one(x) for x in xs]


def test_predict_before_learning_and_purity():
    model = OnlineConstrainedKMeans(n_clusters=3, seed=0)
    assert model.predict_one({"a": 1.0}) == 0
    for x, _ in unlabelled_segments(50):
        model.learn_one(x)
    before = pickle.dumps(model)
    x = dict(unlabelled_segments(60)[-1][0], unseen=3.0)
    xx = copy.deepcopy(x)
    model.predict_one(x)
    assert x == xx
    assert pickle.dumps(model) == before  # predicting neither learns nor grows features


def test_emerging_and_missing_features():
    model = OnlineConstrainedKMeans(n_clusters=2, init_size=2, min_size_ratio=0.0, seed=0)
    model.learn_one({"a": 1.0})
    model.learn_one({"a": 5.0})
    model.learn_one({"a": 1.0, "b": 4.0})  # new feature: a new dimension, 0 in earlier samples
    assert set(model.centers[0]) == {"a", "b"}
    means = sorted((c["a"], c["b"]) for c in model.centers.values())
    assert means == [pytest.approx((1.0, 2.0)), pytest.approx((5.0, 0.0))]
    # a missing key counts as 0, exactly as if it were given as 0
    assert model.predict_one({"b": 2.0}) == model.predict_one({"a": 0.0, "b": 2.0})


def test_pickle_round_trip_continues_identically():
    xs = [x for x, _ in unlabelled_segments(150)]
    model = OnlineConstrainedKMeans(n_clusters=4, seed=0)
    for x in xs[:100]:
        model.learn_one(x)
    restored = pickle.loads(pickle.dumps(model))
    for x in xs[100:]:
        assert model.predict_one(x) == restored.predict_one(x)
        model.learn_one(x)
        restored.learn_one(x)
    assert pickle.dumps(model) == pickle.dumps(restored)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "3.5", None, b"1", 1 + 2j])
@pytest.mark.parametrize("seeded", [False, True])
def test_bad_values_raise_and_leave_state(bad, seeded):
    model = OnlineConstrainedKMeans(n_clusters=2, init_size=2, seed=0)
    for x in blobs(8 if seeded else 1):
        model.learn_one(x)
    before = pickle.dumps(model)
    x = {"f0": 1.0, "new_feature": 2.0, "broken": bad}
    for method in (model.learn_one, model.predict_one):
        with pytest.raises(ValueError, match="'broken'"):
            method(x)
        assert pickle.dumps(model) == before
    frame = pd.DataFrame({"f0": [1.0, 2.0], "broken": [1.0, bad]})
    for method in (model.learn_many, model.predict_many):
        with pytest.raises(ValueError, match="'broken'"):
            method(frame)
        assert pickle.dumps(model) == before


def test_numpy_scalars_and_bools_are_numbers():
    model = OnlineConstrainedKMeans(n_clusters=2, init_size=2, seed=0)
    model.learn_one({"a": np.float32(1.5), "b": True, "c": np.int64(2)})
    model.learn_one({"a": 0.0, "b": False, "c": 0})
    assert model.centers[0].keys() == {"a", "b", "c"}


@pytest.mark.parametrize(
    "params",
    [{"n_clusters": 0}, {"min_size_ratio": 1.5}, {"max_size_ratio": 0.5}, {"metric": "manhattan"},
     {"center_update": "median"}, {"dual_lr": -1.0}, {"init_size": 2, "n_clusters": 3},
     {"ema_momentum": 2.0}],
)
def test_invalid_parameters(params):
    with pytest.raises(ValueError, match=next(iter(params))):
        OnlineConstrainedKMeans(**params)


def test_pipeline_learn_many_and_metrics():
    from river import metrics

    rows = unlabelled_segments(400)
    frame = pd.DataFrame([x for x, _ in rows])
    pipeline = preprocessing.StandardScaler() | OnlineConstrainedKMeans(n_clusters=7, seed=0)
    for chunk in np.array_split(np.arange(len(frame)), 4):
        pipeline.learn_many(frame.iloc[chunk])
    labels = pipeline.predict_many(frame)
    assert labels.nunique() == 7
    ari = metrics.AdjustedRand()
    for (x, y), y_pred in zip(rows, labels):
        ari.update(y, y_pred)
    assert ari.get() > 0.1  # the clusters carry information about the classes


# --------------------------------------------------------------------------- optional dependency
def test_import_without_river_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "river", None)
    monkeypatch.delitem(sys.modules, "streamcoke.adapters.river")
    with pytest.raises(ImportError, match=r'pip install "streamcoke\[river\]"'):
        importlib.import_module("streamcoke.adapters.river")


def test_streamcoke_imports_without_river():
    code = ("import sys; sys.modules['river'] = None; import streamcoke; "
            "assert 'streamcoke.adapters.river' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_returning_to_an_earlier_feature_set_after_growth():
    model = OnlineConstrainedKMeans(n_clusters=2, init_size=2, seed=0)
    for x in ({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 1.0}):
        model.learn_one(x)
    model.learn_one({"a": 1.0, "b": 2.0, "c": 5.0})  # a new feature
    model.learn_one({"a": 1.0, "b": 2.0})  # the earlier keys again: "c" counts as 0
    assert model.predict_one({"a": 1.0, "b": 2.0}) in (0, 1)
    assert set(model.centers[0]) == {"a", "b", "c"}
