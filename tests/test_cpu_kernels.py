"""The fused CPU kernels against the torch implementations they replace on the CPU.

The same torch code is the GPU path and the fallback where the kernels cannot be built, so
every comparison here runs both and requires them to agree: labels exactly, values to float32
rounding, whole streams batch by batch.
"""

import types

import numpy as np
import pytest
import torch

from streamcoke import MultiOnlineConstrainedKMeans, OnlineConstrainedKMeans
from streamcoke.core import cpu
from streamcoke.core.assign import biased_argmax, scored_argmax
from streamcoke.core.centers import running_mean_step
from streamcoke.core.cpu import use_cpu_kernels
from streamcoke.core.similarity import KERNEL_MIN_ROWS, prepare, products, score_terms, scores

needs_kernels = pytest.mark.skipif(cpu.kernels() is None, reason="the fused CPU kernels could not be built here")
needs_multiply = pytest.mark.skipif(cpu.avx512_kernel() is None,
                                    reason="no AVX-512 here (or no kernels): the BLAS does the multiply")


@pytest.fixture
def kernel_multiply(monkeypatch):
    """``products`` through the AVX-512 kernel, also where the BLAS would be chosen."""
    monkeypatch.setenv(cpu.MULTIPLY_FLAG, "kernel")
    assert cpu.multiply_kernel() is not None


@needs_multiply
@pytest.mark.parametrize("n", [KERNEL_MIN_ROWS, 71, 72, 300])  # 72 rows are six whole row blocks
@pytest.mark.parametrize("k", [1, 31, 32, 33, 100])  # partial, whole and partial-again panels
@pytest.mark.parametrize("d", [1, 15, 16, 130])
def test_the_multiply_matches_the_blas(n, k, d, kernel_multiply):
    g = torch.Generator().manual_seed(n * 1000 + k * 10 + d)
    X, C = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    out = torch.full((n, k), float("nan"))
    got = products(X, C, out=out)
    assert got.data_ptr() == out.data_ptr()  # written in place, every entry
    ref = X.double() @ C.double().T
    # float32 accumulation in another order than the BLAS: a few ulps of the terms' magnitude
    tol = 1e-5 * (X.abs().double() @ C.abs().double().T) + 1e-6
    assert bool(((got.double() - ref).abs() <= tol).all())


@needs_multiply
def test_the_multiply_takes_views_and_is_the_same_on_every_call(kernel_multiply):
    g = torch.Generator().manual_seed(0)
    X, C = torch.randn(200, 50, generator=g), torch.randn(70, 60, generator=g)
    a = products(X[:, :40], C[:, 10:50])  # neither is contiguous
    b = products(X[:, :40].contiguous(), C[:, 10:50].contiguous())
    assert torch.equal(a, b)
    assert torch.equal(a, products(X[:, :40], C[:, 10:50]))
    # with 1 thread or 2: each entry is one sum in one order, whoever computes it
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(a, products(X[:, :40], C[:, 10:50]))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("intel,mkl,expected", [(True, True, "blas"), (True, False, "kernel"),
                                                (False, True, "kernel"), (False, False, "kernel")])
def test_the_multiply_is_chosen_by_processor_unless_told(monkeypatch, intel, mkl, expected):
    module = types.SimpleNamespace(has_avx512=lambda: True, is_intel=lambda: intel)
    monkeypatch.setattr(cpu, "kernels", lambda: module)
    monkeypatch.setattr(cpu, "_blas_is_mkl", lambda: mkl)
    monkeypatch.delenv(cpu.MULTIPLY_FLAG, raising=False)
    assert cpu.multiply_kernel() is (module if expected == "kernel" else None)
    monkeypatch.setenv(cpu.MULTIPLY_FLAG, "blas")
    assert cpu.multiply_kernel() is None
    monkeypatch.setenv(cpu.MULTIPLY_FLAG, "kernel")
    assert cpu.multiply_kernel() is module
    monkeypatch.setenv(cpu.MULTIPLY_FLAG, "fast")
    with pytest.raises(ValueError, match="STREAMCOKE_CPU_MULTIPLY='fast'"):
        cpu.multiply_kernel()
    module.has_avx512 = lambda: False  # no AVX-512: the BLAS, whatever is asked
    monkeypatch.setenv(cpu.MULTIPLY_FLAG, "kernel")
    assert cpu.multiply_kernel() is None


