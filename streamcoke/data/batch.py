"""What every source shares: the batch it yields, the error it raises, the error handlers.

A source yields :class:`Batch` objects: host-side ids (they only travel on to a label sink)
and a float32 feature tensor already on the clusterer's device. Bad input becomes a
:class:`DataError` that names the file and the sample key, and goes through one ``handler``
argument, as in webdataset: the handler raises it, or returns to skip the sample and go on.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor


class Batch(NamedTuple):
    """One mini-batch: ``ids`` (host array or list, one per row) and ``features`` (n, d) on the device."""

    ids: Any
    features: Tensor


class DataError(ValueError):
    """Bad input: ``source`` is the file (or URL) and ``key`` the sample, when known."""

    def __init__(self, message: str, *, source: Any = None, key: Any = None):
        where = ", ".join(p for p in (f"in {source}" if source is not None else "",
                                      f"sample {key!r}" if key is not None else "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.source, self.key = source, key


def raise_errors(exc: BaseException) -> bool:
    """Default handler: stop at the first bad sample with its error."""
    raise exc


class SkipErrors:
    """Handler that skips bad samples (or files) and counts them.

    Examples
    --------
    >>> h = SkipErrors()
    >>> h(DataError("bad row", source="a.parquet", key=7))
    True
    >>> h.count, h.first
    (1, 'bad row (in a.parquet, sample 7)')
    """

    def __init__(self, count: int = 0):
        self.count = count
        self.first: str | None = None
        self._lock = threading.Lock()  # a prefetch thread and the caller may both report

    def __call__(self, exc: BaseException, n: int = 1) -> bool:
        with self._lock:
            self.count += n
            if self.first is None:
                self.first = str(exc)
        return True


def report(handler: Callable, exc: BaseException, n: int = 1) -> None:
    """Pass ``exc`` to ``handler``; ``n`` is how many samples it spoils (a whole file, say)."""
    if isinstance(handler, SkipErrors):
        handler(exc, n)
    else:
        handler(exc)


def finite_rows(X: np.ndarray, ids, source, handler: Callable) -> np.ndarray | None:
    """Boolean mask of rows to keep, after reporting every row with NaN or infinity.

    Returns None when all rows are finite (the common case costs one pass, no copy).
    """
    if not X.size:
        return None
    if X.dtype.kind != "f" or np.isfinite(X.sum()):  # one reduction, no temporary, when clean
        return None
    ok = np.isfinite(X).all(axis=1)  # a sum of finite values can still overflow: check rows
    if ok.all():
        return None
    for i in np.flatnonzero(~ok):
        report(handler, DataError("feature vector contains NaN or infinity", source=source, key=item(ids[i])))
    return ok


def item(v):
    return v.item() if isinstance(v, np.generic) else v


def rebatch(chunks: Iterable[tuple[Any, np.ndarray]], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Cut a stream of ``(ids, rows)`` chunks of any length into chunks of exactly ``batch_size``
    rows (the last one may be shorter), so batches do not depend on how the input was stored."""
    ids_buf: list[np.ndarray] = []
    x_buf: list[np.ndarray] = []
    held = 0
    for ids, X in chunks:
        ids = np.asarray(ids)
        while len(X):
            take = min(batch_size - held, len(X))
            ids_buf.append(ids[:take])
            x_buf.append(X[:take])
            held += take
            ids, X = ids[take:], X[take:]
            if held == batch_size:
                yield _join(ids_buf, x_buf)
                ids_buf, x_buf, held = [], [], 0
    if held:
        yield _join(ids_buf, x_buf)


def _join(ids_buf, x_buf):
    if len(x_buf) == 1:
        return ids_buf[0], x_buf[0]
    return np.concatenate(ids_buf), np.concatenate(x_buf)


def to_device(X: np.ndarray, device) -> Tensor:
    """float32 tensor on ``device``; host memory is pinned first for an asynchronous GPU copy."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not X.flags.writeable:  # Arrow buffers and read-only maps: torch wants its own memory
        X = X.copy()
    t = torch.from_numpy(X)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t if device.type == "cpu" else t.to(device)


def prefetch_pays(device=None) -> bool:
    """Whether reading batches ahead in a background thread (:func:`prefetch`) speeds up a loop
    that steps a clusterer on ``device``: yes for a GPU, whose step leaves the host's cores
    free, and where the process has a core to spare beyond torch's intra-op threads.

    Otherwise the reader thread takes a core from the step's threads, and every parallel pass
    of the step waits at its barrier for the thread that lost its core, so reading in the
    caller, between steps, is the faster of the two (``benchmarks/bench_streaming.py`` times
    both side by side).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores > torch.get_num_threads()


def prefetch(batches: Iterable, depth: int = 16) -> Iterator:
    """Iterate ``batches`` in a background thread, up to ``depth`` items ahead, in the same order.

    Reading and decoding (pyarrow, numpy, zlib and file reads release the GIL) then overlaps
    with the clustering step, where a core is free for it: :func:`prefetch_pays`. The thread works in bursts: once the queue has run down to a
    quarter of ``depth`` it refills it, then sleeps, so it is scheduled onto the cores the
    step's threads are using a few times in ``depth`` batches rather than at every batch. An
    error in the thread is raised in the caller at the position it happened.

    Examples
    --------
    >>> list(prefetch(iter(range(5)), depth=2))
    [0, 1, 2, 3, 4]
    """
    low = depth // 4
    cond = threading.Condition()
    buf: collections.deque = collections.deque()
    end: list = []  # holds the thread's exception (or None) once it has stopped
    stop = threading.Event()
    done = object()

    def work():
        it = iter(batches)
        try:
            while True:
                with cond:
                    while len(buf) > low and not stop.is_set():
                        cond.wait()
                    room = depth - len(buf)
                if stop.is_set():
                    return
                for _ in range(room):
                    item = next(it, done)  # read outside the lock
                    with cond:
                        if item is done:
                            end.append(None)
                            cond.notify_all()
                            return
                        buf.append(item)
                        cond.notify_all()
                    if stop.is_set():
                        return
        except BaseException as exc:  # handed to the consumer, raised there
            with cond:
                end.append(exc)
                cond.notify_all()

    thread = threading.Thread(target=work, name="streamcoke-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            with cond:
                while not buf and not end:
                    cond.wait()
                if not buf:
                    if end[0] is not None:
                        raise end[0]
                    return
                item = buf.popleft()
                if len(buf) == low:
                    cond.notify_all()  # the thread refills
            yield item
    finally:
        stop.set()
        with cond:
            cond.notify_all()
        thread.join(timeout=5)
