"""Catch-up bids (streamcoke.core.catch_up): the level a bid reads off the scores, who bids, and
what the bids do for running-mean centers on a long-tailed stream."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamcoke import MultiOnlineConstrainedKMeans, OnlineConstrainedKMeans
from streamcoke.core import catch_up
from streamcoke.core.assign import biased_argmax
from streamcoke.datasets import imbalanced_mixture


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(2, 9), q=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_the_level_is_the_rise_that_wins_q_rows(n, k, q, seed):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, k, generator=g)
    bias = torch.rand(k, generator=g)
    _, best, _ = biased_argmax(Z, bias, (k,))
    column = torch.tensor([seed % k])
    margins = catch_up.smallest_margins(Z.clone(), 1.0, bias, best, column, q)
    assert margins.shape == (q, 1)
    finite = margins[torch.isfinite(margins)]
    assert torch.all(finite[1:] >= finite[:-1]) and torch.all(finite >= 0)
    assert torch.isinf(margins).sum() == max(0, q - n)
    level = float(margins[min(q, n) - 1, 0])
    raised = bias.clone()
    raised[column] += level + 1e-4
    labels, _, _ = biased_argmax(Z, raised, (k,))
    assert int((labels[:, 0] == column).sum()) >= min(q, n)
    if level > 1e-3:  # a smaller rise wins fewer
        raised[column] -= 2e-4 + level / 2
        labels, _, _ = biased_argmax(Z, raised, (k,))
        assert int((labels[:, 0] == column).sum()) < min(q, n)


def test_members_have_no_margin_and_heads_are_read_apart():
    g = torch.Generator().manual_seed(0)
    sizes = (3, 5)
    Z = torch.randn(50, 8, generator=g)
    bias = torch.zeros(8)
    labels, best, _ = biased_argmax(Z, bias, sizes)
    columns = torch.tensor([int(labels[0, 0]), 3 + int(labels[0, 1])])
    margins = catch_up.smallest_margins(Z.clone(), 1.0, bias, best, columns, 1)
    assert margins.tolist() == [[0.0, 0.0]]  # each center won rows in its own head


def test_quota_rows():
    assert catch_up.quota_rows(0.4, 200, 1024) == 3  # 2.05 rows, rounded up
    assert catch_up.quota_rows(0.4, 1000, 32) == 1  # under one row: still one
    assert catch_up.quota_rows(1.0, 1, 7) == 7  # never more than the batch


def test_who_bids(monkeypatch):
    lower = torch.full((4,), 0.1)  # a minimum of 10 of every 100
    epoch_weight, batch_weight = 1000.0, 100.0  # share 100 so far, quota 10 a batch
    counts = torch.tensor([100.0, 85.0, 79.0, 0.0], dtype=torch.float64)
    # 85: behind by 15 < 2 quotas; 79: behind by 21 > 20 and below 90% of its share
    assert catch_up.behind(lower, counts, epoch_weight, batch_weight, 100).tolist() == [2, 3]
    counts[2] = 91.0  # within 90% of its share: left to the ascent
    assert catch_up.behind(lower, counts, epoch_weight, batch_weight, 100).tolist() == [3]
    # A quota of a small fraction of a row: two quotas behind is not enough, two rows is.
    tiny = torch.full((4,), 0.001)  # share 1.0 so far, quota 0.1 a batch
    assert catch_up.behind(tiny, torch.zeros(4, dtype=torch.float64), 1000.0, 100.0, 100).numel() == 0
    assert catch_up.behind(tiny, torch.zeros(4, dtype=torch.float64), 3000.0, 100.0, 100).tolist() == [0, 1, 2, 3]
    monkeypatch.setattr(catch_up, "MAX_BIDDERS", 2)  # the two furthest behind, in index order
    counts = torch.tensor([2.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert catch_up.behind(tiny, counts, 10000.0, 100.0, 100).tolist() == [1, 3]


def test_bids_only_raise_and_only_above_the_level_threshold():
    rho = torch.tensor([0.5, 0.0, 0.2, 0.1])
    mu = torch.zeros(4)
    columns = torch.tensor([1, 2, 3])
    levels = torch.tensor([2.0, 1.0, 0.02])
    out = catch_up.raised_duals(rho, mu, rho.clone(), columns, levels, 0.05)
    assert out[0] == rho[0]  # not bidding
    assert out[1] == pytest.approx(0.0 + catch_up.THETA * 2.0)
    assert out[2] == pytest.approx(0.2 + catch_up.THETA * 1.0)
    assert out[3] == rho[3]  # level 0.02 below the threshold: left to the ascent
    high = torch.full((4,), 5.0)
    assert torch.all(catch_up.raised_duals(high, mu, rho, columns, levels, 0.05) == 5.0)  # never lowers
    per_column = catch_up.raised_duals(rho, mu, rho.clone(), columns, levels, torch.tensor([3.0, 0.5, 0.0]))
    assert per_column[1] == rho[1] and per_column[2] > rho[2] and per_column[3] > rho[3]
    assert torch.equal(rho, torch.tensor([0.5, 0.0, 0.2, 0.1]))  # inputs untouched
    assert torch.equal(levels, torch.tensor([2.0, 1.0, 0.02]))


def _smallest_each_epoch(X, batch_size, epochs, model):
    """Per epoch, each clustering's smallest cluster as a share of its minimum."""
    g = torch.Generator().manual_seed(0)
    shares = []
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for s in range(0, len(X), batch_size):
            model.partial_fit(X[perm[s:s + batch_size]])
        sizes = model.cluster_sizes_
        sizes = sizes if isinstance(sizes, list) else [sizes]
        shares.append([float(np.min(np.asarray(s))) / (0.4 * len(X) / len(s)) for s in sizes])
        model.end_epoch()
    return shares


