"""The stateful shell shared by the single- and multi-clustering estimators.

The shell owns validation, state and persistence; every number it computes comes from the
pure functions of :mod:`streamcoke.core`. State lives in one dict of tensors (``self._state``)
that each step replaces as a whole, so a call that fails part-way leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import os
from numbers import Integral, Real
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from .. import distributed
from ..core import catch_up
from ..core.assign import assign, biased_argmax, flat_labels, head_offsets, label_counts, scored_argmax
from ..core.centers import ema_update, member_sums, running_mean_step, running_mean_update
from ..core.certificate import batch_terms
from ..core.duals import dual_step, repeated_dual_steps
from ..core.init import initial_centers
from ..core.schedule import GAP_ROWS, constant_plan, default_plan, update_gap
from ..core.similarity import label_scores, prepare, score_terms, scores
from ..io.checkpoint import load_checkpoint, save_checkpoint
from ._inputs import InputKind, as_features, as_weights

# Tensors that make up the fitted state, saved and restored as they are.
STATE_KEYS = (
    "centers", "published_centers", "rho", "mu", "epoch_sums", "epoch_counts",
    "last_epoch_counts", "reference_net", "epoch_objective", "epoch_row_max",
    "epoch_correction", "epoch_weight", "gap",
)
# Plain-number counters saved beside them.
COUNTER_KEYS = ("n_features_in_", "n_samples_seen_", "n_steps_", "n_epochs_completed_")


def _epoch_terms_added(s: dict, cert: Tensor, correction: Tensor, batch_weight: float, H: int) -> dict:
    """The epoch's certificate accumulators with one batch's terms added (``cert``: objective
    then row maxima per head; ``correction``: the per-sample streaming-bound slack). On the CPU
    the same float64 additions in numpy, at a fraction of torch's per-call cost."""
    if cert.device.type == "cpu":
        c, k = cert.numpy(), correction.numpy()

        def add(key, v):
            return torch.from_numpy(np.asarray(s[key].numpy() + v))
    else:
        c, k = cert, correction

        def add(key, v):
            return s[key] + v
    return {"epoch_objective": add("epoch_objective", c[:H]), "epoch_row_max": add("epoch_row_max", c[H:]),
            "epoch_correction": add("epoch_correction", k * batch_weight),
            "epoch_weight": add("epoch_weight", batch_weight)}


def resolve_device(device) -> torch.device:
    """``None`` picks this process's GPU when there is one (see
    :func:`streamcoke.distributed.default_device`), the CPU otherwise."""
    return distributed.default_device() if device is None else torch.device(device)


