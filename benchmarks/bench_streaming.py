"""Streaming throughput and memory of `streamcoke cluster` against in-memory `partial_fit`.

The data are Gaussian-mixture embeddings (d = 128) clustered into K = 1000 clusters in
batches of 1024, one epoch. The same rows, the same batches, five ways:

- in memory: a float32 tensor already in RAM, sliced into batches for ``partial_fit``;
- ``streamcoke cluster`` on a Parquet file (fixed-size-list column), on an Arrow IPC file of
  the same table (record batches of 65,536 rows), on a ``.npy`` file, on
  WebDataset shards of one row per sample (``KEY.npy``, at the 1x size only) and on shards of
  blocks of 1024 rows per sample (``streamcoke shards --rows-per-sample 1024``), writing the
  labels to Parquet: the whole command, reading, clustering, scoring and writing.

Rates are samples per second after the first batch: the first ``partial_fit`` seeds the 1000
centers, a one-off that is not streaming's business (``streamcoke cluster`` prints this rate;
process start-up is left out too). Each round runs the in-memory loop and then every streamed
kind, so that a busy machine slows both sides of a ratio alike; the table shows the best of
``--repeats`` rounds, ``vs memory`` is the best streamed rate over the best in-memory one, and
``median`` the median over rounds of each round's own ratio (the steadier figure on a shared
machine, where one slow round moves a best-of ratio a lot).
The streamed runs use the command's default ``--prefetch auto``: on a CPU step with no core to
spare beyond torch's threads it reads between steps. Each kind is also run at 1x with
``--prefetch on`` (a reader thread beside the step), side by side, to show what that choice is
worth on the machine at hand.
``read alone`` is the source by itself (``streamcoke.data.open_source``, one thread, no
clustering, no prefetch thread): what reading costs the machine, apart from the contention.
Peak memory is the peak resident set size of a separate process per run (its own VmHWM), at 1x
and at 10x the rows: a streaming run should need about the same at both.

    python benchmarks/bench_streaming.py [--quick] [--rows N] [--repeats R]

Prints a table and writes benchmarks/results/streaming.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

D, K, B = 128, 1000, 1024
RESULTS = Path(__file__).parent / "results" / "streaming.json"


def make_data(folder: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """Write n rows as .npy, Parquet and Arrow IPC, in chunks so that making 10x needs no 10x memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    means = rng.normal(size=(K, D)).astype(np.float32)
    npy = folder / f"x{n}.npy"
    pqt = folder / f"x{n}.parquet"
    ipc = folder / f"x{n}.arrow"
    out = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float32, shape=(n, D))
    schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), D))])
    with pq.ParquetWriter(pqt, schema) as w, pa.ipc.new_file(str(ipc), schema) as w_ipc:
        for s in range(0, n, 65536):
            m = min(65536, n - s)
            X = means[rng.integers(K, size=m)] + 0.5 * rng.normal(size=(m, D)).astype(np.float32)
            out[s:s + m] = X
            table = pa.table({"id": np.arange(s, s + m),
                              "embedding": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel()), D)},
                             schema=schema)
            w.write_table(table)
            w_ipc.write_table(table)
    out.flush()
    del out
    return {"npy": npy, "parquet": pqt, "arrow": ipc}


def in_memory_rate(npy: Path) -> tuple[float, int]:
    """partial_fit over a tensor in RAM, timed after the first (seeding) batch; returns
    (samples/s, peak RSS of that process in KiB)."""
    code = f"""
import time, numpy as np, torch
from streamcoke import OnlineConstrainedKMeans
X = torch.from_numpy(np.load({str(npy)!r}))
km = OnlineConstrainedKMeans({K}, random_state=0)
km.partial_fit(X[:{B}])
start = time.perf_counter()
for s in range({B}, len(X), {B}):
    km.partial_fit(X[s:s + {B}])
print("rate", (len(X) - {B}) / (time.perf_counter() - start))
"""
    out, rss = measured(code)
    return float(re.search(r"^rate ([\d.e+]+)$", out, re.M).group(1)), rss


