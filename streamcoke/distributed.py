"""Keeping clusterer state identical across ``torch.distributed`` ranks.

Every rank assigns its own rows with the same centers and duals; the per-batch statistics
(member counts, member sums, batch weight) are summed over ranks before any state changes, so
every rank applies the same update as one process that saw the global batch.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch import Tensor

if dist.is_available():
    # Imported before any process group exists: its functions take ``group=group.WORLD`` as a
    # default argument, evaluated at import, so importing it later (DistributedDataParallel
    # does, on first use) stores the default group in a dozen defaults for good, and the group
    # then outlives destroy_process_group (see ``leave``).
    import torch.distributed.nn.functional  # noqa: F401


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK``'s under torchrun, even when the caller never called
    ``torch.cuda.set_device``, which would otherwise put every rank on GPU 0), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if is_distributed() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device())


def collective_device(device: torch.device) -> torch.device:
    """Where a collective's tensors must be: gloo works on host tensors, NCCL on CUDA ones (a
    host tensor goes through this process's current GPU); a group with a backend per device
    type ("cpu:gloo,cuda:nccl") takes tensors where they are."""
    device, backend = torch.device(device), str(dist.get_backend())
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _collective_device(t: Tensor) -> torch.device:
    return collective_device(t.device)


def all_reduce_sum(*tensors: Tensor) -> list[Tensor]:
    """Sum tensors over all ranks (new tensors; a no-op copy-free pass-through when not distributed)."""
    if not is_distributed():
        return list(tensors)
    out = []
    for t in tensors:
        buf = t.to(_collective_device(t), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        out.append(buf.to(t.device))
    return out


def all_gather_rows(X: Tensor) -> Tensor:
    """Concatenate every rank's rows in rank order (ranks may hold different numbers of rows)."""
    if not is_distributed():
        return X
    dev = _collective_device(X)
    n = torch.tensor([X.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes),) + tuple(X.shape[1:]), dtype=X.dtype, device=dev)
    padded[: X.shape[0]] = X.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(X.device)


def init_from_env(device: str | None = None) -> torch.device | None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``):
    NCCL on this process's GPU when CUDA is available (and ``device`` does not say otherwise),
    gloo on the CPU. Returns the process's device; without torchrun (one process), the
    ``device`` asked for, or None for the default."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return torch.device(device) if device else None
    if torch.cuda.is_available() and (device is None or device.startswith("cuda")):
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return local
    dist.init_process_group("gloo")
    return torch.device("cpu")


def leave() -> None:
    """Leave the default process group (if any) and let the backend's threads finish now.

    ``destroy_process_group`` only unregisters the group; its threads stop when the last
    reference to it goes (this module imports ``torch.distributed.nn.functional`` early, whose
    default arguments would otherwise hold it). Call this after dropping every object that
    holds the group (:meth:`streamcoke.train.CoKeTrainer.release_process_group` drops
    DistributedDataParallel's). Left to interpreter shutdown, a gloo worker thread that still
    releases a finished collective's tensors needs the GIL, which shutdown no longer hands
    out, and the process aborts ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # holders caught in reference cycles
        dist.destroy_process_group()
