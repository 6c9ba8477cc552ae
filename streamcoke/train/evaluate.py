"""Evaluation of frozen features: k-NN and linear-probe top-1, and k-means clustering quality.

The protocols of the self-supervised literature: a weighted k-nearest-neighbour vote on cosine
similarity (Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination", 2018: weights ``exp(sim / T)``, k = 20, T = 0.07), logistic regression on the
standardised features, and k-means on the L2-normalised features scored by ACC, NMI and ARI
(:mod:`streamcoke.metrics`). Data sets without a train/test split are scored by stratified
cross-validation. Features and targets may be numpy arrays or torch tensors.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from tqdm.auto import tqdm

from streamcoke.metrics import clustering_scores

KNN_CHUNK_ELEMENTS = 1 << 24  # similarities held at once by the k-NN vote (64 MiB of float32)


@torch.no_grad()
def embed(model: nn.Module, batches: Iterable, *, device=None,
          transform: Callable[[Tensor], Tensor] | None = None,
          progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of every sample of ``batches`` under ``model`` in eval mode.

    Parameters
    ----------
    model : maps a float batch (B, C, H, W) to features (B, D) (extra trailing dims are flattened).
    batches : objects with ``.images`` (uint8 (B, C, H, W)), ``.target`` and ``.index`` (B,).
    device : where the model runs; default: the device of its first parameter (CPU without any).
    transform : turns the uint8 images (already on ``device``) into the model's input; default
        ``images.float() / 255``.
    progress : show a progress bar.

    Returns
    -------
    features : float32 (N, D), targets : int64 (N,), index : int64 (N,), all sorted by index.
    The model's train/eval mode is restored afterwards.
    """
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    transform = transform or _default_transform
    feats, targets, index = [], [], []
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="embed", unit="batch", disable=not progress):
            images = torch.as_tensor(batch.images).to(device, non_blocking=True)
            out = model(transform(images))
            if not isinstance(out, Tensor) or out.ndim < 2 or out.shape[0] != images.shape[0]:
                raise ValueError(f"model must return a (B, D) tensor for B = {images.shape[0]} "
                                 f"images, got {_describe(out)}")
            feats.append(out.flatten(1).float().cpu())
            targets.append(_int_column(batch.target, "target"))
            index.append(_int_column(batch.index, "index"))
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("embed: batches yielded nothing")
    index_all = np.concatenate(index)
    order = np.argsort(index_all, kind="stable")
    return (torch.cat(feats).numpy()[order], np.concatenate(targets)[order], index_all[order])


def knn_top1(train_features, train_targets, test_features, test_targets, *, k: int = 20,
             temperature: float = 0.07) -> float:
    """Top-1 accuracy of a weighted k-NN vote: each test sample's ``k`` most cosine-similar
    training samples vote for their class with weight ``exp(sim / temperature)``."""
    Xtr, ytr = _checked(train_features, train_targets, "train", min_classes=2)
    Xte, yte = _checked(test_features, test_targets, "test")
    _check_same_dim(Xtr, Xte)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    classes, ytr_idx = np.unique(ytr, return_inverse=True)
    pred = knn_predict(torch.from_numpy(Xtr), torch.from_numpy(ytr_idx), torch.from_numpy(Xte),
                       n_classes=len(classes), k=min(k, len(Xtr)), temperature=temperature)
    return float(np.mean(classes[pred.numpy()] == yte))


