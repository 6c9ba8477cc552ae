"""Property-based checks of the guarantees of online constrained k-means (Hypothesis)."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamcoke import OnlineConstrainedKMeans
from streamcoke.core.schedule import MIN_QUOTA_FOR_INNER

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def streams(draw, min_batches=1, max_batches=12):
    """A random stream: cluster count, feature count and a list of batches of varying size."""
    k = draw(st.integers(2, 7))
    d = draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    sizes = draw(st.lists(st.integers(1, 40), min_size=min_batches, max_size=max_batches))
    rng = np.random.default_rng(seed)
    # Anisotropic, shifted data so that plain nearest-center assignment is unbalanced.
    scale = rng.uniform(0.2, 3.0, size=d)
    shift = rng.normal(size=d) * draw(st.floats(0, 3))
    batches = [(rng.normal(size=(n, d)) * scale + shift).astype(np.float32) for n in sizes]
    init = (rng.normal(size=(k, d)) * scale + shift).astype(np.float32)
    return k, init, batches


params = st.fixed_dictionaries({
    "min_size_ratio": st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    "max_size_ratio": st.sampled_from([None, 1.0, 1.5, 3.0]),
    "metric": st.sampled_from(["cosine", "euclidean"]),
    "center_update": st.sampled_from(["mean", "ema", "none"]),
    "dual_lr": st.sampled_from([None, 0.01, 0.2]),
})


def _fit_stream(km, batches, as_torch=False):
    labels = []
    for b in batches:
        km.partial_fit(torch.from_numpy(b) if as_torch else b)
        labels.append(np.asarray(km.labels_))
    return np.concatenate(labels)


@SETTINGS
@given(streams(), params)
def test_duals_stay_nonnegative(stream, p):
    k, init, batches = stream
    km = OnlineConstrainedKMeans(k, init=init, **p)
    for b in batches:
        km.partial_fit(b)
        assert (km.duals_ >= 0).all() and (km.upper_duals_ >= 0).all()


@SETTINGS
@given(streams(), params)
def test_labels_are_argmax_of_similarity_plus_duals(stream, p):
    k, init, batches = stream
    km = OnlineConstrainedKMeans(k, init=init, **p)
    for b in batches:
        if km.__sklearn_is_fitted__():
            S = km.transform(b).astype(np.float64)
            if p["metric"] == "euclidean":
                S = -(S ** 2)
            Z = S + km.duals_ - km.upper_duals_
        km.partial_fit(b)
        if not km.__sklearn_is_fitted__() or km.n_steps_ == 1:
            continue
        if p["dual_lr"] is None and len(b) * p["min_size_ratio"] / k >= MIN_QUOTA_FOR_INNER:
            continue  # the default schedule re-assigns such a batch after inner dual steps
        top2 = np.sort(Z, axis=1)[:, -2:] if k > 1 else None
        clear = (top2[:, 1] - top2[:, 0]) > 1e-4 * (1 + np.abs(top2[:, 1]))  # skip float near-ties
        assert np.array_equal(km.labels_[clear], Z.argmax(axis=1)[clear])


@SETTINGS
@given(streams(min_batches=3, max_batches=30), st.sampled_from([0.3, 0.8, 1.0]),
       st.sampled_from([None, 1.5]), st.sampled_from([0.05, 0.3]))
def test_size_bounds_hold_up_to_a_slack_that_shrinks_with_the_stream(stream, gamma, beta, lr):
    """With a constant per-sample dual rate ``lr``, a cluster's total shortfall below its
    minimum is at most ``rho_k / lr`` at the end of the stream (and its excess over the maximum
    at most ``mu_k / lr``). The duals stay bounded on the cosine metric, whose similarities span
    at most 2, so the slack per sample falls like 1 / N."""
    k, init, batches = stream
    km = OnlineConstrainedKMeans(k, init=init, min_size_ratio=gamma, max_size_ratio=beta,
                                 center_update="none", dual_lr=lr)
    labels = _fit_stream(km, batches)
    N = len(labels)
    sizes = np.bincount(labels, minlength=k)
    shortfall = gamma * N / k - sizes
    assert (shortfall <= km.duals_ / lr + 1e-3 * N / k + 1e-3).all()
    if beta is not None:
        excess = sizes - beta * N / k
        assert (excess <= km.upper_duals_ / lr + 1e-3 * N / k + 1e-3).all()
    b_max = max(len(b) for b in batches)
    bound = 2.0 * k + lr * b_max
    assert km.duals_.max() <= bound and km.upper_duals_.max() <= bound


@SETTINGS
@given(streams(), params, st.randoms(use_true_random=False))
def test_relabelling_initial_centers_permutes_labels(stream, p, rnd):
    k, init, batches = stream
    perm = np.array(rnd.sample(range(k), k))
    a = OnlineConstrainedKMeans(k, init=init, **p)
    b = OnlineConstrainedKMeans(k, init=init[perm], **p)
    la, lb = _fit_stream(a, batches), _fit_stream(b, batches)
    new_index = np.argsort(perm)  # center j of `a` sits at new_index[j] in `b`
    assert np.array_equal(new_index[la], lb)
    assert np.allclose(a.duals_[perm], b.duals_, atol=1e-6)
    assert np.allclose(a.cluster_centers_[perm], b.cluster_centers_, atol=1e-5)


@SETTINGS
@given(streams(), st.sampled_from(["cosine", "euclidean"]))
def test_no_constraint_and_fixed_centers_is_nearest_center(stream, metric):
    k, init, batches = stream
    km = OnlineConstrainedKMeans(k, init=init, min_size_ratio=0.0, center_update="none", metric=metric)
    for b in batches:
        km.partial_fit(b)
        assert np.array_equal(km.labels_, km.predict(b))
        assert not km.duals_.any()


@SETTINGS
@given(streams(), params)
def test_numpy_and_torch_inputs_agree(stream, p):
    k, init, batches = stream
    a = OnlineConstrainedKMeans(k, init=init, **p)
    b = OnlineConstrainedKMeans(k, init=init, **p)
    assert np.array_equal(_fit_stream(a, batches), _fit_stream(b, batches, as_torch=True).astype(np.int64))
    assert np.array_equal(a.cluster_centers_, b.cluster_centers_.numpy())
    assert np.array_equal(a.duals_, b.duals_.numpy())


@SETTINGS
@given(streams(min_batches=2), params, st.data())
def test_save_load_round_trips_mid_stream(tmp_path_factory, stream, p, data):
    k, init, batches = stream
    cut = data.draw(st.integers(1, len(batches) - 1))
    path = tmp_path_factory.mktemp("ckpt") / "model.st"
    a = OnlineConstrainedKMeans(k, init=init, **p)
    _fit_stream(a, batches[:cut])
    a.save(path)
    b = OnlineConstrainedKMeans.load(path)
    assert np.array_equal(_fit_stream(a, batches[cut:]), _fit_stream(b, batches[cut:]))
    for key, t in a.state_dict()["tensors"].items():
        assert torch.equal(t, b.state_dict()["tensors"][key]), key
