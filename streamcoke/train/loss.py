"""The CoKe training loss: discriminate each sample's pseudo-label against fixed centers.

For every clustering h, the logits of sample i are its similarities to the centers published at
the last epoch boundary, divided by a temperature; the loss is the cross-entropy against the
label the sample received in the previous epoch (or a soft distribution over labels in stage
two), averaged over the clusterings. The centers are constants: gradients reach the network only.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -1  # label of a sample that has no pseudo-label yet; it does not count in the loss


def head_logits(z: Tensor, centers: Tensor, head_sizes: Sequence[int], temperature: float) -> list[Tensor]:
    """Similarity of every row of ``z`` to the stacked centers of all clusterings, split per
    clustering (one matrix multiply for all of them)."""
    logits = (z @ centers.to(z.dtype).T) / temperature
    return list(torch.split(logits, list(head_sizes), dim=1))


def coke_loss(z: Tensor, centers: Tensor, head_sizes: Sequence[int], targets: Tensor | Sequence[Tensor],
              temperature: float = 0.1) -> Tensor:
    """Mean over clusterings of the cross-entropy of ``softmax(z c^T / T)``.

    ``targets`` is either an int64 tensor (B, H) of hard labels (``IGNORE`` rows of a column do
    not count) or a list of H soft-label tensors (B, K_h) whose rows sum to one. Computed in
    float32 whatever the autocast dtype of ``z``, since the softmax of 1/T-scaled logits is
    where half precision loses most.
    """
    logits = head_logits(z.float(), centers.float(), head_sizes, temperature)
    if isinstance(targets, Tensor):
        if targets.ndim != 2 or targets.shape != (z.shape[0], len(head_sizes)):
            raise ValueError(f"targets have shape {tuple(targets.shape)}, expected ({z.shape[0]}, {len(head_sizes)})")
        # Mean over the labelled rows of each clustering, without a host sync to find them; a
        # clustering with none contributes zero.
        losses = [F.cross_entropy(lg, targets[:, h], ignore_index=IGNORE, reduction="sum")
                  / (targets[:, h] != IGNORE).sum().clamp_min(1) for h, lg in enumerate(logits)]
        return torch.stack(losses).mean()
    if len(targets) != len(head_sizes):
        raise ValueError(f"got {len(targets)} soft-target tensors for {len(head_sizes)} clusterings")
    # Rows without any recent label are all zero: averaged over the labelled rows only, as above.
    losses = [-(t * F.log_softmax(lg, dim=1)).sum() / (t.sum(1) > 0).sum().clamp_min(1)
              for t, lg in zip(targets, logits)]
    return torch.stack(losses).mean()


def sharpened_histogram(labels: Tensor, n_clusters: int, temperature: float = 0.5) -> Tensor:
    """Soft labels from each row's recent hard labels (B, m): the label frequencies raised to
    the power ``1/temperature`` and renormalised. ``IGNORE`` entries do not count; a row with
    none left gets a zero row (it then adds nothing to the loss)."""
    valid = labels != IGNORE
    counts = torch.zeros(labels.shape[0], n_clusters, device=labels.device)
    counts.scatter_add_(1, labels.clamp_min(0), valid.float())
    p = counts.pow(1.0 / temperature)
    return p / p.sum(1, keepdim=True).clamp_min(1e-12)
