"""Every benchmark script still runs (tiny sizes; the numbers themselves are not checked)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script, args", [
    ("bench_partial_fit.py", ["--quick"]),
    ("bench_river.py", ["--quick"]),
    ("bench_streaming.py", ["--rows", "3000", "--repeats", "1"]),
    ("bench_trainer.py", ["--quick"]),
    ("bench_dual_cap.py", ["--quick"]),
    ("bench_catch_up.py", ["--quick"]),
])
def test_benchmark_script_runs(tmp_path, script, args):
    if script != "bench_partial_fit.py":
        args = args + ["--out", str(tmp_path / "result.json")]
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "streamcoke" in done.stdout  # the table names our rows
    if script != "bench_partial_fit.py":
        assert (tmp_path / "result.json").stat().st_size > 0


# The peer benchmarks at their --smoke size: they must run without the optional peers (this
# environment may lack faiss-cpu and k-means-constrained; their rows are then skipped).
@pytest.mark.parametrize("script, outputs", [
    ("bench_speed.py", ["speed.json", "speed_vs_K.png"]),
    ("bench_optimality.py", ["optimality.json", "optimality.png"]),
    ("bench_quality.py", ["quality.json", "quality_sizes.png"]),
])
def test_peer_benchmark_runs_at_smoke_size(tmp_path, script, outputs):
    done = subprocess.run([sys.executable, str(BENCH / script), "--smoke", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "streamcoke" in done.stdout and "|---" in done.stdout  # a Markdown table with our rows
    pytest.importorskip("matplotlib")
    for name in outputs:
        assert (tmp_path / name).stat().st_size > 0


def test_run_all_collects_the_tables(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "run_all.py"), "--smoke", "--out-dir", str(tmp_path),
                           "--only", "bench_speed.py", "bench_optimality.py"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "Machine:" in summary and "run_all.py" in summary
    assert "Speed of the online step" in summary and "against the optimum" in summary
