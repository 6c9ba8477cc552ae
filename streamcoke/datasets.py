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
    means = rng.normal(size=(n_components, n_features))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(n_components, concentration))
    y = rng.choice(n_components, size=n_samples, p=weights)
    X = means[y] + spread * rng.normal(size=(n_samples, n_features)) / np.sqrt(n_features)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y.astype(np.int64), means.astype(np.float32)