@needs_multiply
def test_a_stream_is_the_same_with_either_multiply(monkeypatch):
    X = np.random.default_rng(2).normal(size=(8 * 256, 24)).astype(np.float32)

    def run(choice):
        monkeypatch.setenv(cpu.MULTIPLY_FLAG, choice)
        km = OnlineConstrainedKMeans(40, random_state=0, device="cpu")
        labels = np.concatenate([km.partial_fit(X[i * 256:(i + 1) * 256]).labels_ for i in range(8)])
        return km, labels

    (a, la), (b, lb) = run("kernel"), run("blas")
    assert np.mean(la == lb) > 0.999  # the two add a score's terms in different orders
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-5)
    np.testing.assert_allclose(a.duals_, b.duals_, atol=1e-5)


@needs_multiply
def test_the_multiply_checks_its_arguments():
    k = cpu.avx512_kernel()
    X, C = torch.randn(80, 5), torch.randn(7, 5)
    with pytest.raises(RuntimeError, match="different numbers of features"):
        k.scores_into(X, torch.randn(7, 6), torch.empty(80, 7))
    with pytest.raises(RuntimeError, match="out must have shape"):
        k.scores_into(X, C, torch.empty(80, 8))
    with pytest.raises(RuntimeError, match="float32"):
        k.scores_into(X.double(), C, torch.empty(80, 7))


@needs_kernels
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sizes", [[7], [5, 12, 3]])
def test_certificate_terms_match_torch(metric, weighted, sizes):
    from streamcoke.core.certificate import batch_terms, streaming_bound_correction

    g = torch.Generator().manual_seed(len(sizes) + 2 * weighted)
    n, K, H = 90, sum(sizes), len(sizes)
    X, best = torch.randn(n, 19, generator=g), torch.randn(n, H, generator=g)
    w = torch.rand(n, generator=g) + 0.5 if weighted else None
    counts, bias, ref = torch.rand(K, generator=g).double() * 9, torch.randn(K, generator=g), torch.randn(K, generator=g)
    fast = batch_terms(best, X, metric, w, counts, bias, ref, sizes)
    with use_cpu_kernels(False):
        slow = batch_terms(best, X, metric, w, counts, bias, ref, sizes)
    assert fast.dtype == slow.dtype == torch.float64 and fast.shape == (3 * H,)
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-4)
    # What the terms mean, from the definitions: winning scores with the row constant, weighted.
    full = best.double() + (0.0 if metric == "cosine" else -(X.double() ** 2).sum(1, keepdim=True))
    full = full * (1.0 if w is None else w.double().unsqueeze(1))
    paid = torch.stack([(c * b.double()).sum() for c, b in zip(counts.split(sizes), bias.split(sizes))])
    assert torch.allclose(fast[H:2 * H], full.sum(0), rtol=1e-6, atol=1e-3)
    assert torch.allclose(fast[:H], full.sum(0) - paid, rtol=1e-6, atol=1e-3)
    assert torch.equal(fast[2 * H:], streaming_bound_correction(ref, bias, sizes).double())


