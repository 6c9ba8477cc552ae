"""Label memory: each sample's pseudo-labels of the recent epochs, by stable sample index.

The loss of epoch t uses the labels assigned in epoch t-1 (so the clustering and the network
never chase each other within an epoch); stage two uses the last few epochs. The memory is a
ring of ``history + 1`` slots of shape (n_samples, n_clusterings): the slot of the running
epoch, being written, and the ``history`` completed epochs before it, which are only read.
Labels are stored as int32 (half the memory of int64 at a billion-sample scale) and served as
the int64 that losses index with.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .loss import IGNORE


class LabelMemory:
    """Pseudo-labels of ``n_samples`` samples for ``n_heads`` clusterings over ``history`` epochs."""

    def __init__(self, n_samples: int, n_heads: int, history: int = 1, device=None):
        if n_samples < 1 or n_heads < 1 or history < 1:
            raise ValueError(f"LabelMemory needs positive sizes, got n_samples={n_samples}, "
                             f"n_heads={n_heads}, history={history}")
        self.labels = torch.full((history + 1, n_samples, n_heads), IGNORE, dtype=torch.int32, device=device)
        self.epoch = 0

    @property
    def n_samples(self) -> int:
        return self.labels.shape[1]

    @property
    def history(self) -> int:
        return self.labels.shape[0] - 1

    @property
    def _slots(self) -> int:
        return self.labels.shape[0]

    def check_index(self, index: Tensor, source: str = "") -> None:
        """A clear error when a sample index does not fit the memory: the shard set is not the
        one the memory was sized for, which would otherwise silently train on wrong labels."""
        if index.numel() == 0:
            return
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= self.n_samples:
            bad = lo if lo < 0 else hi
            where = f" in {source}" if source else ""
            raise ValueError(f"sample index {bad}{where} is outside the label memory of {self.n_samples} samples; "
                             "the shards do not match the data set size the run was set up for "
                             "(set n_samples to the number of samples, or rewrite the shards with "
                             "`streamcoke shards` so indices run from 0 to N-1)")

    def write(self, index: Tensor, labels: Tensor, *, checked: bool = False) -> None:
        """Record this epoch's labels (B, n_heads) of the samples ``index`` (B,); ``checked``
        skips the range check (a host sync on a GPU) for indices already checked."""
        if not checked:
            self.check_index(index)
        self.labels[self.epoch % self._slots, index.to(self.labels.device)] = labels.to(self.labels)

    def previous(self, index: Tensor) -> Tensor:
        """Labels from the last completed epoch, (B, n_heads); ``IGNORE`` where none."""
        if self.epoch == 0:
            return torch.full((index.shape[0], self.labels.shape[2]), IGNORE, dtype=torch.int64,
                              device=self.labels.device)
        return self.labels[(self.epoch - 1) % self._slots, index.to(self.labels.device)].long()

    def recent(self, index: Tensor) -> Tensor:
        """Labels of the last ``min(history, epochs completed)`` epochs, (B, m, n_heads)."""
        m = min(self.history, self.epoch)
        slots = [(self.epoch - 1 - j) % self._slots for j in range(m)]
        return self.labels[slots][:, index.to(self.labels.device)].transpose(0, 1).long()

    def end_epoch(self) -> None:
        """Close the epoch; the next one writes the oldest slot, cleared first so that a sample
        not seen in the new epoch cannot carry a stale label forward."""
        self.epoch += 1
        self.labels[self.epoch % self._slots] = IGNORE

    def coverage(self) -> float:
        """Fraction of samples labelled in the last completed epoch."""
        if self.epoch == 0:
            return 0.0
        return float((self.labels[(self.epoch - 1) % self._slots, :, 0] != IGNORE).float().mean())

    def state_dict(self) -> dict:
        return {"labels": self.labels, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        labels = state["labels"]
        if tuple(labels.shape) != tuple(self.labels.shape):
            raise ValueError(f"label memory of shape {tuple(labels.shape)} does not fit this run's "
                             f"{tuple(self.labels.shape)} (history, samples, clusterings)")
        self.labels = labels.to(self.labels.device, torch.int32).clone()
        self.epoch = int(state["epoch"])

