"""Cluster-balanced sampling: at most ``m`` samples from every cluster, in one pass over a stream.

Clustering-based data curation keeps the head of a long-tailed data set from drowning its tail:
cluster the embeddings, then draw the same number of samples from every cluster (DINOv2's
LVD-142M; Vo et al., 2024). This module draws that subset from a stream of labels in one pass,
with memory proportional to the subset, not to the stream.

Each sample gets a key, and every cluster keeps the ``m`` samples with the smallest keys:

* ``pick="random"``: independent uniform keys, so each cluster's kept set is a uniform random
  subset of size ``min(m, n_k)`` (the bottom-``m`` form of reservoir sampling);
* ``pick="nearest"``: the negated similarity to the assigned center, so each cluster keeps its
  ``m`` most central samples (ties go to the sample seen first).

Candidates are buffered and cut back to ``m`` per cluster whenever the buffer outgrows a few
times the subset; once a cluster holds ``m``, a new sample enters only with a key below the
largest one kept, which after a while is rare.
"""

from __future__ import annotations

import numpy as np

PICKS = ("random", "nearest")
MIN_BUFFER = 65536  # candidates held before the first cut-back


class ClusterBalancedSampler:
    """Keep at most ``per_cluster`` samples of every cluster of a stream of ``(ids, labels)``.

    Parameters
    ----------
    per_cluster : int
        Samples kept per cluster (all of a cluster's samples when it has fewer).
    pick : {"random", "nearest"}, default="random"
        Uniformly at random, or the samples most similar to their center (``update`` then
        needs ``similarity``).
    random_state : int, numpy Generator or None
        Seeds the random keys.

    Examples
    --------
    >>> sampler = ClusterBalancedSampler(per_cluster=2, pick="nearest")
    >>> _ = sampler.update(["a", "b", "c", "d", "e"], [0, 0, 0, 1, 1], similarity=[0.2, 0.9, 0.5, 0.1, 0.3])
    >>> ids, labels = sampler.result()
    >>> ids.tolist(), labels.tolist()
    (['b', 'c', 'e', 'd'], [0, 0, 1, 1])
    >>> sampler.cluster_sizes_.tolist()  # samples seen per cluster
    [3, 2]
    """

    def __init__(self, per_cluster: int, *, pick: str = "random", random_state=None):
        if int(per_cluster) != per_cluster or per_cluster < 1:
            raise ValueError(f"per_cluster must be a positive integer, got {per_cluster!r}")
        if pick not in PICKS:
            raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
        self.per_cluster = int(per_cluster)
        self.pick = pick
        self._rng = np.random.default_rng(random_state)
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self._held = 0
        self._thresholds = np.empty(0)  # per cluster: the largest key kept once it holds m, else inf
        self.cluster_sizes_ = np.zeros(0, np.int64)
        self.n_samples_seen_ = 0

    def update(self, ids, labels, similarity=None) -> "ClusterBalancedSampler":
        """Offer one batch: ``ids`` (any values), ``labels`` (non-negative integers) and, for
        ``pick="nearest"``, ``similarity`` to the assigned center (larger is nearer)."""
        ids = np.asarray(ids)
        labels = np.asarray(labels)
        if ids.ndim != 1 or labels.ndim != 1 or len(ids) != len(labels):
            raise ValueError(f"ids and labels must be 1-D and of one length, got shapes {ids.shape} and {labels.shape}")
        if labels.dtype.kind not in "iu" and len(labels):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        if len(labels) and labels.min() < 0:
            raise ValueError(f"labels must be >= 0, got {labels.min()}")
        keys = self._keys_for(len(labels), similarity)
        if not len(labels):
            return self
        self._grow(int(labels.max()) + 1)
        self.cluster_sizes_ += np.bincount(labels, minlength=len(self.cluster_sizes_))
        self.n_samples_seen_ += len(labels)
        keep = keys < self._thresholds[labels]
        if keep.any():
            self._ids.append(ids[keep])
            self._labels.append(labels[keep])
            self._keys.append(keys[keep])
            self._held += int(keep.sum())
            if self._held > max(MIN_BUFFER, 4 * self.per_cluster * len(self.cluster_sizes_)):
                self._cut_back()
        return self

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, labels)`` of the kept samples, by cluster, then by key (for ``"nearest"``,
        most similar first)."""
        self._cut_back()
        if not self._ids:
            return np.empty(0), np.empty(0, np.int64)
        return self._ids[0], self._labels[0]

    # ------------------------------------------------------------------------------ inside
    def _keys_for(self, n: int, similarity) -> np.ndarray:
        if self.pick == "random":
            return self._rng.random(n)
        if similarity is None:
            raise ValueError('pick="nearest" needs the similarity of every sample to its center')
        sim = np.asarray(similarity, dtype=np.float64)
        if sim.shape != (n,):
            raise ValueError(f"similarity must have one value per sample ({n}), got shape {sim.shape}")
        if not np.isfinite(sim).all():
            raise ValueError("similarity contains NaN or infinity")
        return -sim

    def _grow(self, n_clusters: int) -> None:
        extra = n_clusters - len(self.cluster_sizes_)
        if extra > 0:
            self.cluster_sizes_ = np.concatenate([self.cluster_sizes_, np.zeros(extra, np.int64)])
            self._thresholds = np.concatenate([self._thresholds, np.full(extra, np.inf)])

    def _cut_back(self) -> None:
        """Keep the ``per_cluster`` smallest keys of every cluster among the candidates."""
        if not self._ids:
            return
        ids, labels, keys = (np.concatenate(parts) for parts in (self._ids, self._labels, self._keys))
        order = np.lexsort((keys, labels))  # by cluster, then key; stable, so ties keep arrival order
        labels, keys = labels[order], keys[order]
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        rank = np.arange(len(labels)) - np.repeat(starts, np.diff(np.r_[starts, len(labels)]))
        kept = rank < self.per_cluster
        order, labels, keys, rank = order[kept], labels[kept], keys[kept], rank[kept]
        full = rank == self.per_cluster - 1
        self._thresholds[labels[full]] = keys[full]
        self._ids, self._labels, self._keys = [ids[order]], [labels], [keys]
        self._held = len(labels)
