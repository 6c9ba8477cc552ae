"""The default step size of the dual ascent (used when ``dual_lr=None``)."""

from __future__ import annotations


def default_step_size(batch_weight: float, n_steps: int) -> float:
    """Step size ``eta`` for the dual update of a batch of total weight ``batch_weight``.

    Provisional rule: a constant per-sample rate, ``eta = 5 / 64`` per sample of the batch.
    """
    return (5.0 / 64.0) * batch_weight
