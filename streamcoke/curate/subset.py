"""A cluster-balanced subset of a label file written by ``streamcoke cluster``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io.checkpoint import atomic_write_bytes
from .balanced import ClusterBalancedSampler

READ_BATCH = 65536


def balanced_subset(labels_path: str | os.PathLike, out: str | os.PathLike, per_cluster: int, *,
                    clustering: int = 0, pick: str = "random", epoch: int | None = None,
                    random_state=None) -> dict:
    """Stream a label file and write at most ``per_cluster`` ids of every cluster to ``out``.

    Parameters
    ----------
    labels_path : the Parquet file of ``streamcoke cluster --out`` (columns ``id``, ``label`` or
        ``label_0``, ``label_1``..., ``similarity``..., ``epoch``).
    out : the subset, a Parquet file of ``id`` and ``label``, by cluster, written atomically.
    per_cluster : samples kept per cluster.
    clustering : which clustering's labels to balance, when the file holds several.
    pick : ``"random"`` or ``"nearest"`` (the most central samples of each cluster).
    epoch : the epoch whose labels are used, when the file holds several (``--all-epochs``);
        default: the last.
    random_state : seeds ``pick="random"``.

    Returns a summary: rows read, rows kept, clusters, and the smallest and largest cluster
    before and after.
    """
    path = Path(labels_path)
    try:
        f = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"cannot read the label file {str(path)!r}: {exc}") from None
    names = f.schema_arrow.names
    n_clusterings = sum(1 for n in names if n.startswith("label"))
    suffix = "" if "label" in names or not n_clusterings else f"_{clustering}"
    label_col, sim_col = f"label{suffix}", f"similarity{suffix}"
    missing = [c for c in ("id", label_col) if c not in names]
    if missing:
        raise ValueError(f"{str(path)!r} has no column {' or '.join(map(repr, missing))} "
                         f"(columns: {', '.join(names)}); expected a label file of `streamcoke cluster --out`"
                         + (f" with clustering {clustering} of {n_clusterings}" if n_clusterings else ""))
    if suffix == "" and clustering != 0:
        raise ValueError(f"{str(path)!r} holds one clustering; clustering={clustering} does not exist")
    columns = ["id", label_col] + ([sim_col] if sim_col in names else []) + (["epoch"] if "epoch" in names else [])
    if pick == "nearest" and sim_col not in names:
        raise ValueError(f'pick="nearest" needs the column {sim_col!r}, which {str(path)!r} does not have')
    if epoch is None and "epoch" in names:
        epoch = _last_epoch(f)

    sampler = ClusterBalancedSampler(per_cluster, pick=pick, random_state=random_state)
    for rb in f.iter_batches(batch_size=READ_BATCH, columns=columns):
        cols = dict(zip(columns, rb.columns))
        keep = None if epoch is None or "epoch" not in cols else cols["epoch"].to_numpy() == epoch
        ids = cols["id"].to_numpy(zero_copy_only=False)
        labels = cols[label_col].to_numpy()
        sim = cols[sim_col].to_numpy() if sim_col in cols else None
        if keep is not None:
            ids, labels = ids[keep], labels[keep]
            sim = None if sim is None else sim[keep]
        sampler.update(ids, labels, sim)
    if sampler.n_samples_seen_ == 0:
        raise ValueError(f"{str(path)!r} has no rows" + (f" for epoch {epoch}" if epoch is not None else ""))
    kept_ids, kept_labels = sampler.result()
    table = pa.table({"id": kept_ids, "label": kept_labels.astype(np.int32)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(out, sink.getvalue().to_pybytes())
    sizes = sampler.cluster_sizes_[sampler.cluster_sizes_ > 0]
    after = np.minimum(sizes, sampler.per_cluster)
    return {"rows": int(sampler.n_samples_seen_), "kept": int(len(kept_ids)), "clusters": int(len(sizes)),
            "epoch": epoch, "smallest_before": int(sizes.min()), "largest_before": int(sizes.max()),
            "smallest_after": int(after.min()), "largest_after": int(after.max())}


def _last_epoch(f: pq.ParquetFile) -> int:
    """The largest value of the ``epoch`` column, from the row groups' statistics when they
    have them, else by reading that column alone."""
    j = f.schema_arrow.get_field_index("epoch")
    best = None
    for i in range(f.metadata.num_row_groups):
        stats = f.metadata.row_group(i).column(j).statistics
        if stats is None or not stats.has_min_max:
            best = None
            break
        best = stats.max if best is None else max(best, stats.max)
    if best is None:
        column = f.read(columns=["epoch"]).column(0)
        best = pc.max(column).as_py() if len(column) else 0
    return int(best)