# The child's own peak RSS. ``ru_maxrss`` (of wait4, or of the child itself) also counts the
# pages the forked child shared with this process before it ran exec, so every run reported at
# least the benchmark's own size; VmHWM belongs to the address space made by exec.
PEAK = """
import atexit
def _peak():
    try:
        with open("/proc/self/status") as f:
            kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak-rss-kib {kib}", flush=True)
atexit.register(_peak)
"""


def measured(code: str) -> tuple[str, int]:
    """Run Python ``code`` in a fresh process; returns its stdout and its own peak RSS in KiB."""
    with tempfile.TemporaryFile("w+") as f:
        p = subprocess.Popen([sys.executable, "-c", PEAK + code], stdout=f, stderr=subprocess.STDOUT, text=True)
        status = p.wait()
        f.seek(0)
        out = f.read()
    if status != 0:
        raise RuntimeError(f"benchmark process failed:\n{out}")
    return out, int(re.search(r"peak-rss-kib (\d+)", out).group(1))


def read_rate(path: Path) -> float:
    """Samples/s of the source alone, in one thread, after its first batch."""
    code = f"""
import time, torch
torch.set_num_threads(1)
from streamcoke.data import open_source
it = iter(open_source([{str(path)!r}], batch_size={B}))
next(it)
n, start = 0, time.perf_counter()
for b in it:
    n += len(b.ids)
print("rate", n / (time.perf_counter() - start))
"""
    out, _ = measured(code)
    return float(re.search(r"^rate ([\d.e+]+)$", out, re.M).group(1))


