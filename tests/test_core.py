"""The functional core, checked against plain numpy references."""

import numpy as np
import pytest
import torch

from streamcoke.core.assign import assign, flat_labels
from streamcoke.core.centers import ema_update, member_sums, running_mean_update
from streamcoke.core.certificate import dual_bound, streaming_bound_correction
from streamcoke.core.duals import dual_step
from streamcoke.core.exact import optimal_assignment
from streamcoke.core.similarity import prepare, scores


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 8, generator=g)
    C = torch.randn(12, 8, generator=g)
    return X, C


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_scores_match_definition(data, metric):
    X, C = data
    Xp, Cp = prepare(X, metric), prepare(C, metric)
    S = scores(Xp, Cp, metric).double()
    if metric == "cosine":
        ref = (Xp.double() @ Cp.double().T)
        assert torch.allclose(Xp.norm(dim=1), torch.ones(len(X)), atol=1e-5)
    else:
        ref = -torch.cdist(X.double(), C.double()) ** 2
    assert torch.allclose(S, ref, atol=1e-4)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("sizes", [(12,), (5, 7), (3, 4, 5)])
def test_assign_is_argmax_of_biased_scores_per_head(data, metric, sizes):
    X, C = data
    Xp, Cp = prepare(X, metric), prepare(C, metric)
    bias = torch.rand(12) * 0.5
    labels, best = assign(Xp, Cp, bias, sizes, metric)
    S = scores(Xp, Cp, metric)
    start = 0
    for h, k in enumerate(sizes):
        block = S[:, start:start + k] + bias[start:start + k]
        assert torch.equal(labels[:, h], block.argmax(dim=1))
        assert torch.allclose(best[:, h], block.max(dim=1).values, atol=1e-4)
        start += k
    rows = flat_labels(labels, sizes).reshape(len(sizes), -1).T
    assert torch.allclose(best - bias[rows], S.gather(1, rows), atol=1e-4)


def test_dual_step_moves_toward_the_bounds_and_stays_nonnegative():
    rho = torch.tensor([0.0, 0.5, 0.01])
    mu = torch.tensor([0.2, 0.0, 0.0])
    lower = torch.full((3,), 0.2)
    upper = torch.full((3,), 0.5)
    shares = torch.tensor([0.0, 0.9, 0.1])
    new_rho, new_mu = dual_step(rho, mu, shares, lower, upper, step_size=1.0)
    assert new_rho[0] > rho[0]  # starved cluster becomes more attractive
    assert new_rho[1] < rho[1]  # over-full cluster less so
    assert new_rho[2] == pytest.approx(0.11)
    assert new_mu[1] == pytest.approx(0.4)  # above its cap
    assert new_mu[0] == 0  # projected back onto mu >= 0
    assert (new_rho >= 0).all() and (new_mu >= 0).all()
    assert torch.equal(rho, torch.tensor([0.0, 0.5, 0.01]))  # inputs untouched
    # numpy arrays take the same path
    r, m = dual_step(rho.numpy(), mu.numpy(), shares.numpy(), lower.numpy(), upper.numpy(), 1.0)
    assert np.allclose(r, new_rho.numpy()) and np.allclose(m, new_mu.numpy())


@pytest.mark.parametrize("weighted", [False, True])
def test_member_sums_multi_head(weighted):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(50, 4, generator=g)
    labels = torch.stack([torch.randint(0, 3, (50,), generator=g), torch.randint(0, 5, (50,), generator=g)], 1)
    w = torch.rand(50, generator=g) if weighted else None
    rows = flat_labels(labels, (3, 5))
    sums = member_sums(X, rows, w, 8, n_heads=2)
    wn = np.ones(50) if w is None else w.numpy()
    for h, (off, k) in enumerate([(0, 3), (3, 5)]):
        for c in range(k):
            m = labels[:, h].numpy() == c
            assert np.allclose(sums[off + c].numpy(), (X.numpy()[m] * wn[m, None]).sum(0), atol=1e-5)


def test_running_mean_is_the_mean_of_the_epochs_members():
    g = torch.Generator().manual_seed(2)
    centers = torch.nn.functional.normalize(torch.randn(3, 4, generator=g), dim=1)
    epoch_sums, epoch_counts = torch.zeros(3, 4), torch.zeros(3, dtype=torch.float64)
    seen = {0: [], 1: [], 2: []}
    for _ in range(4):
        X = torch.randn(10, 4, generator=g)
        lab = torch.randint(0, 2, (10,), generator=g)  # cluster 2 never receives a member
        epoch_counts = epoch_counts + torch.bincount(lab, minlength=3).double()
        centers, epoch_sums = running_mean_update(centers, epoch_sums, epoch_counts, member_sums(X, lab, None, 3),
                                                  "euclidean")
        for i, k in enumerate(lab.tolist()):
            seen[k].append(X[i])
    for k in (0, 1):
        assert torch.allclose(centers[k], torch.stack(seen[k]).mean(0), atol=1e-5)
    initial = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(2)), dim=1)
    assert torch.equal(centers[2], initial[2])  # no member: keeps its previous value


def test_ema_update():
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sums, counts = torch.tensor([[0.0, 2.0], [0.0, 0.0]]), torch.tensor([2.0, 0.0], dtype=torch.float64)
    new = ema_update(centers, sums, counts, 0.75, "euclidean")
    assert torch.allclose(new[0], torch.tensor([0.75, 0.25]))
    assert torch.equal(new[1], centers[1])


def _feasible_objective(S, labels):
    return S[np.arange(len(S)), labels].sum()


def test_lp_reference_and_dual_bound_sandwich():
    rng = np.random.default_rng(0)
    S = rng.normal(size=(300, 6))
    S[:, 0] += 2.0  # cluster 0 would take everything without the constraint
    L = 0.8 * 300 / 6
    labels, opt = optimal_assignment(S, L)
    counts = np.bincount(labels, minlength=6)
    assert (counts >= np.floor(L)).all()
    assert _feasible_objective(S, labels) == pytest.approx(opt, rel=1e-9)
    assert opt < S.max(axis=1).sum()  # the constraint costs something here
    # The Lagrangian bound holds for any rho >= 0 and is tight at the optimal duals.
    St = torch.tensor(S)
    for rho in [np.zeros(6), rng.uniform(0, 3, 6), np.array([0, 1.5, 1.5, 1.5, 1.5, 1.5])]:
        bound = dual_bound(St, torch.tensor(rho), torch.full((6,), L, dtype=torch.float64)).item()
        assert bound >= opt - 1e-6
    # Upper bounds: no cluster above U.
    labels_u, opt_u = optimal_assignment(S, 0, max_sizes=60)
    assert np.bincount(labels_u, minlength=6).max() <= 60
    assert opt_u <= S.max(axis=1).sum()


def test_streaming_bound_correction_is_per_head():
    ref = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.0])
    cur = torch.tensor([0.5, 0.0, 0.0, 1.0, 0.2])
    assert torch.allclose(streaming_bound_correction(ref, cur, (2, 3)), torch.tensor([1.0, 0.5]))
