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
