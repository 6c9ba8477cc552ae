"""Training-run pictures: curves, cluster sizes and the cluster gallery are valid PNG files."""

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from streamcoke.train.report import cluster_gallery, gallery_rows, plot_cluster_sizes, plot_training


def _open_png(path):
    with Image.open(path) as im:
        im.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def _history():
    rows = [{"epoch": 0, "step": 0, "loss": math.nan, "lr": 0.0, "images_per_s": 900.0,
             "min_share": 0.2, "max_share": 3.0}]
    for step in range(1, 13):
        rows.append({"epoch": 1 + (step - 1) // 4, "step": step, "loss": 5.0 / step, "lr": 0.1 * step / 12,
                     "images_per_s": 1000.0 + step, "min_share": 0.5, "max_share": 1.8})
    return rows


def test_plot_training_writes_a_png(tmp_path):
    out = plot_training(_history(), tmp_path / "run" / "training.png", min_size_ratio=0.4)
    assert out == tmp_path / "run" / "training.png"
    _open_png(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["training.png"]  # no temporary left


def test_plot_cluster_sizes_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [rng.integers(1, 50, 30), np.array([40, 10, 0, 0, 5]), torch.tensor([3, 3, 3])]
    out = plot_cluster_sizes(sizes, tmp_path / "sizes.png", min_size_ratio=0.4, names=["a", "b", "c"])
    _open_png(out)
    with pytest.raises(ValueError, match="2 names for 3 clusterings"):
        plot_cluster_sizes(sizes, tmp_path / "x.png", names=["a", "b"])
    with pytest.raises(ValueError, match=r"sizes\[0\]"):
        plot_cluster_sizes([np.zeros(3)], tmp_path / "x.png")


def test_plots_without_matplotlib_warn_and_return_none(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` raise ImportError
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_training(_history(), tmp_path / "t.png") is None
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_cluster_sizes([np.ones(4)], tmp_path / "s.png") is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("channels", [1, 3])
def test_cluster_gallery_grey_and_rgb(tmp_path, channels):
    rng = np.random.default_rng(channels)
    images = rng.integers(0, 256, (120, channels, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 10, 120)
    targets = rng.integers(0, 3, 120)
    out = cluster_gallery(torch.from_numpy(images), labels, tmp_path / "gallery.png", targets=targets,
                          n_clusters_each=2, n_per_cluster=5)
    width, height = _open_png(out)
    assert height >= 3 * 2 * 48  # largest, smallest, purest: 2 rows each, tiles of at least 48 px
    assert width >= 5 * 48
    without = cluster_gallery(images, labels, tmp_path / "g2.png", n_clusters_each=2)
    assert _open_png(without)[1] >= 2 * 2 * 48


def test_gallery_rows_pick_largest_smallest_and_purest():
    labels = np.array([7] * 5 + [3] * 3 + [9] * 1)
    targets = np.array([0, 0, 0, 1, 1] + [2, 2, 2] + [1])
    rows = gallery_rows(labels, targets, 1)
    assert [(r["section"], r["cluster"], r["size"]) for r in rows] == [
        ("largest", 7, 5), ("smallest", 9, 1), ("purest", 3, 3)]  # 3 and 9 both pure; 3 is larger
    assert rows[0]["purity"] == pytest.approx(0.6)
    assert all(r["purity"] is None for r in gallery_rows(labels, None, 2))


def test_cluster_gallery_validates_its_input(tmp_path):
    images = np.zeros((4, 3, 8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        cluster_gallery(images.astype(np.float32), np.zeros(4), tmp_path / "g.png")
    with pytest.raises(ValueError, match="C = 1 or 3"):
        cluster_gallery(np.zeros((4, 2, 8, 8), dtype=np.uint8), np.zeros(4), tmp_path / "g.png")
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        cluster_gallery(images, np.zeros(3), tmp_path / "g.png")
