"""Speed of the online step against its floor and its peers, swept over K, d and batch size.

For every configuration (d features, K clusters, batches of b rows, float32, unit-norm rows,
fixed random initial centers), side by side in one run, the contenders interleaved round by
round (median of the rounds):

- ``matmul``: the bare similarity multiply ``X @ C.T`` of one batch by torch's BLAS, on
  ``--device``; and on a CPU with AVX-512 ``matmul (kernel)``, the same multiply by the kernel
  of ``streamcoke.core.cpu`` that ``partial_fit`` uses there (the faster of the two is the
  floor of the step);
- ``streamcoke partial_fit``: the whole online step (assignment with duals, dual ascent,
  running-mean centers), torch tensors on ``--device``;
- ``scikit-learn MiniBatchKMeans.partial_fit`` (CPU): its mini-batch step (needs b >= K);
- ``faiss search + mean update`` (CPU, ``faiss-cpu``): the per-batch equivalent of our step
  built from faiss: ``IndexFlatIP.search(batch, 1)`` for the nearest center, then the running
  mean of each center's members (a sparse one-hot product), re-normalised, and the index
  refilled with the new centers. It is *not* ``faiss.Kmeans`` (an offline Lloyd iteration
  over a training set); faiss has no online k-means;
- ``river KMeans.learn_one`` and ``river STREAMKMeans.learn_one`` (CPU, pure Python, one dict
  per sample): samples/s from a time-capped loop over fewer samples of the same data
  (``STREAMKMeans(chunk_size=2K)``, whole chunks only); skipped where K*d is too large to
  finish a chunk in the cap.

Peers that are not installed are skipped with a note. With ``--device cuda`` the matmul and
streamcoke run on the GPU; the CPU-only peers run on the CPU and are labelled so.

    python benchmarks/bench_speed.py [--smoke | --quick | --full] [--device cuda]

Prints a Markdown table (samples/s and ratios), writes benchmarks/results/speed.json and
speed_vs_K.png (log-log samples/s against K), speed_vs_d.png, speed_vs_batch.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import sparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_size_flags, capped_rate, interleaved, machine, optional_import,  # noqa: E402
                    pyplot, save_figure, table, throughput, write_json_to)

from streamcoke import OnlineConstrainedKMeans  # noqa: E402
from streamcoke.core import cpu  # noqa: E402
from streamcoke.core.similarity import KERNEL_MIN_ROWS  # noqa: E402

SIZES = {
    # base (d, K, b); K sweep at the d values listed; extra d and b sweeps at the base;
    # timed batches per round, rounds, river seconds per round, river's largest K*d
    "smoke": dict(base=(16, 100, 256), K=[10, 100], K_at_d=[16], d=[], b=[],
                  batches=2, rounds=1, river_s=0.1, river_kd=2_000),
    "quick": dict(base=(128, 1000, 1024), K=[10, 100, 1000, 10000], K_at_d=[128], d=[16, 1024],
                  b=[256, 4096], batches=10, rounds=5, river_s=0.5, river_kd=15_000),
    "full": dict(base=(128, 1000, 1024), K=[10, 30, 100, 300, 1000, 3000, 10000], K_at_d=[16, 128, 1024],
                 d=[16, 64, 256, 512, 1024], b=[64, 256, 1024, 4096, 16384], batches=20, rounds=5,
                 river_s=3.0, river_kd=150_000),
}

MATMUL, KERNEL, OURS = "matmul", "matmul (kernel)", "streamcoke"
SKLEARN, FAISS = "sklearn MiniBatchKMeans", "faiss search+update"
RIVER_KM, RIVER_SKM = "river KMeans", "river STREAMKMeans"
METHODS = [MATMUL, KERNEL, OURS, SKLEARN, FAISS, RIVER_KM, RIVER_SKM]


def configurations(size: dict) -> list[tuple[int, int, int]]:
    d0, K0, b0 = size["base"]
    out = [(d, K, b0) for d in size["K_at_d"] for K in size["K"]]
    out += [(d, K0, b0) for d in size["d"]] + [(d0, K0, b) for b in size["b"]]
    return list(dict.fromkeys(out))  # in order, without repeats


class FaissOnline:
    """Nearest center by ``IndexFlatIP.search``, then running means of the members (numpy)."""

    def __init__(self, faiss, centers: np.ndarray):
        self.faiss, self.K = faiss, len(centers)
        self.centers = centers.copy()
        self.sums = np.zeros_like(centers, dtype=np.float64)
        self.counts = np.zeros(self.K, dtype=np.int64)
        self.index = faiss.IndexFlatIP(centers.shape[1])
        self.index.add(self.centers)

    def partial_fit(self, x: np.ndarray) -> np.ndarray:
        _, nearest = self.index.search(x, 1)
        labels = nearest[:, 0]
        n = np.bincount(labels, minlength=self.K)
        members = sparse.csr_matrix((np.ones(len(x)), (labels, np.arange(len(x)))), shape=(self.K, len(x)))
        self.sums += members @ x  # per-center sums of this batch's members
        self.counts += n
        hit = n > 0
        means = self.sums[hit] / self.counts[hit, None]
        self.centers[hit] = means / np.linalg.norm(means, axis=1, keepdims=True)
        self.index.reset()
        self.index.add(self.centers)
        return labels


def bench_config(d: int, K: int, b: int, size: dict, dev: torch.device, peers: dict) -> dict:
    g = torch.Generator().manual_seed(d * 100_003 + K * 7 + b)
    n_pool = max(2, min(size["batches"] + 3, (1 << 24) // (b * d)))  # distinct batches, cycled
    X = torch.nn.functional.normalize(torch.randn(n_pool * b, d, generator=g), dim=1)
    init = torch.nn.functional.normalize(torch.randn(K, d, generator=g), dim=1)
    Xd, Cd, Xn, Cn = X.to(dev), init.to(dev), X.numpy(), init.numpy()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    steps = size["batches"]

    def rows(i):
        j = i % n_pool
        return slice(j * b, (j + 1) * b)

    def run_matmul():
        out = torch.empty(b, K, device=dev)
        return throughput(lambda i: torch.mm(Xd[rows(i)], Cd.T, out=out), b, n_steps=steps, sync=sync)

    def run_ours():
        km = OnlineConstrainedKMeans(K, init=Cn, device=dev)
        return throughput(lambda i: km.partial_fit(Xd[rows(i)]), b, n_steps=steps, sync=sync)

    def run_kernel():
        out, module = torch.empty(b, K, device=dev), cpu.avx512_kernel()
        return throughput(lambda i: module.scores_into(Xd[rows(i)], Cd, out), b, n_steps=steps, sync=sync)

    contenders = {MATMUL: run_matmul, OURS: run_ours}
    skipped = {}
    if dev.type == "cpu" and cpu.avx512_kernel() is not None and b >= KERNEL_MIN_ROWS:
        contenders[KERNEL] = run_kernel
    else:
        skipped[KERNEL] = "no AVX-512 kernel here"
    if b >= K:
        from sklearn.cluster import MiniBatchKMeans

        def run_sklearn():
            mbk = MiniBatchKMeans(K, init=Cn, n_init=1, batch_size=b, random_state=0)
            return throughput(lambda i: mbk.partial_fit(Xn[rows(i)]), b, n_steps=max(1, steps // 2), warmup=1)

        contenders[SKLEARN] = run_sklearn
    else:
        skipped[SKLEARN] = "needs batch >= K"
    if peers["faiss"] is not None:
        def run_faiss():
            fo = FaissOnline(peers["faiss"], Cn)
            return throughput(lambda i: fo.partial_fit(Xn[rows(i)]), b, n_steps=steps, warmup=1)

        contenders[FAISS] = run_faiss
    else:
        skipped[FAISS] = "not installed"
    river = peers["river"]
    if river is not None and K * d <= size["river_kd"]:
        n_dicts = min(len(Xn), 4 * K + 200)
        dicts = [dict(zip(range(d), row.tolist())) for row in Xn[:n_dicts]]

        def run_river_kmeans():
            m = river.cluster.KMeans(n_clusters=K, seed=0)
            return capped_rate(lambda i: m.learn_one(dicts[i % n_dicts]), chunk=10,
                               budget_s=size["river_s"], max_items=10 * n_dicts)

        def run_river_stream():
            m = river.cluster.STREAMKMeans(chunk_size=2 * K, n_clusters=K, seed=0)
            return capped_rate(lambda i: m.learn_one(dicts[i % n_dicts]), chunk=2 * K,
                               budget_s=size["river_s"], max_items=10 * n_dicts)

        contenders[RIVER_KM] = run_river_kmeans
        contenders[RIVER_SKM] = run_river_stream
    else:
        skipped[RIVER_KM] = skipped[RIVER_SKM] = ("not installed" if river is None
                                                  else f"K*d > {size['river_kd']:,} (pure Python, too slow)")
    rates = interleaved(contenders, size["rounds"])
    return {"d": d, "K": K, "b": b, "rates": rates, "skipped": skipped}


def row_of(result: dict) -> dict:
    r = result["rates"]
    row = {"d": result["d"], "K": result["K"], "b": result["b"]}
    row.update({m: r[m] for m in METHODS if m in r})
    ours = r[OURS]
    row["ours/floor"] = ours / max(r[m] for m in (MATMUL, KERNEL) if m in r)
    for m, col in [(MATMUL, "ours/matmul"), (SKLEARN, "ours/sklearn"), (FAISS, "ours/faiss"), (RIVER_KM, "ours/river")]:
        if m in r:
            row[col] = ours / r[m]
    return row


def plot(results: list[dict], size: dict, dev: torch.device, folder: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    d0, K0, b0 = size["base"]
    labels = {m: m + ("" if m in (MATMUL, OURS) or dev.type == "cpu" else " (CPU)") for m in METHODS}
    labels[MATMUL] = f"matmul, torch BLAS ({dev.type})"
    labels[KERNEL] = "matmul, streamcoke AVX-512 kernel (cpu)"
    labels[OURS] = f"streamcoke partial_fit ({dev.type})"

    def lines(ax, pick, key):
        for m in METHODS:
            pts = sorted((r[key], r["rates"][m]) for r in results if pick(r) and m in r["rates"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=labels[m])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel("samples/s")
        ax.grid(True, which="both", alpha=0.3)

    panels = size["K_at_d"]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, d in zip(axes[0], panels):
        lines(ax, lambda r, d=d: r["d"] == d and r["b"] == b0, "K")
        ax.set_xlabel("K (clusters)")
        ax.set_title(f"d = {d}, batch {b0}")
    axes[0][0].legend(fontsize=8)
    save_figure(fig, folder, "speed_vs_K")
    for key, other, title in [("d", lambda r: r["K"] == K0 and r["b"] == b0, f"K = {K0}, batch {b0}"),
                              ("b", lambda r: r["K"] == K0 and r["d"] == d0, f"d = {d0}, K = {K0}")]:
        if sum(other(r) for r in results) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        lines(ax, other, key)
        ax.set_xlabel({"d": "d (features)", "b": "batch size"}[key])
        ax.set_title(title)
        ax.legend(fontsize=8)
        save_figure(fig, folder, {"d": "speed_vs_d", "b": "speed_vs_batch"}[key])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_flags(p)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    size, dev = SIZES[args.size], torch.device(args.device)
    peers = {"faiss": optional_import("faiss"), "river": optional_import("river.cluster") and optional_import("river")}
    if peers["faiss"] is not None:
        peers["faiss"].omp_set_num_threads(torch.get_num_threads())  # the same threads as torch
    info = machine()
    start = time.perf_counter()
    results = []
    for d, K, b in configurations(size):
        results.append(bench_config(d, K, b, size, dev, peers))
        print(f"  d={d} K={K} b={b}: " + ", ".join(f"{m} {v:,.0f}/s" for m, v in results[-1]["rates"].items()),
              file=sys.stderr)
    peer_note = "" if dev.type == "cpu" else " (scikit-learn, faiss and river on the CPU)"
    print(f"\n### Speed of the online step (`bench_speed.py --{args.size}`)\n")
    print(f"samples/s, float32, device={dev}{peer_note} ({info.get('gpu', info['cpu'])}, "
          f"{info['torch_threads']} threads), median of {size['rounds']} interleaved rounds of "
          f"{size['batches']} batches; river: time-capped per-sample loops. "
          f"`ours/X` = streamcoke rate / X rate; floor = the faster of the two multiplies. "
          f"Empty: skipped (see JSON).\n")
    cols = ["d", "K", "b"] + METHODS + ["ours/floor", "ours/matmul", "ours/sklearn", "ours/faiss", "ours/river"]
    print(table([row_of(r) for r in results], cols))
    skipped = sorted({f"{m}: {why}" for r in results for m, why in r["skipped"].items()})
    if skipped:
        print("\nSkipped: " + "; ".join(skipped))
    payload = {"size": args.size, "device": str(dev), "machine": info, "config": size,
               "seconds": time.perf_counter() - start, "results": results}
    print("wrote", write_json_to(args.out_dir, "speed", payload))
    plot(results, size, dev, args.out_dir)
    return payload


if __name__ == "__main__":
    main()