@needs_kernels
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (300, 128), (2000, 5)])
def test_normalize_rows_matches_torch(shape):
    g = torch.Generator().manual_seed(shape[0])
    X = torch.randn(*shape, generator=g) * 10
    X[0] = 0.0  # stays zero
    from streamcoke.core.similarity import normalize_rows

    before = X.clone()
    fast = normalize_rows(X)
    assert torch.allclose(fast, torch.nn.functional.normalize(X, dim=1), rtol=1e-6, atol=1e-7)
    assert torch.equal(fast[0], torch.zeros(shape[1]))
    assert fast.data_ptr() != X.data_ptr() and torch.equal(X, before)  # a new tensor; X unchanged


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 77, -1])
def test_non_finite_input_is_found_wherever_it_is(bad, where):
    from streamcoke.cluster._inputs import _all_finite

    X = torch.randn(100_003 // 7, 7)
    assert _all_finite(X)
    X.view(-1)[where] = bad
    assert not _all_finite(X)
    with use_cpu_kernels(False):
        assert not _all_finite(X)
    big = torch.full((4, 3), 3e38)  # finite, though its sum overflows
    assert _all_finite(big)
    with use_cpu_kernels(False):
        assert _all_finite(big)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_scores_are_the_similarities_of_the_metric(metric):
    g = torch.Generator().manual_seed(5)
    X, C = torch.randn(100, 9, generator=g), torch.randn(40, 9, generator=g)
    ref = X @ C.T if metric == "cosine" else -torch.cdist(X.double(), C.double()).pow(2).float()
    assert torch.allclose(scores(X, C, metric), ref, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("sizes", [(1,), (7,), (16,), (33,), (5, 16, 40)])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_biased_argmax_matches_torch(sizes, alpha):
    g = torch.Generator().manual_seed(sum(sizes))
    Z = torch.randn(300, sum(sizes), generator=g)
    Z[:, -1] = Z[:, 0]  # exact ties: the first column must win, as numpy's argmax has it
    bias = torch.rand(sum(sizes), generator=g) * 0.1
    bias[-1] = bias[0]
    fast = biased_argmax(Z, bias, sizes, alpha, gap_rows=100)
    with use_cpu_kernels(False):
        ref = biased_argmax(Z, bias, sizes, alpha, gap_rows=100)
    assert torch.equal(fast[0], ref[0])
    assert torch.equal(fast[1], ref[1])
    assert torch.allclose(fast[2], ref[2], rtol=1e-6, atol=1e-9)
    assert torch.equal(Z[:, -1], Z[:, 0])  # the scores are read, never written


@needs_kernels
@pytest.mark.parametrize("multiply", ["blas", "kernel"])
@pytest.mark.parametrize("n,sizes", [(5, (7,)), (300, (1000,)), (1100, (300,)), (700, (5, 16, 40)), (0, (4,))])
def test_scored_argmax_is_the_multiply_then_the_argmax(monkeypatch, multiply, n, sizes):
    # 1100 rows against 300 centers: several chunks per thread (a chunk holds ~1 MiB of scores)
    if multiply == "kernel" and cpu.avx512_kernel() is None:
        pytest.skip("no AVX-512 here")
    monkeypatch.setenv(cpu.MULTIPLY_FLAG, multiply)
    g = torch.Generator().manual_seed(n + len(sizes))
    K = sum(sizes)
    X, C, bias = torch.randn(n, 24, generator=g), torch.randn(K, 24, generator=g), torch.rand(K, generator=g)
    out = torch.full((n, K), float("nan"))
    Z, labels, best, gap = scored_argmax(X, C, bias, sizes, 2.0, 256, out=out)
    assert Z.data_ptr() == out.data_ptr()
    ref_Z = products(X, C)
    if multiply == "kernel":  # the same tiles in the same order
        assert torch.equal(Z, ref_Z)
    else:  # the BLAS called per chunk; whether it gives the whole call's bits is up to the BLAS
        assert torch.allclose(Z, ref_Z, rtol=1e-5, atol=1e-5)
    for got, want in zip((labels, best, gap), biased_argmax(Z, bias, sizes, 2.0, 256)):
        assert torch.equal(got, want)
    if n and multiply == "kernel":  # chunks of one row block each, taken by the threads in turn
        Z12 = torch.empty_like(Z)
        got = cpu.kernels().scored_argmax(X, C, Z12, bias, 2.0, list(sizes), 256, True, 12)
        assert torch.equal(Z12, Z)
        for a, b in zip(got, (labels, best, gap)):
            assert torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_running_mean_step_matches_torch(metric, weighted):
    g = torch.Generator().manual_seed(3)
    sizes = (6, 9)  # center 5, the last of the first head, receives no member
    X = prepare(torch.randn(80, 5, generator=g), metric)
    centers = prepare(torch.randn(15, 5, generator=g), metric)
    labels = torch.stack([torch.randint(0, sizes[0] - 1, (80,), generator=g),
                          torch.randint(0, sizes[1], (80,), generator=g)], 1)
    rows = (labels + torch.tensor([0, sizes[0]])).T.reshape(-1)
    w = torch.rand(80, generator=g) if weighted else None
    epoch_sums = torch.randn(15, 5, generator=g)
    epoch_sums[5] = 0
    counts = torch.bincount(rows, minlength=15).double()
    fast = running_mean_step(X, rows, w, centers, epoch_sums, counts, len(sizes), metric)
    with use_cpu_kernels(False):
        ref = running_mean_step(X, rows, w, centers, epoch_sums, counts, len(sizes), metric)
    assert torch.equal(fast[1], ref[1])  # member sums added in the same order: the same bits
    assert torch.allclose(fast[0], ref[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(fast[0][5], centers[5])  # no member: unchanged


@needs_kernels
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("max_size_ratio", [None, 1.5])
def test_a_stream_is_the_same_with_and_without_the_kernels(metric, max_size_ratio):
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(12 * 256, 12)) + rng.normal(size=(12 * 256, 1)) * 3).astype(np.float32)

    def run(enabled):
        with use_cpu_kernels(enabled):
            km = OnlineConstrainedKMeans(30, metric=metric, max_size_ratio=max_size_ratio, random_state=0,
                                         device="cpu")
            labels = []
            for i in range(12):
                km.partial_fit(X[i * 256:(i + 1) * 256])
                labels.append(km.labels_)
            return km, np.concatenate(labels)

    (fast, lf), (ref, lr) = run(True), run(False)
    assert np.mean(lf == lr) > 0.999  # float32 rounding of a center norm may flip a near-tie
    np.testing.assert_allclose(fast.cluster_centers_, ref.cluster_centers_, atol=1e-5)
    np.testing.assert_allclose(fast.duals_, ref.duals_, atol=1e-5)
    assert fast.epoch_objective_ == pytest.approx(ref.epoch_objective_, rel=1e-5)


@needs_kernels
def test_multi_head_stream_with_weights_and_inner_steps_matches_torch():
    # Batch 2048 against K = 10: several quotas per cluster, so the schedule takes inner steps.
    rng = np.random.default_rng(1)
    X = rng.normal(size=(4 * 2048, 8)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, size=len(X)).astype(np.float32)

    def run(enabled):
        with use_cpu_kernels(enabled):
            km = MultiOnlineConstrainedKMeans((10, 25), random_state=0, device="cpu")
            for i in range(4):
                km.partial_fit(X[i * 2048:(i + 1) * 2048], sample_weight=w[i * 2048:(i + 1) * 2048])
            return km

    fast, ref = run(True), run(False)
    for a, b in zip(fast.labels_, ref.labels_):
        assert np.mean(a == b) > 0.999
    for a, b in zip(fast.cluster_centers_, ref.cluster_centers_):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_score_terms_give_the_biased_scores():
    g = torch.Generator().manual_seed(4)
    X, C, bias = torch.randn(20, 4, generator=g), torch.randn(6, 4, generator=g), torch.rand(6, generator=g)
    alpha, b = score_terms(C, bias, "euclidean")
    ref = -torch.cdist(X, C) ** 2 + bias + (X * X).sum(1, keepdim=True)
    assert torch.allclose(alpha * (X @ C.T) + b, ref, atol=1e-4)


def test_a_failed_build_falls_back_with_a_warning(monkeypatch):
    monkeypatch.delenv(cpu.ENV_FLAG, raising=False)
    monkeypatch.setattr(cpu, "_module", None)
    monkeypatch.setattr(cpu, "_tried", False)

    def broken():
        raise RuntimeError("no compiler\nError building extension 'streamcoke_cpu_step'")

    monkeypatch.setattr(cpu, "_build", broken)
    with pytest.warns(RuntimeWarning, match="could not be built.*Error building extension"):
        assert cpu.kernels() is None
    km = OnlineConstrainedKMeans(4, random_state=0, device="cpu").fit(np.random.default_rng(0).normal(size=(64, 3)))
    assert km.labels_.shape == (64,)


def test_the_environment_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv(cpu.ENV_FLAG, "0")
    assert cpu.kernels() is None


@needs_kernels
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("max_size_ratio", [None, 1.5])
def test_repeated_dual_steps_give_the_same_bits_as_the_loop(monkeypatch, metric, weighted, max_size_ratio):
    # Batches of 512 hold many quotas of 5 and of 12 clusters, so the default schedule splits
    # every step into several (a different number per head); the fused loop must reproduce the
    # torch loop exactly, with every other kernel the same on both sides.
    from streamcoke.cluster import _base

    rng = np.random.default_rng(1)
    X = rng.normal(size=(3072, 6)).astype(np.float32) + np.repeat(rng.normal(size=(6, 6)) * 3, 512, 0)
    w = rng.uniform(0.5, 2.0, size=len(X)).astype(np.float32) if weighted else None

    def stream():
        km = MultiOnlineConstrainedKMeans((5, 12), metric=metric, max_size_ratio=max_size_ratio, random_state=0)
        labels = []
        for s in range(0, len(X), 512):
            km.partial_fit(X[s:s + 512], sample_weight=None if w is None else w[s:s + 512])
            labels.append(np.stack(km.labels_, 1))
        return km, np.concatenate(labels)

    calls = []
    real = _base.repeated_dual_steps
    monkeypatch.setattr(_base, "repeated_dual_steps", lambda *a: calls.append(1) or real(*a))
    fast, fast_labels = stream()
    assert len(calls) >= 5  # the fused loop ran
    monkeypatch.setattr(_base, "repeated_dual_steps", lambda *a: None)
    ref, ref_labels = stream()
    np.testing.assert_array_equal(fast_labels, ref_labels)
    for a, b in zip(fast.duals_ + fast.upper_duals_ + fast.cluster_centers_ + fast.cluster_sizes_,
                    ref.duals_ + ref.upper_duals_ + ref.cluster_centers_ + ref.cluster_sizes_):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fast.epoch_objective_, ref.epoch_objective_)


@needs_kernels
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("sizes", [(1,), (7,), (5, 12)])
def test_label_counts_give_numpys_bincount_bits(weighted, sizes):
    from streamcoke.core.assign import flat_labels, label_counts

    g = torch.Generator().manual_seed(len(sizes) * 10 + weighted)
    labels = torch.stack([torch.randint(0, k, (1000,), generator=g) for k in sizes], 1)
    rows = flat_labels(labels, sizes)
    w = torch.rand(1000, generator=g) * 3 + 0.1 if weighted else None
    fast = label_counts(rows, w, sum(sizes))
    with use_cpu_kernels(False):
        ref = label_counts(rows, w, sum(sizes))
    assert fast.dtype == ref.dtype == torch.float64
    assert torch.equal(fast, ref)
    assert fast.sum().item() == pytest.approx(len(sizes) * (1000 if w is None else w.double().sum().item()))


@needs_kernels
def test_label_counts_refuse_an_index_out_of_range():
    with pytest.raises(RuntimeError, match="out of range"):
        cpu.kernels().label_counts(torch.tensor([0, 3]), torch.empty(0), 3)
