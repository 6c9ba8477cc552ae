"""Small real and synthetic data sets that need no download."""

from __future__ import annotations

import numpy as np


def load_digits_features() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (1797 images of 8x8 pixels, 10 classes) as float32 rows."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def imbalanced_mixture(n_samples: int, n_components: int, n_features: int, *, concentration: float = 0.3,
                       spread: float = 0.35, random_state=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian mixture on the unit sphere with very unequal component weights.

    Component weights are drawn from a symmetric Dirichlet(``concentration``) (small values give
    a few large and many tiny components). Returns ``(X, y, means)`` with L2-normalised rows.
    """
    rng = np.random.default_rng(random_state)
    X, y, means = _sphere_mixture(rng, n_samples, n_components, n_features, concentration, spread)
    return X.astype(np.float32), y.astype(np.int64), means.astype(np.float32)


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.normal(size=(n, d))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _sphere_mixture(rng: np.random.Generator, n_samples: int, n_components: int, n_features: int,
                    concentration: float, noise: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-norm component means with Dirichlet weights; noisy samples projected onto the sphere."""
    means = _unit_rows(rng, n_components, n_features)
    weights = rng.dirichlet(np.full(n_components, concentration))
    y = rng.choice(n_components, size=n_samples, p=weights)
    X = means[y] + noise * rng.normal(size=(n_samples, n_features)) / np.sqrt(n_features)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X, y, means


def starved_clusters_problem(n_samples: int, n_clusters: int, n_features: int = 32, *, noise: float = 0.8,
                             concentration: float = 0.3, random_state=None) -> tuple[np.ndarray, np.ndarray]:
    """A stream and fixed centers on which unconstrained assignment starves many clusters.

    Half of the ``n_clusters`` centers are the means of an imbalanced mixture (weights drawn from
    Dirichlet(``concentration``)) that generates the stream; the other half are random unit
    vectors far from most of the data. Returns ``(X, centers)``, both L2-normalised rows, the
    centers in random order. Used to hold the online constrained assignment to the exact optimum.
    """
    rng = np.random.default_rng(random_state)
    n_components = max(1, n_clusters // 2)
    X, _, means = _sphere_mixture(rng, n_samples, n_components, n_features, concentration, noise)
    extra = _unit_rows(rng, n_clusters - n_components, n_features)
    centers = np.concatenate([means, extra])[rng.permutation(n_clusters)]
    return X.astype(np.float32), centers.astype(np.float32)