def knn_predict(train: Tensor, train_labels: Tensor, test: Tensor, *, n_classes: int, k: int,
                temperature: float) -> Tensor:
    """Class indices (0..n_classes-1) voted by the ``k`` nearest training rows of every test row.

    Rows are L2-normalised here; the test set is processed in chunks so that at most about
    ``KNN_CHUNK_ELEMENTS`` similarities exist at once.
    """
    train = nn.functional.normalize(train.float(), dim=1)
    test = nn.functional.normalize(test.float(), dim=1)
    chunk = max(1, KNN_CHUNK_ELEMENTS // len(train))
    preds = []
    for start in range(0, len(test), chunk):
        sims, idx = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        # Shifting by each row's best similarity leaves the vote unchanged but keeps exp finite
        # for any temperature.
        weights = torch.exp((sims - sims[:, :1]) / temperature)
        votes = weights.new_zeros(len(sims), n_classes).scatter_add_(1, train_labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_cross_validated(features, targets, *, folds: int = 5, k: int = 20, temperature: float = 0.07,
                        random_state: int = 0) -> float:
    """:func:`knn_top1` pooled over stratified ``folds``-fold cross-validation."""
    return _cross_validated(lambda a, b, c, d: knn_top1(a, b, c, d, k=k, temperature=temperature),
                            features, targets, folds, random_state)


def linear_probe(train_features, train_targets, test_features, test_targets, *, C: float = 1.0,
                 max_iter: int = 1000) -> float:
    """Top-1 accuracy of logistic regression (inverse regularisation ``C``) on standardised features."""
    Xtr, ytr = _checked(train_features, train_targets, "train", min_classes=2)
    Xte, yte = _checked(test_features, test_targets, "test")
    _check_same_dim(Xtr, Xte)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    probe.fit(Xtr, ytr)
    return float(probe.score(Xte, yte))


def linear_probe_cross_validated(features, targets, *, folds: int = 5, C: float = 1.0,
                                 max_iter: int = 1000, random_state: int = 0) -> float:
    """:func:`linear_probe` pooled over stratified ``folds``-fold cross-validation."""
    return _cross_validated(lambda a, b, c, d: linear_probe(a, b, c, d, C=C, max_iter=max_iter),
                            features, targets, folds, random_state)


def cluster_scores(features, targets, n_clusters: int, *, random_state: int = 0) -> dict[str, float]:
    """ACC, NMI and ARI of k-means (10 restarts) on the L2-normalised features."""
    X, y = _checked(features, targets, "features", min_classes=2)
    if not 1 <= n_clusters <= len(X):
        raise ValueError(f"n_clusters must be in [1, {len(X)}] (the number of samples), got {n_clusters}")
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    labels = KMeans(n_clusters=n_clusters, n_init=10, random_state=random_state).fit_predict(X)
    return clustering_scores(y, labels)


def evaluate_features(features, targets, *, n_clusters: int | None = None, folds: int = 5,
                      random_state: int = 0) -> dict[str, float]:
    """All the scores of frozen features without a split: cross-validated k-NN and linear-probe
    top-1 (``knn_top1``, ``linear_top1``) and k-means ``ACC``, ``NMI``, ``ARI`` with
    ``n_clusters`` (default: the number of classes)."""
    X, y = _checked(features, targets, "features", min_classes=2)
    n_clusters = len(np.unique(y)) if n_clusters is None else n_clusters
    return {
        "knn_top1": knn_cross_validated(X, y, folds=folds, random_state=random_state),
        "linear_top1": linear_probe_cross_validated(X, y, folds=folds, random_state=random_state),
        **cluster_scores(X, y, n_clusters, random_state=random_state),
    }


def _cross_validated(score: Callable[..., float], features, targets, folds: int,
                     random_state: int) -> float:
    # Pooled over folds (correct / N), so unequal fold sizes weigh in proportion.
    X, y = _checked(features, targets, "features", min_classes=2)
    if not 2 <= folds <= len(X):
        raise ValueError(f"folds must be in [2, {len(X)}] (the number of samples), got {folds}")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=random_state)
    correct = 0.0
    for train, test in splitter.split(X, y):
        correct += score(X[train], y[train], X[test], y[test]) * len(test)
    return correct / len(X)


def _checked(features, targets, name: str, min_classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """float32 (N, D) features and int64 (N,) targets, or a ValueError saying what is wrong."""
    X = _numpy(features).astype(np.float32, copy=False)
    y = _numpy(targets)
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(f"{name} features must be a non-empty (N, D) array, got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"{name}: {len(X)} feature rows but targets of shape {y.shape}")
    if y.dtype.kind not in "iub":
        raise ValueError(f"{name} targets must be integer class ids, got dtype {y.dtype}")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        raise ValueError(f"{name} features hold NaN or infinite values in {int(bad.sum())} rows "
                         f"(first: row {int(np.flatnonzero(bad)[0])})")
    if len(np.unique(y)) < min_classes:
        raise ValueError(f"{name} targets need at least {min_classes} classes, got {len(np.unique(y))}")
    return X, y.astype(np.int64, copy=False)


def _check_same_dim(train: np.ndarray, test: np.ndarray) -> None:
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"train features have {train.shape[1]} dimensions, test features {test.shape[1]}")


def _numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def _int_column(x, name: str) -> np.ndarray:
    col = _numpy(x).reshape(-1)
    if col.dtype.kind not in "iub":
        raise ValueError(f"batch .{name} must hold integers, got dtype {col.dtype}")
    return col.astype(np.int64, copy=False)


def _default_transform(images: Tensor) -> Tensor:
    return images.float() / 255


def _describe(out) -> str:
    return f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