class BaseOnlineConstrainedKMeans(TransformerMixin, ClusterMixin, BaseEstimator):
    """Shared machinery; see :class:`streamcoke.OnlineConstrainedKMeans` for the parameters."""

    _parameter_constraints: dict = {
        "min_size_ratio": [Interval(Real, 0, 1, closed="both")],
        "max_size_ratio": [Interval(Real, 1, None, closed="left"), None],
        "metric": [StrOptions({"cosine", "euclidean"})],
        "center_update": [StrOptions({"mean", "ema", "none"})],
        "ema_momentum": [Interval(Real, 0, 1, closed="both")],
        "dual_lr": [Interval(Real, 0, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "n_epochs": [Interval(Integral, 1, None, closed="left")],
        "shuffle": ["boolean"],
        "device": [str, torch.device, None],
        "random_state": ["random_state"],
        "verbose": ["boolean"],
    }

    # ----------------------------------------------------------------------------------- heads
    def _head_sizes(self) -> tuple[int, ...]:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _init_arrays(self) -> list | None:
        """The user's initial centers per head, or None for a seeding method."""
        raise NotImplementedError  # pragma: no cover

    def _heads_out(self, t: Tensor, axis: int = 0):
        """Present a stacked per-center tensor per head (subclasses choose the form)."""
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------------------ lifecycle
    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "_state")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        tags.input_tags.allow_nan = False
        return tags

    @contextlib.contextmanager
    def _transaction(self):
        """Run a block that changes the estimator; on any error put every attribute back."""
        saved = dict(self.__dict__)
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def _check_init_option(self) -> None:
        init = self.init
        if isinstance(init, str):
            if init not in ("k-means++", "random"):
                raise ValueError(
                    f"init={init!r} is not supported; use 'k-means++', 'random' or an array of "
                    "shape (n_clusters, n_features).")
        elif init is None:
            raise ValueError("init=None is not supported; use 'k-means++', 'random' or an array.")

    # --------------------------------------------------------------------------- public API
    def partial_fit(self, X, y=None, sample_weight=None):
        """Assign one mini-batch under the size constraints and update centers and duals.

        The constrained labels of the batch are stored in ``labels_``. Numpy input gives numpy
        results; a torch tensor gives tensors on the tensor's device.

        Parameters
        ----------
        X : array-like or torch.Tensor of shape (batch_size, n_features)
        y : ignored
        sample_weight : array-like or tensor of shape (batch_size,), default=None

        Returns
        -------
        self
        """
        with self._transaction():
            first = not self.__sklearn_is_fitted__()
            if first:
                self._validate_params()
                self._check_init_option()
                self.device_ = resolve_device(self.device)
            Xt, kind = as_features(self, X, reset=first, device=self.device_)
            w = as_weights(sample_weight, Xt)
            Xp = prepare(Xt, self.metric)
            if first:
                self._initialize(Xp, w, random_state=check_random_state(self.random_state))
            labels, similarity = self._step(Xp, w)
            self.labels_ = self._labels_out(labels, kind)
            self.assigned_similarity_ = self._labels_out(similarity, kind)
        return self

    def fit(self, X, y=None, sample_weight=None):
        """Cluster ``X`` in ``n_epochs`` passes of mini-batches of ``batch_size``.

        Each pass is an epoch: the constrained assignment runs batch by batch, then the epoch
        boundary publishes the centers and resets the per-epoch counts (:meth:`end_epoch`).
        ``labels_`` holds the constrained labels of the last pass, in the order of ``X``.
        """
        with self._transaction():
            for attr in [a for a in self.__dict__ if a.endswith("_") and not a.startswith("__")]:
                delattr(self, attr)
            self.__dict__.pop("_state", None)
            self._validate_params()
            self._check_init_option()
            self.device_ = resolve_device(self.device)
            Xt, kind = as_features(self, X, reset=True, device=self.device_)
            w = as_weights(sample_weight, Xt)
            Xp = prepare(Xt, self.metric)
            rng = check_random_state(self.random_state)
            n = Xp.shape[0]
            # Seed from a larger sample than one batch, as scikit-learn's MiniBatchKMeans does.
            n_seed = min(n, max(3 * self.batch_size, 10 * max(self._head_sizes())))
            seed_idx = torch.as_tensor(np.sort(rng.choice(n, n_seed, replace=False)), device=Xp.device)
            self._initialize(Xp[seed_idx], None if w is None else w[seed_idx], random_state=rng)
            labels = torch.empty((n, len(self._head_sizes())), dtype=torch.int64, device=Xp.device)
            similarity = torch.empty(labels.shape, dtype=torch.float32, device=Xp.device)
            batch = min(self.batch_size, n)
            progress = _progress(self.n_epochs * ((n + batch - 1) // batch), self.verbose, type(self).__name__)
            for _ in range(self.n_epochs):
                order = torch.as_tensor(rng.permutation(n) if self.shuffle else np.arange(n), device=Xp.device)
                for start in range(0, n, batch):
                    idx = order[start:start + batch]
                    labels[idx], similarity[idx] = self._step(Xp[idx], None if w is None else w[idx])
                    progress.update(1)
                self.end_epoch()
            progress.close()
            self.labels_ = self._labels_out(labels, kind)
            self.assigned_similarity_ = self._labels_out(similarity, kind)
        return self

    def end_epoch(self):
        """Mark an epoch boundary.

        Publishes the current centers as ``published_centers_`` (the fixed class weights a
        downstream classifier uses during the next epoch), keeps this epoch's cluster sizes as
        ``last_epoch_cluster_sizes_``, resets the per-epoch counts and running means, and starts
        the next epoch's duality certificate from the current duals.
        """
        check_is_fitted(self)
        s = self._state
        zeros = torch.zeros_like
        self._state = {
            **s,
            "published_centers": s["centers"].clone(),
            "last_epoch_counts": s["epoch_counts"].clone(),
            "epoch_sums": zeros(s["epoch_sums"]),
            "epoch_counts": zeros(s["epoch_counts"]),
            "reference_net": s["rho"] - s["mu"],
            "epoch_objective": zeros(s["epoch_objective"]),
            "epoch_row_max": zeros(s["epoch_row_max"]),
            "epoch_correction": zeros(s["epoch_correction"]),
            "epoch_weight": zeros(s["epoch_weight"]),
        }
        self.n_epochs_completed_ += 1
        return self

    def predict(self, X):
        """Index of the nearest center (highest similarity) for each sample, without duals."""
        check_is_fitted(self)
        Xt, kind = as_features(self, X, reset=False, device=self.device_)
        s = self._state
        labels, _ = assign(prepare(Xt, self.metric), s["centers"], torch.zeros_like(s["rho"]),
                           self._head_sizes(), self.metric)
        return self._labels_out(labels, kind)

    def transform(self, X):
        """Cosine similarity (``metric="cosine"``) or Euclidean distance to every center."""
        check_is_fitted(self)
        Xt, kind = as_features(self, X, reset=False, device=self.device_)
        S = scores(prepare(Xt, self.metric), self._state["centers"], self.metric)
        if self.metric == "euclidean":
            S = S.neg_().clamp_(min=0).sqrt_()
        return kind.out(S)

    def score(self, X, y=None, sample_weight=None):
        """Summed similarity of each sample to its nearest center (``-inertia`` for Euclidean).

        Larger is better, as scikit-learn's scorers expect. For several clusterings, the sum
        over clusterings.
        """
        check_is_fitted(self)
        Xt, _ = as_features(self, X, reset=False, device=self.device_)
        w = as_weights(sample_weight, Xt)
        s = self._state
        _, best = assign(prepare(Xt, self.metric), s["centers"], torch.zeros_like(s["rho"]),
                         self._head_sizes(), self.metric)
        best = best.double()
        return float((best if w is None else best * w.double().unsqueeze(1)).sum())

    # ---------------------------------------------------------------------------- the step
    def _initialize(self, Xp: Tensor, w: Tensor | None, random_state) -> None:
        sizes = self._head_sizes()
        d = Xp.shape[1]
        arrays = self._init_arrays()
        if arrays is not None:
            blocks = []
            for k, arr in zip(sizes, arrays):
                t = torch.as_tensor(np.asarray(arr, dtype=np.float32) if not isinstance(arr, Tensor) else arr)
                if t.ndim != 2 or tuple(t.shape) != (k, d):
                    raise ValueError(
                        f"init array has shape {tuple(t.shape)}, expected (n_clusters, n_features) = ({k}, {d}).")
                t = t.to(device=Xp.device, dtype=torch.float32)
                if not bool(torch.isfinite(t).all()):
                    raise ValueError("init array contains NaN or infinity.")
                blocks.append(prepare(t, self.metric))
        else:
            X_all = distributed.all_gather_rows(Xp)
            w_all = None if w is None else distributed.all_gather_rows(w.unsqueeze(1))[:, 0]
            blocks = [initial_centers(X_all, k, self.init, random_state, w_all) for k in sizes]
        centers = torch.cat(blocks)
        n_total = centers.shape[0]
        dev = Xp.device
        fzeros = lambda *shape, dtype=torch.float32: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
        self._state = {
            "centers": centers,
            "published_centers": centers.clone(),
            "rho": fzeros(n_total),
            "mu": fzeros(n_total),
            "epoch_sums": fzeros(n_total, d) if self.center_update == "mean" else fzeros(0, d),
            "epoch_counts": fzeros(n_total, dtype=torch.float64),
            "last_epoch_counts": fzeros(n_total, dtype=torch.float64),
            "reference_net": fzeros(n_total),
            "epoch_objective": fzeros(len(sizes), dtype=torch.float64),
            "epoch_row_max": fzeros(len(sizes), dtype=torch.float64),
            "epoch_correction": fzeros(len(sizes), dtype=torch.float64),
            "epoch_weight": fzeros((), dtype=torch.float64),
            "gap": fzeros(len(sizes), dtype=torch.float64),
        }
        self.n_samples_seen_ = 0
        self.n_steps_ = 0
        self.n_epochs_completed_ = 0

    def _share_bounds(self) -> tuple[Tensor, Tensor | None]:
        """Per-center minimum and maximum share of a batch: ``ratio / K`` of the center's head.

        Cached (not state): rebuilding them costs a handful of small ops every batch."""
        sizes = self._head_sizes()
        dev = self.device_
        key = (sizes, float(self.min_size_ratio), self.max_size_ratio, str(dev))
        cached = getattr(self, "_bounds_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        per_k = torch.cat([torch.full((k,), 1.0 / k, device=dev) for k in sizes])
        lower = per_k * float(self.min_size_ratio)
        upper = None if self.max_size_ratio is None else per_k * float(self.max_size_ratio)
        self._bounds_cache = (key, (lower, upper))
        return lower, upper

    def _counts(self, rows: Tensor, w: Tensor | None) -> Tensor:
        """Weight assigned to every center of every head (``rows`` from ``flat_labels``)."""
        return label_counts(rows, w, sum(self._head_sizes()))

    def _score_buffer(self, n: int, device: torch.device) -> Tensor:
        """Scratch space for a batch's score matrix, reused across batches: allocating a fresh
        megabyte-sized matrix every batch costs a noticeable share of the matrix multiply."""
        shape = (n, sum(self._head_sizes()))
        buf = getattr(self, "_scores_scratch", None)
        if buf is None or buf.shape[1] != shape[1] or buf.shape[0] < n or buf.device != device:
            buf = torch.empty(shape, dtype=torch.float32, device=device)
            self._scores_scratch = buf
        return buf[:n]

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_scores_scratch", None)
        state.pop("_bounds_cache", None)
        return state

    def _step(self, Xp: Tensor, w: Tensor | None) -> tuple[Tensor, Tensor]:
        """Assign one prepared batch and fold it into the state; returns the (n, n_heads)
        labels and each row's similarity to its center as the step found it."""
        s = self._state
        sizes = self._head_sizes()
        H, dev, n = len(sizes), Xp.device, Xp.shape[0]
        lower, upper = self._share_bounds()
        rho, mu = s["rho"], s["mu"]
        bias0 = rho - mu
        # The multiply alone; the per-center terms (duals, and -||c||^2 for Euclidean) are added
        # where the scores are read, so re-assigning with new duals needs no new multiply.
        alpha, terms = score_terms(s["centers"], bias0, self.metric)
        use_default = self.dual_lr is None
        n_gap_rows = min(GAP_ROWS, n) if use_default else 0
        Z, labels, best, batch_gap_sums = scored_argmax(Xp, s["centers"], terms, sizes, alpha, n_gap_rows,
                                                        out=self._score_buffer(n, dev))
        rows = flat_labels(labels, sizes)
        local_counts = self._counts(rows, w)

        # Batch totals and, for the default schedule, the score-gap statistic (summed over ranks).
        weight = float(n) if w is None else float(w.double().sum())
        totals = [weight, float(n), float(n_gap_rows)] + (batch_gap_sums.tolist() if use_default else [])
        counts = local_counts
        if distributed.is_distributed():
            summed, counts = distributed.all_reduce_sum(torch.tensor(totals, dtype=torch.float64, device=dev),
                                                        local_counts)
            totals = summed.tolist()
        batch_weight, n_rows = totals[0], int(totals[1])
        gap = s["gap"]
        if use_default:
            batch_gap = [x / totals[2] for x in totals[3:3 + H]]
            floor = [1e-6 * x / totals[2] for x in totals[3 + H:]]  # keeps exact ties breakable
            previous = gap.tolist()
            gap = [max(update_gap(None if self.n_steps_ == 0 else g0, g1, batch_weight), f, 1e-30)
                   for g0, g1, f in zip(previous, batch_gap, floor)]
            plan = default_plan(gap, sizes, batch_weight, float(self.n_samples_seen_), float(self.min_size_ratio))
            gap_values = gap
            gap = torch.from_numpy(np.array(gap, dtype=np.float64)).to(dev)
        else:
            plan = constant_plan(float(self.dual_lr), sizes, batch_weight)

        # Projected dual ascent. A batch holding several quotas of every cluster takes several
        # smaller steps, re-assigning itself with the updated duals each time (one multiply).
        bias_used = bias0
        fused = None
        if not distributed.is_distributed():  # the loop below in one call (where the CPU kernels run)
            fused = repeated_dual_steps(Z, alpha, s["centers"], self.metric, rho, mu, lower, upper, plan, sizes, w,
                                        batch_weight, local_counts, labels, best)
        if fused is not None:
            labels, best, local_counts, rho, mu, bias_used = fused
            counts = local_counts
            if max(plan.n_iter) > 1:
                rows = flat_labels(labels, sizes)
        else:
            for it in range(max(plan.n_iter)):
                if it > 0:
                    bias_used = rho - mu
                    labels, best, _ = biased_argmax(Z, score_terms(s["centers"], bias_used, self.metric)[1],
                                                    sizes, alpha)
                    rows = flat_labels(labels, sizes)
                    local_counts = self._counts(rows, w)
                    counts, = distributed.all_reduce_sum(local_counts)
                if H == 1:
                    step = plan.step[0] if it < plan.n_iter[0] else 0.0
                else:
                    step = torch.cat([torch.full((k,), st if it < m else 0.0, device=dev)
                                      for k, st, m in zip(sizes, plan.step, plan.n_iter)])
                rho, mu = dual_step(rho, mu, (counts / batch_weight).float(), lower, upper, step)

        epoch_counts = s["epoch_counts"] + counts
        if use_default and float(self.min_size_ratio) > 0:
            rho = self._catch_up(Z, alpha, bias_used, best, rho, mu, lower, gap_values, epoch_counts,
                                 float(s["epoch_weight"]) + batch_weight, batch_weight, n_rows)

        similarity = label_scores(Z, labels, head_offsets(sizes), s["centers"], Xp, self.metric)
        # Certificate terms: objective, row maxima and the streaming-bound slack, per head.
        terms = batch_terms(best, Xp, self.metric, w, local_counts, bias_used, s["reference_net"], sizes)
        cert = terms[:2 * H]
        if self.center_update == "none":
            cert, = distributed.all_reduce_sum(cert)
            new = {}
        elif self.center_update == "mean" and not distributed.is_distributed():
            cert, = distributed.all_reduce_sum(cert)
            centers, epoch_sums = running_mean_step(Xp, rows, w, s["centers"], s["epoch_sums"], epoch_counts,
                                                    H, self.metric)
            new = {"centers": centers, "epoch_sums": epoch_sums}
        else:  # the ranks' member sums are added up before any center moves
            sums = member_sums(Xp, rows, w, sum(sizes), H)
            cert, sums = distributed.all_reduce_sum(cert, sums)
            if self.center_update == "mean":
                centers, epoch_sums = running_mean_update(s["centers"], s["epoch_sums"], epoch_counts, sums,
                                                          self.metric)
                new = {"centers": centers, "epoch_sums": epoch_sums}
            else:
                new = {"centers": ema_update(s["centers"], sums, counts, float(self.ema_momentum), self.metric)}

        self._state = {
            **s, **new, "rho": rho, "mu": mu, "gap": gap, "epoch_counts": epoch_counts,
            **_epoch_terms_added(s, cert, terms[2 * H:], batch_weight, H),
        }
        self.n_samples_seen_ += n_rows
        self.n_steps_ += 1
        return labels, similarity

    def _catch_up(self, Z: Tensor, alpha: float, bias_used: Tensor, best: Tensor, rho: Tensor, mu: Tensor,
                  lower: Tensor, gaps: list[float], epoch_counts: Tensor, epoch_weight: float,
                  batch_weight: float, n_rows: int) -> Tensor:
        """``rho`` after the catch-up bids of the clusters far below their minimum
        (:mod:`streamcoke.core.catch_up`). With several ranks each contributes the smallest
        margins of its own rows, so every rank finds the levels of the global batch."""
        columns = catch_up.behind(lower, epoch_counts, epoch_weight, batch_weight, n_rows)
        if columns.numel() == 0:
            return rho
        sizes = self._head_sizes()
        quotas = [catch_up.quota_rows(float(self.min_size_ratio), k, n_rows) for k in sizes]
        q_max = max(quotas)
        if len(sizes) == 1:
            heads, best_rows, min_levels = None, best, catch_up.LEVEL * gaps[0]
        else:
            heads = torch.bucketize(columns, torch.tensor(head_offsets(sizes)[1:], device=columns.device),
                                    right=True)
            best_rows = best.index_select(1, heads)
            min_levels = catch_up.LEVEL * torch.tensor(gaps, device=rho.device)[heads]
        terms = score_terms(self._state["centers"], bias_used, self.metric)[1]
        margins = catch_up.smallest_margins(Z, alpha, terms, best_rows, columns, q_max)
        if distributed.is_distributed():
            margins = distributed.all_gather_rows(margins).topk(q_max, dim=0, largest=False).values
        if heads is None:
            levels = margins[quotas[0] - 1]
        else:
            q = torch.tensor(quotas, device=columns.device)[heads]
            levels = margins.gather(0, (q - 1).unsqueeze(0))[0]
        return catch_up.raised_duals(rho, mu, bias_used, columns, levels, min_levels)

    # ------------------------------------------------------------------------- attributes
    def _labels_out(self, labels: Tensor, kind: InputKind):
        raise NotImplementedError  # pragma: no cover

    def _out(self, t: Tensor):
        """Fitted attributes follow the kind of input the model was last fed."""
        return self._last_kind().out(t)

    def _last_kind(self) -> InputKind:
        # Tensors go back to the device of the caller's last batch, which may not be ours
        # (CPU tensors fed to a clusterer on the GPU).
        labels = getattr(self, "labels_", None)
        return InputKind(True, labels.device) if isinstance(labels, Tensor) else InputKind(False)

    @property
    def cluster_centers_(self):
        """Current centers (updated every batch), shape (n_clusters, n_features)."""
        check_is_fitted(self)
        return self._heads_out(self._state["centers"])

    @property
    def published_centers_(self):
        """Centers as of the last epoch boundary (the initial centers before the first one)."""
        check_is_fitted(self)
        return self._heads_out(self._state["published_centers"])

    @property
    def duals_(self):
        """Minimum-size duals ``rho`` (>= 0): the bonus each center's score gets in assignment."""
        check_is_fitted(self)
        return self._heads_out(self._state["rho"])

    @property
    def upper_duals_(self):
        """Maximum-size duals ``mu`` (>= 0, all zero without ``max_size_ratio``)."""
        check_is_fitted(self)
        return self._heads_out(self._state["mu"])

    @property
    def cluster_sizes_(self):
        """Weight (number of samples) assigned to each cluster so far in the current epoch."""
        check_is_fitted(self)
        return self._heads_out(self._state["epoch_counts"])

    @property
    def last_epoch_cluster_sizes_(self):
        """Cluster sizes of the last completed epoch (zeros before the first boundary)."""
        check_is_fitted(self)
        return self._heads_out(self._state["last_epoch_counts"])

    def _certificate(self) -> tuple[np.ndarray, np.ndarray]:
        s = self._state
        lower, upper = self._share_bounds()
        ref = s["reference_net"].double()
        rho_ref, mu_ref = ref.clamp(min=0), (-ref).clamp(min=0)
        W = s["epoch_weight"]
        sizes = self._head_sizes()
        penalty = torch.stack([b.sum() for b in torch.split(rho_ref * lower.double(), list(sizes))])
        if upper is not None:
            penalty = penalty - torch.stack([b.sum() for b in torch.split(mu_ref * upper.double(), list(sizes))])
        bound = s["epoch_row_max"] + s["epoch_correction"] - W * penalty
        return s["epoch_objective"].cpu().numpy(), bound.cpu().numpy()

    @property
    def epoch_objective_(self):
        """Sum over the current epoch of each sample's similarity to its assigned center."""
        check_is_fitted(self)
        return self._scalar_heads(self._certificate()[0])

    @property
    def epoch_dual_bound_(self):
        """Upper bound on the best objective any size-feasible assignment of this epoch's
        samples could reach with the centers held fixed (the Lagrangian dual at the duals of
        the epoch's start; see :mod:`streamcoke.core.certificate`)."""
        check_is_fitted(self)
        return self._scalar_heads(self._certificate()[1])

    @property
    def duality_gap_(self):
        """``epoch_dual_bound_ - epoch_objective_`` per sample of the epoch: how much average
        similarity the epoch's assignment could at most have gained. Exact as a bound when the
        centers stay fixed (``center_update="none"``); with moving centers, an estimate."""
        check_is_fitted(self)
        obj, bound = self._certificate()
        W = max(float(self._state["epoch_weight"]), 1e-12)
        return self._scalar_heads((bound - obj) / W)

    def _scalar_heads(self, values: np.ndarray):
        raise NotImplementedError  # pragma: no cover

    # ------------------------------------------------------------------------ persistence
    def _params_meta(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        params, tensors = {}, {}
        for name, value in self.get_params(deep=False).items():
            if name == "init" and not isinstance(value, str):
                arrays = value if isinstance(value, (list, tuple)) and not np.isscalar(value[0]) and \
                    np.ndim(value[0]) == 2 else [value]
                for i, a in enumerate(arrays):
                    tensors[f"param.init.{i}"] = torch.as_tensor(np.asarray(
                        a.detach().cpu() if isinstance(a, Tensor) else a, dtype=np.float32))
                params[name] = {"arrays": len(arrays)}
            elif name == "device":
                params[name] = None if value is None else str(value)
            elif name == "random_state":
                if value is not None and not isinstance(value, (int, np.integer)):
                    params[name] = None  # a RandomState object is not part of the saved state
                else:
                    params[name] = None if value is None else int(value)
            elif isinstance(value, tuple):
                params[name] = list(value)
            elif isinstance(value, np.integer):
                params[name] = int(value)
            else:
                params[name] = value
        return params, tensors

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream exactly: ``{"tensors": ..., "meta": ...}``.

        ``tensors`` maps names to tensors; ``meta`` holds the parameters and counters as plain
        JSON-serialisable values.
        """
        check_is_fitted(self)
        params, init_tensors = self._params_meta()
        meta = {
            "class": type(self).__name__,
            "params": params,
            "counters": {k: int(getattr(self, k)) for k in COUNTER_KEYS},
            "output": "torch" if isinstance(getattr(self, "labels_", None), Tensor) else "numpy",
        }
        tensors = {f"state.{k}": self._state[k] for k in STATE_KEYS}
        tensors.update(init_tensors)
        for name, key in (("labels_", "labels"), ("assigned_similarity_", "assigned_similarity")):
            value = getattr(self, name, None)
            if value is not None:
                tensors[key] = value if isinstance(value, Tensor) else torch.as_tensor(value)
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]):
        """Restore a :meth:`state_dict`; the parameters must match this estimator's."""
        tensors, meta = state["tensors"], state["meta"]
        if meta.get("class") != type(self).__name__:
            raise ValueError(f"state was saved from {meta.get('class')!r}, not {type(self).__name__!r}")
        mine, _ = self._params_meta()
        theirs = dict(meta["params"])
        diff = sorted(k for k in set(mine) | set(theirs)
                      if k not in ("device", "verbose") and mine.get(k) != theirs.get(k))
        if diff:
            raise ValueError(f"state was saved with different parameters: {', '.join(diff)}; "
                             "use the class's load() to rebuild the estimator from the file")
        missing = [k for k in STATE_KEYS if f"state.{k}" not in tensors]
        if missing:
            raise ValueError(f"state is missing tensors: {', '.join(missing)}")
        counters = meta["counters"]
        sizes = self._head_sizes()
        n_total, d = sum(sizes), int(counters["n_features_in_"])
        expected = {
            "centers": (n_total, d), "published_centers": (n_total, d), "rho": (n_total,),
            "mu": (n_total,), "epoch_sums": (n_total if self.center_update == "mean" else 0, d),
            "epoch_counts": (n_total,), "last_epoch_counts": (n_total,), "reference_net": (n_total,),
            "epoch_objective": (len(sizes),), "epoch_row_max": (len(sizes),),
            "epoch_correction": (len(sizes),), "epoch_weight": (), "gap": (len(sizes),),
        }
        for k, shape in expected.items():
            got = tuple(tensors[f"state.{k}"].shape)
            if got != shape:
                raise ValueError(f"state tensor {k!r} has shape {got}, expected {shape}")
        device = resolve_device(self.device)
        new_state = {k: tensors[f"state.{k}"].to(device) for k in STATE_KEYS}
        with self._transaction():
            self.device_ = device
            self._state = new_state
            for k in COUNTER_KEYS:
                setattr(self, k, int(counters[k]))
            kind = InputKind(meta.get("output") == "torch", device)
            for name, key in (("labels_", "labels"), ("assigned_similarity_", "assigned_similarity")):
                if key in tensors:
                    setattr(self, name, kind.out(tensors[key].to(device)))
                else:
                    self.__dict__.pop(name, None)
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to ``path`` (safetensors; atomic; loads without unpickling)."""
        sd = self.state_dict()
        save_checkpoint(path, sd["tensors"], sd["meta"], kind="streamcoke.OnlineConstrainedKMeans")

    @classmethod
    def load(cls, path: str | os.PathLike, device=None):
        """Rebuild an estimator saved with :meth:`save`; it continues the stream exactly.

        ``device`` overrides the saved device (``None`` keeps the saved choice).
        """
        tensors, meta = load_checkpoint(path, kind="streamcoke.OnlineConstrainedKMeans")
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{str(path)!r} holds a {meta.get('class')!r}, not a {cls.__name__!r}")
        try:
            params = dict(meta["params"])
            init = params.get("init")
            if isinstance(init, dict):
                arrays = [tensors[f"param.init.{i}"].numpy() for i in range(int(init["arrays"]))]
                params["init"] = arrays if cls._init_is_list() else arrays[0]
            if isinstance(params.get("n_clusters"), list):
                params["n_clusters"] = tuple(params["n_clusters"])
            if device is not None:
                params["device"] = str(device)
            est = cls(**params)
            est.load_state_dict({"tensors": tensors, "meta": {**meta, "params": est._params_meta()[0]}})
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{str(path)!r} is not a valid streamcoke checkpoint ({exc!r})") from None
        return est

    @classmethod
    def _init_is_list(cls) -> bool:
        return False


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="batch")


def split_heads(t: Tensor, sizes: Sequence[int], axis: int = 0) -> list[Tensor]:
    """Cut a stacked tensor into one block per head along ``axis``."""
    return list(torch.split(t, list(sizes), dim=axis))
