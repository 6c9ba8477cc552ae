"""Two processes on gloo hold identical state, equal to one process that saw the global batches."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from streamcoke import MultiOnlineConstrainedKMeans, OnlineConstrainedKMeans
from streamcoke.datasets import imbalanced_mixture

WORLD = 2
N_BATCHES = 8
GLOBAL_BATCH = 200
ROW_KEYS = ("labels", "assigned_similarity")  # per row of the last batch: each rank has its own rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make(multi: bool, init: str):
    kw = dict(min_size_ratio=0.6, max_size_ratio=2.5, init=init, random_state=0)
    return MultiOnlineConstrainedKMeans((5, 9), **kw) if multi else OnlineConstrainedKMeans(9, **kw)


def _worker(rank, port, out_dir, multi, init):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        X, _, _ = imbalanced_mixture(N_BATCHES * GLOBAL_BATCH, 6, 12, random_state=1)
        km = _make(multi, init)
        labels = []
        for t in range(N_BATCHES):
            batch = X[t * GLOBAL_BATCH:(t + 1) * GLOBAL_BATCH]
            local = np.array_split(batch, WORLD)[rank]
            km.partial_fit(local)
            labels.append(km.labels_)
            if t == N_BATCHES // 2:
                km.end_epoch()
        km.save(os.path.join(out_dir, f"rank{rank}.st"))
        np.save(os.path.join(out_dir, f"labels{rank}.npy"), np.concatenate(labels))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("multi", "init"), [(False, "k-means++"), (True, "random")], ids=["single", "multi"])
def test_two_gloo_ranks_match_one_process(tmp_path, multi, init):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), multi, init), nprocs=WORLD,
                       join=True, start_method="spawn")
    cls = type(_make(multi, init))
    r0, r1 = cls.load(tmp_path / "rank0.st"), cls.load(tmp_path / "rank1.st")
    s0, s1 = r0.state_dict()["tensors"], r1.state_dict()["tensors"]
    for k in s0:
        if k not in ROW_KEYS:  # each rank keeps the labels of its own rows
            assert torch.equal(s0[k], s1[k]), f"ranks differ in {k}"

    X, _, _ = imbalanced_mixture(N_BATCHES * GLOBAL_BATCH, 6, 12, random_state=1)
    ref = _make(multi, init)
    ref_labels = []
    for t in range(N_BATCHES):
        ref.partial_fit(X[t * GLOBAL_BATCH:(t + 1) * GLOBAL_BATCH])
        ref_labels.append(ref.labels_)
        if t == N_BATCHES // 2:
            ref.end_epoch()
    sr = ref.state_dict()["tensors"]
    for k in s0:
        if k not in ROW_KEYS:
            assert torch.allclose(s0[k].double(), sr[k].double(), atol=1e-5), f"{k} differs from one process"
    assert r0.n_samples_seen_ == ref.n_samples_seen_ == N_BATCHES * GLOBAL_BATCH
    # Labels of the global batch = rank 0's rows followed by rank 1's rows.
    per_rank = [np.load(tmp_path / f"labels{r}.npy").reshape(N_BATCHES, GLOBAL_BATCH // WORLD, -1)
                for r in range(WORLD)]
    got = np.concatenate(per_rank, axis=1).reshape(N_BATCHES * GLOBAL_BATCH, -1)
    assert np.array_equal(got, np.concatenate(ref_labels).reshape(len(got), -1))


@pytest.mark.parametrize("backend, device, expected", [
    ("gloo", "cuda:1", "cpu"),             # gloo reduces host tensors
    ("nccl", "cpu", "cuda:3"),              # NCCL takes CUDA tensors only: through the current GPU
    ("nccl", "cuda:1", "cuda:1"),
    ("cpu:gloo,cuda:nccl", "cpu", "cpu"),   # a backend per device type: tensors stay put
    ("cpu:gloo,cuda:nccl", "cuda:1", "cuda:1"),
])
def test_collectives_run_where_the_backend_can_take_them(monkeypatch, backend, device, expected):
    from streamcoke import distributed

    monkeypatch.setattr(dist, "get_backend", lambda *a, **k: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.collective_device(torch.device(device)) == torch.device(expected)