@pytest.fixture(scope="module")
def long_tail():
    X, _, _ = imbalanced_mixture(40000, 50, 64, concentration=0.3, random_state=0)
    return torch.from_numpy(np.asarray(X, np.float32))


def test_running_mean_centers_reach_their_minimum_with_the_bids(long_tail, monkeypatch):
    def run():
        return _smallest_each_epoch(long_tail, 256, 4, OnlineConstrainedKMeans(200, min_size_ratio=0.4,
                                                                                 random_state=0))
    with_bids = run()
    monkeypatch.setattr(catch_up, "SHARE", 0.0)  # nobody bids: the ascent alone
    without = run()
    assert min(min(e) for e in without) < 0.6  # the stream does starve clusters under the ascent alone
    assert min(min(e) for e in with_bids) >= 0.95, with_bids


def test_bids_in_every_head_of_a_multi_clustering(long_tail, monkeypatch):
    def run():
        return _smallest_each_epoch(long_tail, 256, 3, MultiOnlineConstrainedKMeans((100, 200), min_size_ratio=0.4,
                                                                                      random_state=0))
    with_bids = run()
    monkeypatch.setattr(catch_up, "SHARE", 0.0)
    without = run()
    assert min(without[-1]) < 0.6  # the K = 200 head starves under the ascent alone
    assert all(share >= 0.95 for share in with_bids[-1]), with_bids


def test_behind_is_the_same_in_numpy_and_in_torch():
    # The CPU finds the bidders with numpy, the GPU with torch: the same columns, bit for bit.
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        K = int(torch.randint(1, 3000, (1,), generator=g))
        lower = torch.rand(K, generator=g) * 0.01
        counts = torch.rand(K, generator=g, dtype=torch.float64) * float(torch.randint(1, 5000, (1,), generator=g))
        epoch_weight = float(torch.rand(1, generator=g)) * 1e5
        batch_weight = float(torch.randint(1, 4096, (1,), generator=g))
        args = (lower, counts, epoch_weight, batch_weight, int(batch_weight))
        got = torch.from_numpy(catch_up._behind_numpy(*(a.numpy() if isinstance(a, torch.Tensor) else a
                                                        for a in args)))
        assert torch.equal(got, catch_up._behind_torch(*args))
