"""Turning user input (numpy arrays, array-likes, torch tensors) into float32 tensors on the
clusterer's device, and results back into the caller's kind of array."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils.validation import _check_sample_weight, validate_data
from torch import Tensor

from ..core import cpu


@dataclass(frozen=True)
class InputKind:
    """Where a batch came from, so results can go back there."""

    is_torch: bool
    device: torch.device | None = None

    def out(self, t: Tensor):
        """Return ``t`` as the caller's kind: a tensor on the caller's device, or numpy."""
        if self.is_torch:
            return t.to(self.device)
        return t.detach().cpu().numpy()


def as_features(est, X, *, reset: bool, device: torch.device) -> tuple[Tensor, InputKind]:
    """Validate ``X`` as (n_samples, n_features) finite floats; returns a float32 tensor on
    ``device``. ``reset=True`` records ``n_features_in_`` (and feature names) on ``est``."""
    if isinstance(X, Tensor):
        return _tensor_features(est, X, reset=reset, device=device), InputKind(True, X.device)
    fast = _plain_batch(est, X, reset=reset, device=device)
    if fast is not None:
        return fast, InputKind(False)
    X = validate_data(est, X, reset=reset, dtype=[np.float32, np.float64], ensure_min_samples=1)
    X = np.asarray(X, dtype=np.float32)
    if not X.flags.writeable:  # torch cannot wrap a read-only buffer without a warning
        X = X.copy()
    return torch.from_numpy(X).to(device), InputKind(False)


def _plain_batch(est, X, *, reset: bool, device: torch.device) -> Tensor | None:
    """A batch for a fitted estimator that is a plain finite float32 or float64 ndarray of the
    right width, as a float32 tensor, without scikit-learn's validation (which costs about as
    much as the rest of a step's bookkeeping); None for anything else, which then takes the full
    validation and its error messages."""
    if reset or type(X) not in (np.ndarray, np.memmap) or X.ndim != 2 or X.dtype not in (np.float32, np.float64) \
            or X.shape[0] == 0 or X.shape[1] != getattr(est, "n_features_in_", -1) \
            or hasattr(est, "feature_names_in_"):
        return None
    if X.dtype != np.float32 or not X.flags.writeable:  # torch wraps only writeable buffers
        X = X.astype(np.float32)
    t = torch.from_numpy(X).to(device)
    return t if _all_finite(t) else None


def _tensor_features(est, X: Tensor, *, reset: bool, device: torch.device) -> Tensor:
    name = type(est).__name__
    if X.ndim != 2:
        raise ValueError(
            f"Expected a 2-D tensor of shape (n_samples, n_features), got shape {tuple(X.shape)}; "
            "reshape a single sample with X.reshape(1, -1).")
    if X.shape[0] == 0:
        raise ValueError(f"Found an empty batch: X has shape {tuple(X.shape)}; {name} needs at least 1 sample.")
    if X.shape[1] == 0:
        raise ValueError(f"X has shape {tuple(X.shape)}: 0 features, a minimum of 1 is required.")
    if X.is_complex():
        raise ValueError("Complex data not supported: X is a complex tensor.")
    if X.dtype == torch.bool:
        raise ValueError("X is a boolean tensor; convert it to floats first.")
    if not reset and X.shape[1] != est.n_features_in_:
        raise ValueError(
            f"X has {X.shape[1]} features, but {name} is expecting {est.n_features_in_} features as input.")
    Xt = X.detach().to(device=device, dtype=torch.float32)
    if not _all_finite(Xt):
        bad = (~torch.isfinite(Xt)).any(dim=1).nonzero()[:5, 0].tolist()
        raise ValueError(f"Input X contains NaN or infinity (first bad rows: {bad}).")
    if reset:
        est.n_features_in_ = int(X.shape[1])
        if hasattr(est, "feature_names_in_"):
            del est.feature_names_in_
    return Xt


def _all_finite(X: Tensor) -> bool:
    """Whether ``X`` holds no NaN and no infinity, in one pass over it."""
    kernel = cpu.kernels() if X.device.type == "cpu" and X.ndim == 2 else None
    if kernel is not None:
        return kernel.all_finite(X.contiguous())
    # The sum is finite whenever every entry is (NaN and inf propagate), and costs one pass;
    # only when it is not (a NaN or inf, or merely an overflow) is the exact check run.
    return bool(torch.isfinite(X.sum())) or bool(torch.isfinite(X).all())


def as_weights(sample_weight, X: Tensor) -> Tensor | None:
    """Validate per-sample weights (non-negative, finite, one per row); ``None`` means all ones."""
    if sample_weight is None:
        return None
    if isinstance(sample_weight, Tensor):
        w = sample_weight.detach().to(device=X.device, dtype=torch.float32).reshape(-1)
        if w.shape[0] != X.shape[0]:
            raise ValueError(
                f"sample_weight.shape == ({w.shape[0]},), expected ({X.shape[0]},)!")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("sample_weight contains NaN or infinity.")
    else:
        w_np = _check_sample_weight(sample_weight, np.empty((X.shape[0], 0)), dtype=np.float64)
        w = torch.from_numpy(np.asarray(w_np, dtype=np.float32)).to(X.device)
    if bool((w < 0).any()):
        raise ValueError("sample_weight has negative values; weights must be >= 0.")
    if not bool((w > 0).any()):
        raise ValueError("sample_weight is zero for every sample of the batch.")
    return w
