"""The example scripts run as shipped (their --dry-run paths, on the CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_pretrain_imagenet_dry_run_trains_resumes_and_scores(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLES / "pretrain_imagenet.py"), "--dry-run", "--out", str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "from scratch" in first.stdout and "k-NN top-1" in first.stdout
    for name in ("checkpoint.st", "training.png", "cluster_sizes.png", "knn.json"):
        assert (out / name).stat().st_size > 0, name
    assert 0.0 <= json.loads((out / "knn.json").read_text())["knn_top1"] <= 1.0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # the run is done: resumes, scores
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at epoch 2" in again.stdout and "k-NN top-1" in again.stdout


def test_river_stream_example_runs():
    done = subprocess.run([sys.executable, str(EXAMPLES / "river_stream.py")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "river KMeans" in done.stdout and "streamcoke, min_size_ratio=0.4" in done.stdout


def test_curate_balanced_example_balances_the_classes(tmp_path):
    cmd = [sys.executable, str(EXAMPLES / "curate_balanced.py"), "--out", str(tmp_path), "--rows", "8000",
           "--n-clusters", "40", "--per-cluster", "40", "--epochs", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith(("all", "subset"))}
    largest_before, largest_after = float(rows["all"][3]), float(rows["subset"][2])
    assert largest_after < largest_before  # the head class's share shrinks
    for name in ("labels.parquet", "subset.parquet", "balanced_subset.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_stream_parquet_example_writes_labels_and_lifts_the_smallest_cluster(tmp_path):
    done = subprocess.run([sys.executable, str(EXAMPLES / "stream_parquet.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    smallest = {line.split()[0]: int(line.split()[3]) for line in done.stdout.splitlines()
                if line.startswith("min_size_ratio=")}
    assert smallest["min_size_ratio=0.4"] > smallest["min_size_ratio=0.0"]  # what the constraint is for
    assert "ACC" in done.stdout and "NMI" in done.stdout
    for ratio in ("0.4", "0.0"):
        t = pq.read_table(tmp_path / f"labels_{ratio}.parquet")
        assert t.column_names == ["id", "label", "similarity", "epoch"]
        assert sorted(t.column("id").to_pylist()) == list(range(20_000)) and set(t.column("epoch").to_pylist()) == {2}
    assert (tmp_path / "cluster_sizes.png").stat().st_size > 0
