"""Online constrained k-means as a river clusterer: one dict at a time, clusters that cannot starve.

river streams samples as ``{feature name: value}`` dicts whose keys may change from one sample to
the next. This adapter keeps the per-sample path in numpy: a feature-name -> column map and small
dense arrays (centers, duals, counts), so one ``learn_one`` costs a few small numpy operations and
no torch call. The maths is the library's: the dual update is
:func:`streamcoke.core.duals.dual_step`, its default step size
:func:`streamcoke.core.schedule.default_step_size`, and the seeding
:func:`streamcoke.core.init.initial_centers`.

Install the optional dependency with ``pip install "streamcoke[river]"``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

try:
    from river import base
except ImportError as exc:  # pragma: no cover - exercised by a test that hides river
    raise ImportError(
        'streamcoke.adapters.river needs the river package; install it with '
        'pip install "streamcoke[river]"'
    ) from exc

from streamcoke.core.duals import dual_step
from streamcoke.core.similarity import METRICS
from streamcoke.core.schedule import default_step_size, update_gap

__all__ = ["OnlineConstrainedKMeans", "ConstrainedKMeans"]

CENTER_UPDATES = ("mean", "ema", "none")
_PLAIN_NUMBERS = frozenset({float, int, bool})


# ------------------------------------------------------------------------------ pure numpy maths
def biased_scores_one(centers: np.ndarray, offset: np.ndarray, v: np.ndarray, metric: str) -> np.ndarray:
    """``s_k + rho_k - mu_k`` for one prepared sample, up to a constant that does not change the
    winner (the numpy twin of :func:`streamcoke.core.similarity.score_terms`).

    ``offset`` is ``rho - mu`` for cosine and ``rho - mu - ||c||^2`` for Euclidean, kept up to date
    by the caller so that assignment is one matrix-vector product.
    """
    z = centers @ v
    if metric == "euclidean":
        z *= 2.0
    z += offset
    return z


def biased_scores_many(centers: np.ndarray, offset: np.ndarray, V: np.ndarray, metric: str) -> np.ndarray:
    """:func:`biased_scores_one` for the rows of ``V``, shape (n_samples, n_clusters)."""
    Z = V @ centers.T
    if metric == "euclidean":
        Z *= 2.0
    Z += offset
    return Z


def prepare_rows(V: np.ndarray, metric: str) -> np.ndarray:
    """Rows scaled to unit norm for cosine (zero rows stay zero); unchanged for Euclidean."""
    if metric != "cosine":
        return V
    norms = np.sqrt(np.einsum("ij,ij->i", V, V))
    return V / np.where(norms > 0, norms, 1.0)[:, None]


def score_offset(rho: np.ndarray, mu: np.ndarray, sq_norms: np.ndarray, metric: str) -> np.ndarray:
    """The per-center term of :func:`biased_scores_one`."""
    return rho - mu - sq_norms if metric == "euclidean" else rho - mu


def _feature_sort_key(name) -> tuple[str, str]:
    """A total order on feature names of any type (only its determinism matters)."""
    return type(name).__name__, repr(name)


# ------------------------------------------------------------------------------ the river shell
class OnlineConstrainedKMeans(base.Clusterer):
    """Online k-means whose clusters cannot starve, for river streams.

    A drop-in replacement for `river.cluster.KMeans`. Each sample goes to the center that
    maximises its similarity plus the center's dual variable; after each sample the duals move
    by projected dual ascent, rising for clusters that received less than
    ``min_size_ratio / n_clusters`` of the stream, so every cluster keeps receiving members
    (Online Constrained K-Means, Qian et al., CVPR 2022). Plain online k-means can leave
    clusters empty forever when centers start badly or the data are imbalanced; here that
    solution is ruled out, while clusters still grow to follow the data unless
    ``max_size_ratio`` caps them.

    The first ``init_size`` samples are kept and seeded with k-means++ (as the library's
    estimator seeds from its first batch), then replayed through the online update; until then
    `predict_one` answers with the nearest of the first ``n_clusters`` samples. Features follow
    river's conventions: a new key adds a dimension (zero in every center, as for all earlier
    samples), and a missing key counts as 0.

    `learn_many` and `predict_many` take pandas DataFrames. `learn_many` runs the same per-sample
    update row by row, so it gives exactly the model that a `learn_one` loop gives;
    `predict_many` assigns every row in one matrix product. Missing cells (NaN) are rejected;
    write absent features as 0 (``X.fillna(0)``).

    Parameters
    ----------
    n_clusters
        Number of clusters ``K``.
    min_size_ratio
        In [0, 1]: each cluster receives at least ``min_size_ratio / n_clusters`` of the
        stream. 0 gives plain online k-means; 1 asks for exact balance.
    max_size_ratio
        None, or >= 1: each cluster receives at most ``max_size_ratio / n_clusters`` of the
        stream.
    metric
        ``"euclidean"`` (negative squared distance, as `river.cluster.KMeans` with ``p=2``) or
        ``"cosine"`` (cosine similarity on L2-normalised samples).
    center_update
        ``"mean"``: each center is the mean of all its members so far (sequential k-means);
        ``"ema"``: ``center <- ema_momentum * center + (1 - ema_momentum) * x``, which forgets
        and so follows drifting streams; ``"none"``: centers stay as seeded.
    ema_momentum
        In [0, 1], used with ``center_update="ema"``.
    dual_lr
        Step size of the dual ascent per sample; None uses the library's default schedule
        (:func:`streamcoke.core.schedule.default_step_size` for a batch of one sample).
    init_size
        Number of first samples the centers are seeded from (>= ``n_clusters``); None uses
        ``3 * n_clusters``.
    seed
        Random seed of the k-means++ seeding.

    Attributes
    ----------
    centers : dict
        ``{cluster: {feature: value}}``, the current centers (the form river's clustering
        metrics such as `metrics.Silhouette` read).
    cluster_sizes : list[int]
        Samples assigned to each cluster so far (after seeding).
    duals : list[float]
        The minimum-size duals ``rho``: the bonus each center's score gets in assignment.
    upper_duals : list[float]
        The maximum-size duals ``mu`` (all zero without ``max_size_ratio``).
    n_samples_seen : int
        Samples learned so far.

    Examples
    --------

    A stream in which one group holds 90% of the samples, standardised in a pipeline. Without
    the size bound (``min_size_ratio=0``) one cluster ends up with less than 10% of the stream;
    with it every cluster gets close to its floor of ``0.8 * 2000 / 4 = 400`` samples. The
    default dual step adapts to the scale of the scores, so no tuning is needed.

    >>> import random
    >>> from river import metrics, preprocessing, stream
    >>> from streamcoke.adapters.river import OnlineConstrainedKMeans

    >>> rng = random.Random(0)
    >>> X = [[rng.gauss(5, 1), rng.gauss(5, 1)] if rng.random() < 0.9
    ...      else [rng.gauss(-5, 1), rng.gauss(-5, 1)] for _ in range(2000)]

    >>> for ratio in (0.0, 0.8):
    ...     model = preprocessing.StandardScaler() | OnlineConstrainedKMeans(
    ...         n_clusters=4, min_size_ratio=ratio, seed=42)
    ...     for x, _ in stream.iter_array(X):
    ...         model.learn_one(x)
    ...     print(ratio, model["OnlineConstrainedKMeans"].cluster_sizes)
    0.0 [188, 366, 1152, 294]
    0.8 [386, 522, 547, 545]

    Clusters and centers work with river's clustering metrics.

    >>> silhouette = metrics.Silhouette()
    >>> for x, _ in stream.iter_array(X[:200]):
    ...     silhouette.update(model["StandardScaler"].transform_one(x), model.predict_one(x),
    ...                       model["OnlineConstrainedKMeans"].centers)
    >>> silhouette
    Silhouette: 0.966974

    >>> model.predict_one({0: -5.0, 1: -5.0}) == model.predict_one({0: -4.5, 1: -5.5})
    True

    """

    def __init__(
        self,
        n_clusters: int = 5,
        min_size_ratio: float = 0.4,
        max_size_ratio: float | None = None,
        metric: str = "euclidean",
        center_update: str = "mean",
        ema_momentum: float = 0.99,
        dual_lr: float | None = None,
        init_size: int | None = None,
        seed: int | None = None,
    ):
        self.n_clusters = n_clusters
        self.min_size_ratio = min_size_ratio
        self.max_size_ratio = max_size_ratio
        self.metric = metric
        self.center_update = center_update
        self.ema_momentum = ema_momentum
        self.dual_lr = dual_lr
        self.init_size = init_size
        self.seed = seed
        self._check_params()

        K = int(n_clusters)
        self._rng = np.random.RandomState(seed)
        self._index: dict = {}  # feature name -> column
        self._names: list = []  # column -> feature name
        self._identity: list[int] = []  # [0, 1, ..., n_features - 1]
        self._known_keys: tuple = ()  # the keys of the last sample that matched the columns exactly
        self._buffer: list[np.ndarray] | None = []  # seeding samples; None once seeded
        self._centers = np.zeros((K, 0))
        self._sums = np.zeros((K, 0))  # member sums, for center_update="mean"
        self._sq_norms = np.zeros(K)
        self._counts = [0] * K  # plain ints: cheaper to bump one at a time than a numpy array
        self._rho = np.zeros(K)
        self._mu = np.zeros(K)
        self._offset = np.zeros(K)
        self._eye = np.eye(K)  # row k: the shares of a one-sample batch assigned to k
        self._n_steps = 0
        self._gap = 0.0  # running score-gap statistic of the default dual step size
        self.n_samples_seen = 0

    def _check_params(self) -> None:
        def bad(name, expected):
            raise ValueError(f"{name}={getattr(self, name)!r} is not valid: expected {expected}")

        def is_int(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def is_real(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.n_clusters) or self.n_clusters < 1:
            bad("n_clusters", "an int >= 1")
        if not is_real(self.min_size_ratio) or not 0 <= self.min_size_ratio <= 1:
            bad("min_size_ratio", "a float in [0, 1]")
        if self.max_size_ratio is not None and (not is_real(self.max_size_ratio) or self.max_size_ratio < 1):
            bad("max_size_ratio", "None or a float >= 1")
        if self.metric not in METRICS:
            bad("metric", f"one of {METRICS}")
        if self.center_update not in CENTER_UPDATES:
            bad("center_update", f"one of {CENTER_UPDATES}")
        if not is_real(self.ema_momentum) or not 0 <= self.ema_momentum <= 1:
            bad("ema_momentum", "a float in [0, 1]")
        if self.dual_lr is not None and (not is_real(self.dual_lr) or self.dual_lr < 0):
            bad("dual_lr", "None or a float >= 0")
        if self.init_size is not None and (not is_int(self.init_size) or self.init_size < self.n_clusters):
            bad("init_size", f"None or an int >= n_clusters={self.n_clusters}")

    @property
    def _mutable_attributes(self):
        return {"dual_lr", "ema_momentum"}

    @classmethod
    def _unit_test_params(cls):
        yield {"n_clusters": 3, "seed": 42}
        yield {"n_clusters": 4, "min_size_ratio": 0.9, "max_size_ratio": 1.5, "metric": "cosine",
               "center_update": "ema", "dual_lr": 0.1, "init_size": 6, "seed": 7}

    # ---------------------------------------------------------------------------- encoding
    def _encode(self, x: dict, grow: bool) -> tuple[np.ndarray, list]:
        """``x`` as a dense float vector over the known columns, plus the keys not seen before.

        With ``grow`` the new keys get columns past the known ones (returned, not yet recorded);
        without, they are dropped: a feature no center has seen adds the same amount to every
        Euclidean score and scales every cosine score alike, so it cannot change the winner.
        Raises ValueError naming the first feature whose value is not a finite number.
        """
        index = self._index
        D = len(index)
        new = []
        keys = tuple(x)
        if keys == self._known_keys:  # the usual case: the known features, in the known order
            raw = x.values()
            if not _PLAIN_NUMBERS.issuperset(map(type, raw)):
                self._raise_bad_value(x)
            values = np.fromiter(raw, dtype=np.float64, count=len(x))
            if not math.isfinite(values.dot(values)):
                self._raise_bad_value(x)
            return values, new
        try:
            cols = [index[k] for k in x]
        except KeyError:
            cols = []
            for k in x:
                c = index.get(k)
                if c is None:
                    if not grow:
                        c = -1
                    else:
                        c = D + len(new)
                        new.append(k)
                cols.append(c)
        raw = x.values()
        if not _PLAIN_NUMBERS.issuperset(map(type, raw)):
            self._raise_bad_value(x)  # numpy would read numeric strings and None as floats
        values = np.fromiter(raw, dtype=np.float64, count=len(x))
        if not math.isfinite(values.dot(values)):
            self._raise_bad_value(x)  # returns only when the squared norm merely overflowed
        if not new and cols == self._identity:
            if grow:
                self._known_keys = keys
            return values, new
        if len(new) > 1:
            # New columns in a canonical order, so results do not depend on the dict's key order.
            new = sorted(new, key=_feature_sort_key)
            position = {k: D + i for i, k in enumerate(new)}
            cols = [position[k] if c >= D else c for k, c in zip(x, cols)]
        v = np.zeros(D + len(new))
        if -1 in cols:
            keep = [i for i, c in enumerate(cols) if c >= 0]
            v[[cols[i] for i in keep]] = values[keep]
        else:
            v[cols] = values
        return v, new

    @staticmethod
    def _raise_bad_value(x: dict) -> None:
        for k, value in x.items():
            if not (isinstance(value, (numbers.Real, np.bool_)) and math.isfinite(value)):
                raise ValueError(
                    f"feature {k!r} has value {value!r}; OnlineConstrainedKMeans needs finite "
                    "numbers (encode categories first, e.g. with preprocessing.OneHotEncoder, and "
                    "leave missing features out of the dict)")

    def _grow(self, new: list) -> None:
        """Record new feature names; every center gets a 0 there, as every earlier sample had."""
        if not new:
            return
        self._known_keys = ()  # the columns change: the fast path must match afresh
        for k in new:
            self._index[k] = len(self._names)
            self._names.append(k)
        self._identity = list(range(len(self._names)))
        pad = np.zeros((self.n_clusters, len(new)))
        self._centers = np.hstack([self._centers, pad])
        self._sums = np.hstack([self._sums, pad])

    # ---------------------------------------------------------------------------- learning
    def _learn_vector(self, v: np.ndarray) -> None:
        """One sample over all known columns; seeding first, then the constrained step."""
        if self._buffer is not None:
            self._buffer.append(v)
            if len(self._buffer) >= (self.init_size or 3 * self.n_clusters):
                self._seed_centers()
            return
        if self.metric == "cosine":
            norm = math.sqrt(v.dot(v))
            if norm > 0:
                v = v / norm
        self._step(v)

    def _step(self, v: np.ndarray) -> None:
        """Assign a prepared sample under the duals, then update duals and the winner's center."""
        z = biased_scores_one(self._centers, self._offset, v, self.metric)
        k = int(z.argmax())

        K = self.n_clusters
        lower = self.min_size_ratio / K
        upper = None if self.max_size_ratio is None else self.max_size_ratio / K
        if self.dual_lr is not None:
            eta = self.dual_lr
        else:
            # The library's default rule measures steps in units of the running gap between
            # the best and second-best biased score (see streamcoke.core.schedule).
            top = float(z[k])
            z[k] = -np.inf
            gap = top - float(z.max()) if K > 1 else 0.0
            self._gap = max(update_gap(self._gap if self._n_steps else None, gap, 1.0), 1e-6 * abs(top), 1e-30)
            eta = default_step_size(1.0, self._gap, K, self._n_steps)
        self._rho, self._mu = dual_step(self._rho, self._mu, self._eye[k], lower, upper, eta)

        self._counts[k] += 1
        if self.center_update == "mean":
            row = self._sums[k]
            row += v
            self._set_center(k, row * (1.0 / self._counts[k]))
        elif self.center_update == "ema":
            m = self.ema_momentum
            self._set_center(k, m * self._centers[k] + (1.0 - m) * v)
        self._offset = score_offset(self._rho, self._mu, self._sq_norms, self.metric)
        self._n_steps += 1

    def _set_center(self, k: int, c: np.ndarray) -> None:
        sq = c.dot(c)
        if self.metric == "cosine" and sq > 0:
            c = c / math.sqrt(sq)
            sq = 1.0
        self._centers[k] = c
        self._sq_norms[k] = sq

    def _seed_centers(self) -> None:
        """k-means++ on the buffered samples (the library's seeding), then replay them."""
        import torch

        from streamcoke.core.init import initial_centers

        D = len(self._index)
        V = np.zeros((len(self._buffer), D))
        for i, v in enumerate(self._buffer):
            V[i, : len(v)] = v
        self._buffer = None
        V = prepare_rows(V, self.metric)
        seeds = initial_centers(torch.from_numpy(V), self.n_clusters, "k-means++", self._rng).numpy()
        self._centers = np.array(seeds, dtype=np.float64)
        self._sq_norms = np.einsum("ij,ij->i", self._centers, self._centers)
        self._offset = score_offset(self._rho, self._mu, self._sq_norms, self.metric)
        for v in V:
            self._step(v)

    def learn_one(self, x: dict) -> None:
        """Update the model with one sample; new keys add features, missing keys count as 0.

        Raises ValueError, leaving the model unchanged, when a value is not a finite number.
        """
        v, new = self._encode(x, grow=True)
        self._grow(new)
        self._learn_vector(v)
        self.n_samples_seen += 1

    def learn_many(self, X) -> None:
        """Update the model with the rows of a DataFrame, in order, exactly as `learn_one` would.

        The frame is validated and converted to one float array first (a bad value raises
        ValueError naming its column, and the model is unchanged); the rows then go through the
        per-sample update one by one, since each sample's assignment depends on the duals the
        previous one left.
        """
        A, names = self._frame_values(X)
        new = [k for k in dict.fromkeys(names) if k not in self._index]
        self._grow(new)
        cols = [self._index[k] for k in names]
        D = len(self._index)
        for row in A:
            v = np.zeros(D)
            v[cols] = row
            self._learn_vector(v)
            self.n_samples_seen += 1

    # ---------------------------------------------------------------------------- prediction
    def predict_one(self, x: dict) -> int:
        """The cluster of ``x`` under the current centers and duals (0 before any learning)."""
        v, _ = self._encode(x, grow=False)
        if self._buffer is not None:
            return int(self._provisional_labels(v[None, :])[0])
        if self.metric == "cosine":
            norm = math.sqrt(v.dot(v))
            if norm > 0:
                v = v / norm
        return int(biased_scores_one(self._centers, self._offset, v, self.metric).argmax())

    def predict_many(self, X):
        """Clusters of the rows of a DataFrame, as a Series of ints with the frame's index.

        All rows are assigned at once, in one matrix product, with the centers and duals as
        they are; the result equals a `predict_one` loop.
        """
        import pandas as pd

        A, names = self._frame_values(X)
        V = np.zeros((len(A), len(self._index)))
        known = [i for i, k in enumerate(names) if k in self._index]
        V[:, [self._index[names[i]] for i in known]] = A[:, known]
        if self._buffer is not None:
            labels = self._provisional_labels(V)
        else:
            V = prepare_rows(V, self.metric)
            labels = biased_scores_many(self._centers, self._offset, V, self.metric).argmax(axis=1)
        return pd.Series(labels.astype(np.int64), index=X.index)

    def _provisional_labels(self, V: np.ndarray) -> np.ndarray:
        """Before seeding: the nearest of the first ``n_clusters`` buffered samples."""
        if not self._buffer:
            return np.zeros(len(V), dtype=np.int64)
        C = np.zeros((min(len(self._buffer), self.n_clusters), V.shape[1]))
        for i, c in enumerate(self._buffer[: len(C)]):
            C[i, : len(c)] = c
        C, V = prepare_rows(C, self.metric), prepare_rows(V, self.metric)
        offset = score_offset(np.zeros(len(C)), np.zeros(len(C)), np.einsum("ij,ij->i", C, C), self.metric)
        return biased_scores_many(C, offset, V, self.metric).argmax(axis=1)

    def _frame_values(self, X) -> tuple[np.ndarray, list]:
        """A DataFrame's values as a float array and its column names; ValueError naming the
        first column that holds a non-number, NaN or infinity."""
        names = list(X.columns)
        # Non-numeric columns (object, string, category) must hold numbers only: pandas would
        # otherwise read "3.5" and None as floats.
        mixed = [j for j, dtype in enumerate(X.dtypes) if getattr(dtype, "kind", "O") not in "fiub"]
        A = None
        if not mixed:
            try:
                A = X.to_numpy(dtype=np.float64)
            except (TypeError, ValueError):
                pass
        if mixed or A is None or not np.isfinite(A).all():
            for j, name in enumerate(names):
                col = X.iloc[:, j]
                try:
                    ok = (j not in mixed or all(isinstance(v, (numbers.Real, np.bool_)) for v in col)) \
                        and np.isfinite(col.to_numpy(dtype=np.float64)).all()
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise ValueError(
                        f"column {name!r} holds values that are not finite numbers; "
                        "OnlineConstrainedKMeans needs finite numbers (fill absent features with "
                        "0, e.g. X.fillna(0), and encode categories first)")
        return A, names

    # ---------------------------------------------------------------------------- inspection
    @property
    def centers(self) -> dict:
        """``{cluster: {feature: value}}``; before seeding, the provisional centers."""
        if self._buffer is None:
            C = self._centers
        else:
            C = np.zeros((min(len(self._buffer), self.n_clusters), len(self._names)))
            for i, c in enumerate(self._buffer[: len(C)]):
                C[i, : len(c)] = c
        return {k: dict(zip(self._names, row.tolist())) for k, row in enumerate(C)}

    @property
    def cluster_sizes(self) -> list[int]:
        return list(self._counts)

    @property
    def duals(self) -> list[float]:
        return self._rho.tolist()

    @property
    def upper_duals(self) -> list[float]:
        return self._mu.tolist()


ConstrainedKMeans = OnlineConstrainedKMeans