def cli_run(inputs: list[str], folder: Path, prefetch: str = "auto") -> tuple[float, int]:
    """`streamcoke cluster` on ``inputs``; returns (samples/s after the first batch, peak RSS in KiB)."""
    argv = ["cluster", *inputs, "--n-clusters", str(K), "--batch-size", str(B), "--epochs", "1", "--quiet",
            "--seed", "0", "--prefetch", prefetch, "--out", str(folder / "labels.parquet")]
    out, rss = measured(f"from streamcoke.cli import main\nmain({argv!r})")
    rate = float(re.search(r"([\d,]+) samples/s after the first batch", out).group(1).replace(",", ""))
    return rate, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round")
    # The step clusters about a million rows a second here: fewer rows measure mostly start-up.
    parser.add_argument("--rows", type=int, default=200_000, help="rows at 1x (default 200,000)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 1 quick, 3 full)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args()
    n1 = args.rows
    repeats = args.repeats or (1 if args.quick else 3)
    import torch

    from streamcoke.data import prefetch_pays
    from streamcoke.io.shards import write_array_shards

    with tempfile.TemporaryDirectory(prefix="streamcoke-bench-") as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        small, large = make_data(folder, n1), make_data(folder, 10 * n1, seed=1)
        small["webdataset"] = write_array_shards(small["npy"], str(folder / "rows" / "x"), maxcount=10_000)
        small["webdataset, blocks"] = write_array_shards(small["npy"], str(folder / "blocks" / "x"),
                                                        maxcount=100 * B, rows_per_sample=B)
        large["webdataset, blocks"] = write_array_shards(large["npy"], str(folder / "blocks" / "y"),
                                                        maxcount=100 * B, rows_per_sample=B)
        print(f"data written in {time.perf_counter() - t0:.0f} s: {n1:,} and {10 * n1:,} rows x {D}", file=sys.stderr)

        kinds = ("parquet", "arrow", "npy", "webdataset", "webdataset, blocks")
        mem_rates, mem_rss = [], 0
        rates = {k: [] for k in kinds}
        threaded = {k: [] for k in kinds}  # --prefetch on
        rss1 = {k: 0 for k in kinds}
        for r in range(repeats):  # in memory, then each kind: a busy machine slows both sides alike
            rate, rss = in_memory_rate(small["npy"])
            mem_rates.append(rate)
            mem_rss = max(mem_rss, rss)
            for kind in kinds:
                rate, rss = cli_run([str(small[kind])], folder)
                rates[kind].append(rate)
                rss1[kind] = max(rss1[kind], rss)
                threaded[kind].append(cli_run([str(small[kind])], folder, prefetch="on")[0])
            print(f"round {r + 1}: in memory {mem_rates[-1]:,.0f} samples/s, "
                  + ", ".join(f"{k} {rates[k][-1]:,.0f} (thread {threaded[k][-1]:,.0f})" for k in kinds),
                  file=sys.stderr)
        rows = {"in-memory partial_fit": {"rate_1x": max(mem_rates), "rates_1x": mem_rates,
                                          "peak_rss_mib_1x": mem_rss / 1024}}
        for kind in kinds:
            row = {"rate_1x": max(rates[kind]), "rates_1x": rates[kind],
                   "vs_in_memory": max(rates[kind]) / max(mem_rates),
                   "vs_in_memory_per_round": [a / m for a, m in zip(rates[kind], mem_rates)],
                   "vs_in_memory_median": statistics.median(a / m for a, m in zip(rates[kind], mem_rates)),
                   "peak_rss_mib_1x": rss1[kind] / 1024,
                   "prefetch_on_rates_1x": threaded[kind],
                   "prefetch_on_vs_in_memory_median": statistics.median(
                       a / m for a, m in zip(threaded[kind], mem_rates))}
            row["read_alone"] = read_rate(small[kind])
            if kind in large:
                r10, m10 = cli_run([str(large[kind])], folder)
                row.update(rate_10x=r10, peak_rss_mib_10x=m10 / 1024,
                           rss_growth_10x=m10 / rss1[kind] - 1)
            rows[f"streamcoke cluster ({kind})"] = row

    print(f"\nd = {D}, K = {K}, batch = {B}, 1x = {n1:,} rows, 10x = {10 * n1:,} rows, one epoch; "
          f"rates after the first batch, best of {repeats}\n")
    print(f"--prefetch auto reads {'in a thread' if prefetch_pays() else 'between steps'} here "
          f"({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads); 'thread' is the median ratio with --prefetch on\n")
    print(f"{'':40s} {'samples/s 1x':>13s} {'10x':>10s} {'vs memory':>10s} {'median':>7s} {'thread':>7s} "
          f"{'read alone':>11s} {'RSS MiB 1x':>11s} {'10x':>8s} {'growth':>7s}")
    for name, r in rows.items():
        fmt = lambda k, f: (f.format(r[k]) if k in r else "-")  # noqa: E731
        print(f"{name:40s} {fmt('rate_1x', '{:,.0f}'):>13s} {fmt('rate_10x', '{:,.0f}'):>10s} "
              f"{fmt('vs_in_memory', '{:.0%}'):>10s} {fmt('vs_in_memory_median', '{:.0%}'):>7s} "
              f"{fmt('prefetch_on_vs_in_memory_median', '{:.0%}'):>7s} {fmt('read_alone', '{:,.0f}'):>11s} "
              f"{fmt('peak_rss_mib_1x', '{:,.0f}'):>11s} "
              f"{fmt('peak_rss_mib_10x', '{:,.0f}'):>8s} {fmt('rss_growth_10x', '{:+.0%}'):>7s}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "config": {"n_features": D, "n_clusters": K, "batch_size": B, "rows_1x": n1, "rows_10x": 10 * n1,
                   "repeats": repeats, "quick": args.quick, "rates": "samples/s after the first batch",
                   "webdataset blocks": f"{B} rows per sample", "prefetch auto reads in a thread": prefetch_pays(),
                   "torch_threads": torch.get_num_threads()},
        "machine": {**machine(), "platform": platform.platform()},
        "results": rows}, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
