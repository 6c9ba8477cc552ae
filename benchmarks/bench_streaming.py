"""Streaming throughput and memory of `streamcoke cluster` against in-memory `partial_fit`.

The data are Gaussian-mixture embeddings (d = 128) clustered into K = 1000 clusters in
batches of 1024, one epoch. Three ways over the same rows:

- in memory: a float32 tensor already in RAM, sliced into batches for ``partial_fit``;
- ``streamcoke cluster`` on a Parquet file (fixed-size-list column) and on a ``.npy`` memory
  map, writing the labels to Parquet: the whole command, reading, clustering and writing;
- ``streamcoke cluster`` on WebDataset shards of ``.npy`` samples (at the 1x size only).

Rates are samples per second of the clustering loop (the command's own printed rate, so
process start-up is left out), best of ``--repeats``. Peak memory is the peak resident set
size of a separate process per run (``os.wait4``), at 1x and at 10x the rows: a streaming
run should need about the same at both.

    python benchmarks/bench_streaming.py [--quick]

Prints a table and writes benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

D, K, B = 128, 1000, 1024
RESULTS = Path(__file__).parent / "results" / "streaming.json"


def make_data(folder: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """Write n rows as .npy and Parquet, in chunks so that making 10x needs no 10x memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, D)).astype(np.float32)
    npy = folder / f"x{n}.npy"
    pqt = folder / f"x{n}.parquet"
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, D))
    schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), D))])
    with pq.ParquetWriter(pqt, schema) as w:
        for s in range(0, n, 65536):
            m = min(65536, n - s)
            X = means[rng.integers(K, size=m)] + 0.5 * rng.normal(size=(m, D)).astype(np.float32)
            out[s:s + m] = X
            w.write_table(pa.table({"id": np.arange(s, s + m),
                                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), D)},
                                   schema=schema))
    out.flush()
    del out
    return {"npy": npy, "parquet": pqt}


def in_memory_rate(npy: Path, repeats: int) -> tuple[float, int]:
    """partial_fit over a tensor in RAM; returns (samples/s, peak RSS of this process in KiB)."""
    code = f"""
import resource, sys, time, numpy as np, torch
from streamcoke import OnlineConstrainedKMeans
X = torch.from_numpy(np.load({str(npy)!r}))
best = 0.0
for _ in range({repeats}):
    km = OnlineConstrainedKMeans({K}, random_state=0)
    start = time.perf_counter()
    for s in range(0, len(X), {B}):
        km.partial_fit(X[s:s + {B}])
    best = max(best, len(X) / (time.perf_counter() - start))
print(best)
"""
    out, rss = measured([sys.executable, "-c", code])
    return float(out.strip().splitlines()[-1]), rss


def measured(cmd: list[str]) -> tuple[str, int]:
    """Run ``cmd``; returns its stdout and its own peak RSS in KiB."""
    with tempfile.TemporaryFile("w+") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        f.seek(0)
        out = f.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out}")
    return out, usage.ru_maxrss


def cli_run(inputs: list[str], folder: Path, repeats: int) -> tuple[float, int]:
    """`streamcoke cluster` on ``inputs``; returns (best samples/s, largest peak RSS in KiB)."""
    best, peak = 0.0, 0
    for _ in range(repeats):
        out, rss = measured([sys.executable, "-m", "streamcoke.cli", "cluster", *inputs, "--n-clusters", str(K),
                             "--batch-size", str(B), "--epochs", "1", "--quiet", "--seed", "0",
                             "--out", str(folder / "labels.parquet")])
        rate = float(re.search(r"\(([\d,]+) samples/s\)", out).group(1).replace(",", ""))
        best, peak = max(best, rate), max(peak, rss)
    return best, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (about a minute)")
    parser.add_argument("--rows", type=int, default=None, help="rows at 1x (default 50k quick, 200k full)")
    args = parser.parse_args()
    n1 = args.rows or (50_000 if args.quick else 200_000)
    repeats = 1 if args.quick else 3
    rows = {}
    with tempfile.TemporaryDirectory(prefix="streamcoke-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        small, large = make_data(folder, n1), make_data(folder, 10 * n1, seed=1)
        from streamcoke.io.shards import write_array_shards

        pattern = write_array_shards(small["npy"], str(folder / "shards" / "x"), maxcount=10_000)
        print(f"data written in {time.perf_counter() - t0:.0f} s: {n1:,} and {10 * n1:,} rows x {D}", file=sys.stderr)

        mem_rate, mem_rss = in_memory_rate(small["npy"], repeats)
        rows["in-memory partial_fit"] = {"rate_1x": mem_rate, "peak_rss_mib_1x": mem_rss / 1024}
        for kind in ("parquet", "npy"):
            r1, m1 = cli_run([str(small[kind])], folder, repeats)
            r10, m10 = cli_run([str(large[kind])], folder, 1)
            rows[f"streamcoke cluster ({kind})"] = {
                "rate_1x": r1, "rate_10x": r10, "vs_in_memory": r1 / mem_rate,
                "peak_rss_mib_1x": m1 / 1024, "peak_rss_mib_10x": m10 / 1024}
        r1, m1 = cli_run([pattern], folder, 1)
        rows["streamcoke cluster (webdataset)"] = {"rate_1x": r1, "vs_in_memory": r1 / mem_rate,
                                                   "peak_rss_mib_1x": m1 / 1024}

    print(f"\nd = {D}, K = {K}, batch = {B}, 1x = {n1:,} rows, 10x = {10 * n1:,} rows, one epoch\n")
    print(f"{'':34s} {'samples/s 1x':>13s} {'10x':>10s} {'vs memory':>10s} {'RSS MiB 1x':>11s} {'10x':>8s}")
    for name, r in rows.items():
        fmt = lambda k, f: (f.format(r[k]) if k in r else "-")  # noqa: E731
        print(f"{name:34s} {fmt('rate_1x', '{:,.0f}'):>13s} {fmt('rate_10x', '{:,.0f}'):>10s} "
              f"{fmt('vs_in_memory', '{:.0%}'):>10s} {fmt('peak_rss_mib_1x', '{:,.0f}'):>11s} "
              f"{fmt('peak_rss_mib_10x', '{:,.0f}'):>8s}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "config": {"n_features": D, "n_clusters": K, "batch_size": B, "rows_1x": n1, "rows_10x": 10 * n1,
                   "repeats": repeats, "quick": args.quick},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "results": rows}, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
