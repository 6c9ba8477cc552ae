"""Frozen-feature evaluation: embedding, k-NN and linear-probe top-1, k-means quality."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from streamcoke.train import evaluate
from streamcoke.train.evaluate import (
    cluster_scores,
    embed,
    evaluate_features,
    knn_cross_validated,
    knn_predict,
    knn_top1,
    linear_probe,
    linear_probe_cross_validated,
)


def blobs(n_per_class=40, n_classes=3, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * 5
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centers[y] + spread * rng.normal(size=(len(y), dim))
    return X.astype(np.float32), y


# --- k-NN ------------------------------------------------------------------------------------

def test_knn_on_separated_blobs_is_perfect():
    X, y = blobs()
    train, test = np.arange(len(y)) % 2 == 0, np.arange(len(y)) % 2 == 1
    assert knn_top1(X[train], y[train], X[test], y[test]) == 1.0
    assert knn_top1(torch.from_numpy(X[train]), torch.from_numpy(y[train]),
                    torch.from_numpy(X[test]), torch.from_numpy(y[test])) == 1.0
    assert knn_cross_validated(X, y + 10, folds=3) == 1.0  # any integer class ids


def test_knn_on_random_labels_is_near_chance():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(400, 8)), rng.integers(0, 4, 400)
    assert 0.12 < knn_cross_validated(X, y, folds=4) < 0.38


def test_knn_weighting_matches_a_hand_computed_vote():
    # The query [1, 0] has similarity 1.0 to the class-0 sample and 0.8, 0.6 to the class-1 ones.
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]], dtype=np.float32)
    labels = np.array([0, 1, 1])
    query, truth = np.array([[2.0, 0.0]], dtype=np.float32), np.array([0])
    assert knn_top1(train, labels, query, truth, k=3, temperature=0.07) == 1.0  # e^14.3 > e^11.4 + e^8.6
    assert knn_top1(train, labels, query, truth, k=3, temperature=1.0) == 0.0  # e^1 < e^0.8 + e^0.6
    assert knn_top1(train, labels, query, truth, k=1, temperature=1.0) == 1.0


def test_knn_chunking_does_not_change_predictions(monkeypatch):
    X, y = blobs(n_classes=4, spread=3.0, seed=2)
    args = (torch.from_numpy(X[:100]), torch.from_numpy(y[:100]), torch.from_numpy(X[100:]))
    whole = knn_predict(*args, n_classes=4, k=5, temperature=0.1)
    monkeypatch.setattr(evaluate, "KNN_CHUNK_ELEMENTS", 7 * 100)  # 7 test rows at a time
    assert torch.equal(knn_predict(*args, n_classes=4, k=5, temperature=0.1), whole)


# --- linear probe and clustering -------------------------------------------------------------

def test_linear_probe_on_separable_data_is_high():
    X, y = blobs(spread=1.0, seed=3)
    assert linear_probe(X[::2], y[::2], X[1::2], y[1::2]) >= 0.95
    assert linear_probe_cross_validated(X, y, folds=3) >= 0.95


def test_cluster_scores_on_blobs_are_perfect():
    X, y = blobs(seed=4)
    scores = cluster_scores(X, y, n_clusters=3)
    assert scores == pytest.approx({"ACC": 1.0, "NMI": 1.0, "ARI": 1.0})


def test_evaluate_features_reports_every_score():
    X, y = blobs(n_per_class=20, seed=5)
    scores = evaluate_features(X, y, folds=3)
    assert set(scores) == {"knn_top1", "linear_top1", "ACC", "NMI", "ARI"}
    assert all(v == pytest.approx(1.0) for v in scores.values())
    assert evaluate_features(X, y, n_clusters=6, folds=3)["ACC"] < 1.0  # unmatched clusters count as errors


# --- validation ------------------------------------------------------------------------------

def test_inputs_are_validated():
    X, y = blobs(n_per_class=10)
    with pytest.raises(ValueError, match="30 feature rows but targets of shape"):
        knn_top1(X, y[:-1], X, y)
    bad = X.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values in 1 rows .*row 3"):
        linear_probe(X, y, bad, y)
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        knn_top1(X, np.zeros(len(X), dtype=int), X, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        cluster_scores(X, np.ones(len(X), dtype=int), 3)
    with pytest.raises(ValueError, match="16 dimensions, test features 4"):
        knn_top1(X, y, X[:, :4], y)
    with pytest.raises(ValueError, match="integer class ids"):
        linear_probe(X, y.astype(float), X, y)
    with pytest.raises(ValueError, match="folds must be in"):
        knn_cross_validated(X, y, folds=1)
    with pytest.raises(ValueError, match="n_clusters must be in"):
        cluster_scores(X, y, 0)


# --- embed -----------------------------------------------------------------------------------

def _batches(images, targets, order, size=5):
    for s in range(0, len(order), size):
        i = order[s:s + size]
        yield SimpleNamespace(images=images[i], target=targets[i], index=torch.as_tensor(i))


def test_embed_returns_features_sorted_by_index_and_restores_mode():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (23, 1, 4, 4), dtype=torch.uint8)
    targets = torch.arange(23) % 3
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6))
    model.train()
    order = torch.randperm(23)
    feats, tgt, idx = embed(model, _batches(images, targets, order))
    assert model.training
    assert feats.dtype == np.float32 and feats.shape == (23, 6)
    assert tgt.dtype == np.int64 and idx.dtype == np.int64
    np.testing.assert_array_equal(idx, np.arange(23))
    np.testing.assert_array_equal(tgt, targets.numpy())
    with torch.no_grad():
        expected = model.eval()(images.float() / 255).numpy()
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)

    halved, _, _ = embed(model, _batches(images, targets, order), transform=lambda x: x.float() / 510,
                         progress=True)
    with torch.no_grad():
        np.testing.assert_allclose(halved, model(images.float() / 510).numpy(), rtol=1e-5, atol=1e-6)


def test_embed_rejects_bad_models_and_empty_input():
    images, targets = torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"must return a \(B, D\) tensor"):
        embed(nn.Flatten(0), _batches(images, targets, torch.arange(4)))
    with pytest.raises(ValueError, match="yielded nothing"):
        embed(nn.Flatten(), iter([]))
