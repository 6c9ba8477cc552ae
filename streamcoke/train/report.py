"""Pictures of a training run for its output folder: curves, cluster sizes, a cluster gallery.

Plots need matplotlib (an optional dependency, imported only when a plot is drawn); without it
they are skipped with a warning and return None. Figures are drawn on matplotlib's file-only Agg
canvas without pyplot, so no global backend or figure registry is touched. The gallery needs
only Pillow. Every file is rendered in memory and written atomically.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from streamcoke.io.checkpoint import atomic_write_bytes

TILE_MIN_PX = 48  # gallery images are upscaled (nearest neighbour) to at least this size
GAP_PX = 2


def plot_training(history: Sequence[dict], path: str | os.PathLike, *,
                  min_size_ratio: float | None = None) -> Path | None:
    """Four panels from the trainer's history rows: loss and learning rate against the step,
    images per second, and the smallest and largest cluster share per epoch relative to the
    uniform ``1/K`` (``share * K``) with the ``min_size_ratio`` line when given.

    Rows hold ``epoch``, ``step``, ``loss``, ``lr``, ``images_per_s``, ``min_share`` and
    ``max_share``; a missing or NaN value is left out of its curve (epoch 0 only clusters and
    has no loss). When an epoch has several rows, its shares are read from the last one.
    """
    if not history:
        raise ValueError("plot_training: history is empty")
    new_figure = _figure_factory(path)
    if new_figure is None:
        return None
    col = {key: np.array([_number(row.get(key)) for row in history])
           for key in ("epoch", "step", "loss", "lr", "images_per_s", "min_share", "max_share")}
    last_of_epoch = _last_row_per_epoch(col["epoch"])

    fig = new_figure(figsize=(11, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    for ax, key, label in ((axes[0, 0], "loss", "loss"), (axes[0, 1], "lr", "learning rate"),
                           (axes[1, 0], "images_per_s", "images / s")):
        ax.plot(col["step"], col[key], marker="." if len(history) < 50 else None)
        ax.set(xlabel="step", ylabel=label, title=label)
        ax.grid(alpha=0.3)
    ax = axes[1, 1]
    epochs = col["epoch"][last_of_epoch]
    ax.plot(epochs, col["max_share"][last_of_epoch], marker="o", label="largest cluster")
    ax.plot(epochs, col["min_share"][last_of_epoch], marker="o", label="smallest cluster")
    ax.axhline(1.0, color="grey", linestyle=":", label="uniform")
    if min_size_ratio is not None:
        ax.axhline(min_size_ratio, color="red", linestyle="--", label=f"minimum ({min_size_ratio:g})")
    ax.set(xlabel="epoch", ylabel="share x K", title="cluster sizes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_figure(fig, path)


def plot_cluster_sizes(sizes: Sequence[np.ndarray], path: str | os.PathLike, *,
                       min_size_ratio: float | None = None,
                       names: Sequence[str] | None = None) -> Path | None:
    """Each clustering's cluster sizes as ``share * K``, sorted in descending order, against the
    rank divided by K (so clusterings of different K overlay) on a log axis, with the
    ``min_size_ratio`` line when given. Empty clusters cannot be drawn on a log axis; the legend
    counts them.
    """
    arrays = [_numpy(s).astype(np.float64).reshape(-1) for s in sizes]
    if not arrays:
        raise ValueError("plot_cluster_sizes: no clusterings given")
    for i, s in enumerate(arrays):
        if len(s) == 0 or (s < 0).any() or not np.isfinite(s).all() or s.sum() <= 0:
            raise ValueError(f"plot_cluster_sizes: sizes[{i}] must be finite, non-negative counts "
                             "with a positive total")
    if names is not None and len(names) != len(arrays):
        raise ValueError(f"plot_cluster_sizes: {len(names)} names for {len(arrays)} clusterings")
    new_figure = _figure_factory(path)
    if new_figure is None:
        return None

    fig = new_figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, s in enumerate(arrays):
        k = len(s)
        relative = np.sort(s)[::-1] / s.mean()  # share * K
        empty = int((s == 0).sum())
        label = names[i] if names is not None else f"K = {k}"
        label += f" ({empty} empty)" if empty else ""
        shown = relative > 0
        ax.plot((np.arange(1, k + 1) / k)[shown], relative[shown], label=label)
    ax.axhline(1.0, color="grey", linestyle=":", label="uniform")
    if min_size_ratio is not None:
        ax.axhline(min_size_ratio, color="red", linestyle="--", label=f"minimum ({min_size_ratio:g})")
    ax.set_yscale("log")
    ax.set(xlabel="cluster rank / K", ylabel="share x K", title="cluster sizes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return _save_figure(fig, path)


def cluster_gallery(images: np.ndarray | Tensor, labels, path: str | os.PathLike, *, targets=None,
                    n_clusters_each: int = 4, n_per_cluster: int = 8, seed: int = 0) -> Path:
    """A PNG grid of sample images of the largest, the smallest and (with ``targets``) the purest
    clusters, one cluster per row, labelled on its left with its id, size and purity (share of
    its most common target). Members are drawn at random (``seed``); images are uint8
    (N, C, H, W) with C = 1 or 3, upscaled so that each tile is at least ``TILE_MIN_PX`` pixels.
    """
    from PIL import Image, ImageDraw, ImageFont

    imgs = _numpy(images)
    labels = _numpy(labels).reshape(-1)
    if imgs.ndim != 4 or imgs.shape[1] not in (1, 3) or imgs.dtype != np.uint8 or len(imgs) == 0:
        raise ValueError("cluster_gallery: images must be non-empty uint8 (N, C, H, W) with C = 1 or 3, "
                         f"got dtype {imgs.dtype} and shape {imgs.shape}")
    if len(labels) != len(imgs):
        raise ValueError(f"cluster_gallery: {len(imgs)} images but {len(labels)} labels")
    if targets is not None:
        targets = _numpy(targets).reshape(-1)
        if len(targets) != len(imgs):
            raise ValueError(f"cluster_gallery: {len(imgs)} images but {len(targets)} targets")
    if n_clusters_each < 1 or n_per_cluster < 1:
        raise ValueError("cluster_gallery: n_clusters_each and n_per_cluster must be >= 1")

    rows = gallery_rows(labels, targets, n_clusters_each)
    rng = np.random.default_rng(seed)
    h, w = imgs.shape[2:]
    scale = max(1, math.ceil(TILE_MIN_PX / min(h, w)))
    tile_h, tile_w = h * scale, w * scale
    font = ImageFont.load_default()
    texts = [_row_text(row, len(labels)) for row in rows]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.multiline_textbbox((0, 0), t, font=font) for t in texts]
    text_w = max(b[2] for b in boxes) + 4 * GAP_PX
    row_h = max(tile_h, max(b[3] for b in boxes) + GAP_PX)  # the label never spills into the next row
    canvas = Image.new("RGB", (text_w + n_per_cluster * (tile_w + GAP_PX) + GAP_PX,
                               len(rows) * (row_h + GAP_PX) + GAP_PX), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, text) in enumerate(zip(rows, texts)):
        top = GAP_PX + r * (row_h + GAP_PX)
        draw.multiline_text((2 * GAP_PX, top), text, fill="black", font=font)
        members = np.flatnonzero(labels == row["cluster"])
        picked = np.sort(rng.choice(members, size=min(n_per_cluster, len(members)), replace=False))
        for c, i in enumerate(picked):
            tile = Image.fromarray(_hwc(imgs[i])).resize((tile_w, tile_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (text_w + c * (tile_w + GAP_PX), top))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def gallery_rows(labels: np.ndarray, targets: np.ndarray | None, n_each: int) -> list[dict]:
    """The clusters a gallery shows, in order: the ``n_each`` largest, the ``n_each`` smallest
    non-empty ones and, with ``targets``, the ``n_each`` purest (larger first among equals).
    A cluster may appear in several sections. Each row: ``section``, ``cluster``, ``size``,
    ``purity`` (None without targets)."""
    clusters, sizes = np.unique(labels, return_counts=True)
    purity = None
    if targets is not None:
        purity = np.array([np.unique(targets[labels == c], return_counts=True)[1].max() / n
                           for c, n in zip(clusters, sizes)])
    by_size = np.argsort(-sizes, kind="stable")
    sections = [("largest", by_size[:n_each]), ("smallest", by_size[::-1][:n_each])]
    if purity is not None:
        sections.append(("purest", np.lexsort((-sizes, -purity))[:n_each]))
    return [{"section": name, "cluster": clusters[j].item(), "size": int(sizes[j]),
             "purity": None if purity is None else float(purity[j])}
            for name, chosen in sections for j in chosen]


def _row_text(row: dict, n_total: int) -> str:
    lines = [f"{row['section']}: cluster {row['cluster']}",
             f"n={row['size']} ({100 * row['size'] / n_total:.1f}%)"]
    if row["purity"] is not None:
        lines.append(f"purity {row['purity']:.2f}")
    return "\n".join(lines)


def _hwc(image: np.ndarray) -> np.ndarray:
    # Pillow wants (H, W) for grey and (H, W, 3) for colour.
    return image[0] if image.shape[0] == 1 else np.ascontiguousarray(image.transpose(1, 2, 0))


def _last_row_per_epoch(epochs: np.ndarray) -> np.ndarray:
    """Indices of the last row of each epoch, in epoch order (rows without an epoch are skipped)."""
    last = {}
    for i, e in enumerate(epochs):
        if np.isfinite(e):
            last[e] = i
    return np.array([last[e] for e in sorted(last)], dtype=np.int64)


def _figure_factory(path):
    """A function making matplotlib Figures on the Agg canvas, or None (with a warning) when
    matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn(f"matplotlib is not installed; skipping the plot {str(path)!r} "
                      "(pip install matplotlib)", stacklevel=3)
        return None

    def new_figure(**kwargs):
        fig = Figure(**kwargs)
        FigureCanvasAgg(fig)
        return fig

    return new_figure


def _save_figure(fig, path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)
