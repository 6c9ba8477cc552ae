"""The estimator on a CUDA device: tensors stay where the caller keeps them, and runs repeat
bit for bit (atomic adds would not). Skipped without a GPU; run with ``-m gpu``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamcoke import MultiOnlineConstrainedKMeans, OnlineConstrainedKMeans
from streamcoke.core.centers import scatter_sum

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _stream(n=6000, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(12, d, generator=g) * 3
    X = means[torch.randint(0, 12, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return X


def test_scatter_sum_repeats_bit_for_bit_on_cuda():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(200_000, 64, generator=g).cuda()
    rows = torch.randint(0, 7, (200_000,), generator=g).cuda()  # many rows per target: atomics would vary
    first = scatter_sum(values, rows, 7)
    for _ in range(5):
        assert torch.equal(scatter_sum(values, rows, 7), first)
    expected = torch.zeros(7, 64, dtype=torch.float64).index_add_(0, rows.cpu(), values.cpu().double())
    assert torch.allclose(first.cpu().double(), expected, atol=1e-2)


def test_cuda_tensors_stay_on_the_device():
    X = _stream().cuda()
    km = OnlineConstrainedKMeans(10, random_state=0, device="cuda")
    for batch in X.split(500):
        km.partial_fit(batch)
    assert km.labels_.device.type == "cuda"
    assert km.cluster_centers_.device.type == "cuda" and km.duals_.device.type == "cuda"
    assert km.predict(X[:10]).device.type == "cuda"


def test_host_tensors_fed_to_a_gpu_clusterer_come_back_on_the_host():
    X = _stream()
    km = OnlineConstrainedKMeans(10, random_state=0, device="cuda")
    for batch in X.split(500):
        km.partial_fit(batch)
    for value in (km.labels_, km.cluster_centers_, km.duals_, km.cluster_sizes_, km.predict(X[:10])):
        assert value.device.type == "cpu"
    assert isinstance(OnlineConstrainedKMeans(10, random_state=0, device="cuda").partial_fit(X[:500].numpy())
                      .cluster_centers_, np.ndarray)


@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_runs_repeat_and_resume_bit_for_bit(tmp_path, weighted):
    X = _stream().cuda()
    w = torch.rand(len(X), generator=torch.Generator().manual_seed(3)).cuda() if weighted else None
    batches = list(zip(X.split(500), w.split(500) if weighted else [None] * 12))

    def run(model, parts):
        for b, bw in parts:
            model.partial_fit(b, sample_weight=bw)
        return model

    a = run(MultiOnlineConstrainedKMeans((8, 12), random_state=0, device="cuda"), batches)
    b = run(MultiOnlineConstrainedKMeans((8, 12), random_state=0, device="cuda"), batches)
    for ca, cb in zip(a.cluster_centers_, b.cluster_centers_):
        assert torch.equal(ca, cb)

    half = run(MultiOnlineConstrainedKMeans((8, 12), random_state=0, device="cuda"), batches[:6])
    half.save(tmp_path / "m.st")
    resumed = run(MultiOnlineConstrainedKMeans.load(tmp_path / "m.st"), batches[6:])
    for ca, cr in zip(a.cluster_centers_, resumed.cluster_centers_):
        assert torch.equal(ca, cr.to(ca.device))
    assert torch.equal(a.labels_, resumed.labels_.to(a.labels_.device))
