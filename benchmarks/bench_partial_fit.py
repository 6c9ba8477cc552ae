"""Throughput of ``OnlineConstrainedKMeans.partial_fit`` against its floor and its peers.

Side by side in one run, on the same batches: the bare similarity matrix multiply, as torch's
BLAS does it and (on a CPU with AVX-512) as the multiply kernel of ``streamcoke.core.cpu`` does
it; the faster of the two is the floor of the step (``partial_fit`` uses the kernel on AMD
processors and the BLAS on Intel ones, see ``streamcoke.core.cpu.multiply_kernel``). Then the
multiply followed by the row-wise argmax (plain nearest-center assignment with nothing else: the
floor of any k-means step, which shows how much of the gap to the multiply is the argmax's pass
over the score matrix and how much the rest of the step; on the CPU the step's own
multiply-and-argmax call, which reads each chunk of scores back while it is in cache, with no
duals; elsewhere torch's multiply then argmax), our ``partial_fit`` on torch and on
numpy input; on the CPU also ``partial_fit`` with the other of the two multiplies (what the
choice gains), with the kernels of ``streamcoke.core.cpu`` switched off (what they save) and the
step's compiled calls alone, back to back (what the estimator's Python bookkeeping costs); and
scikit-learn's ``MiniBatchKMeans.partial_fit``. Prints a Markdown
table of samples/s and ratios; writes ``benchmarks/results/partial_fit_<device>.json``.

    python benchmarks/bench_partial_fit.py                 # d=128, K=1000, batch 1024, CPU
    python benchmarks/bench_partial_fit.py --device cuda   # the same on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, table, throughput, write_json  # noqa: E402

from streamcoke import OnlineConstrainedKMeans  # noqa: E402
from streamcoke.core import cpu  # noqa: E402
from streamcoke.core.assign import row_argmax, scored_argmax  # noqa: E402
from streamcoke.core.similarity import products  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-features", type=int, default=128)
    p.add_argument("--n-clusters", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--batches", type=int, default=30, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="a few seconds, for the smoke test")
    p.add_argument("--out", type=Path, default=None,
                   help="where to write the JSON results (default: results/partial_fit_<device>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.rounds = 3, 1
    dev = torch.device(args.device)
    d, K, b = args.n_features, args.n_clusters, args.batch_size
    g = torch.Generator().manual_seed(0)
    n_batches = args.batches + 3
    X = torch.randn(n_batches * b, d, generator=g)
    init = torch.nn.functional.normalize(torch.randn(K, d, generator=g), dim=1)
    Xd, Cd = X.to(dev), init.to(dev)
    Xn = X.numpy()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def batch(i):
        return slice((i % n_batches) * b, (i % n_batches + 1) * b)

    def run_blas():
        out = torch.empty(b, K, device=dev)
        return throughput(lambda i: torch.mm(Xd[batch(i)], Cd.T, out=out), b, n_steps=args.batches, sync=sync)

    def run_kernel():
        out, module = torch.empty(b, K, device=dev), cpu.avx512_kernel()
        return throughput(lambda i: module.scores_into(Xd[batch(i)], Cd, out), b, n_steps=args.batches, sync=sync)

    def run_assign_only():
        out = torch.empty(b, K, device=dev)
        if dev.type == "cpu" and cpu.kernels() is not None:  # the step's own multiply-and-argmax call, no duals
            zeros = torch.zeros(K)
            return throughput(lambda i: scored_argmax(Xd[batch(i)], Cd, zeros, (K,), out=out), b,
                              n_steps=args.batches)
        return throughput(lambda i: row_argmax(products(Xd[batch(i)], Cd, out=out)), b, n_steps=args.batches,
                          sync=sync)

    def run_ours_torch():
        km = OnlineConstrainedKMeans(K, init=init.numpy(), device=dev)
        return throughput(lambda i: km.partial_fit(Xd[batch(i)]), b, n_steps=args.batches, sync=sync)

    blas, kernel = "matmul (torch.mm, the BLAS)", "matmul (streamcoke.core.cpu AVX-512 kernel)"
    has_kernel = dev.type == "cpu" and cpu.avx512_kernel() is not None
    step_multiply = kernel if dev.type == "cpu" and cpu.multiply_kernel() is not None else blas
    contenders = {blas: run_blas}
    if has_kernel:
        contenders[kernel] = run_kernel
    contenders.update({"matmul + argmax (nearest center, nothing else)": run_assign_only,
                       "streamcoke partial_fit (torch)": run_ours_torch})
    if dev.type == "cpu":
        from sklearn.cluster import MiniBatchKMeans

        def run_ours_numpy():
            km = OnlineConstrainedKMeans(K, init=init.numpy(), device=dev)
            return throughput(lambda i: km.partial_fit(Xn[batch(i)]), b, n_steps=args.batches)

        def run_sklearn():
            mbk = MiniBatchKMeans(K, init=init.numpy(), n_init=1, batch_size=b, random_state=0)
            return throughput(lambda i: mbk.partial_fit(Xn[batch(i)]), b, n_steps=max(1, args.batches // 3))

        def run_ours_torch_ops():
            with cpu.use_cpu_kernels(False):
                return run_ours_torch()

        def run_kernels_only():
            # The compiled calls of one default step, back to back, without the estimator's
            # bookkeeping (validation, dual schedule, catch-up check, state, Python glue): the
            # input check, normalisation, multiply, biased argmax with the score-gap statistic,
            # counts, a dual step, certificate terms and running-mean update, on a fitted model's
            # state (centers held fixed). What a step compiled whole would come close to.
            from streamcoke.cluster._inputs import _all_finite
            from streamcoke.core.assign import flat_labels, label_counts
            from streamcoke.core.centers import running_mean_step
            from streamcoke.core.certificate import batch_terms
            from streamcoke.core.duals import repeated_dual_steps
            from streamcoke.core.schedule import GAP_ROWS, constant_plan
            from streamcoke.core.similarity import prepare

            s = OnlineConstrainedKMeans(K, init=init.numpy(), device=dev).partial_fit(Xd[batch(0)])._state
            out, sizes = torch.empty(b, K), (K,)
            lower, plan = torch.full((K,), 0.4 / K), constant_plan(0.05, sizes, float(b))

            def step(i):
                Xb = Xd[batch(i)]
                _all_finite(Xb)
                Xp = prepare(Xb, "cosine")
                Z, labels, best, _ = scored_argmax(Xp, s["centers"], s["rho"] - s["mu"], sizes, 1.0,
                                                   min(GAP_ROWS, b), out=out)
                counts = label_counts(flat_labels(labels, sizes), None, K)
                labels, best, counts, _, _, bias = repeated_dual_steps(
                    Z, 1.0, s["centers"], "cosine", s["rho"], s["mu"], lower, None, plan, sizes, None, float(b),
                    counts, labels, best)
                batch_terms(best, Xp, "cosine", None, counts, bias, s["reference_net"], sizes)
                running_mean_step(Xp, flat_labels(labels, sizes), None, s["centers"], s["epoch_sums"],
                                  s["epoch_counts"] + counts, 1, "cosine")

            return throughput(step, b, n_steps=args.batches)

        def run_ours_other_multiply():  # the multiply partial_fit does not choose here
            previous = os.environ.get(cpu.MULTIPLY_FLAG)
            os.environ[cpu.MULTIPLY_FLAG] = "blas" if step_multiply == kernel else "kernel"
            try:
                return run_ours_torch()
            finally:
                if previous is None:
                    del os.environ[cpu.MULTIPLY_FLAG]
                else:
                    os.environ[cpu.MULTIPLY_FLAG] = previous

        contenders["streamcoke partial_fit (numpy)"] = run_ours_numpy
        if has_kernel:
            other = "torch.mm" if step_multiply == kernel else "the AVX-512 kernel"
            contenders[f"streamcoke partial_fit (torch), multiplying with {other} instead"] = run_ours_other_multiply
        if cpu.kernels() is not None:
            contenders["streamcoke partial_fit (torch, fused CPU kernels off)"] = run_ours_torch_ops
            contenders["the step's compiled calls alone (no bookkeeping)"] = run_kernels_only
        contenders["scikit-learn MiniBatchKMeans.partial_fit"] = run_sklearn

    rates = interleaved(contenders, args.rounds)
    floor_name = max((n for n in (blas, kernel) if n in rates), key=rates.get)
    floor = rates[floor_name]
    rows = [{"method": name, "samples/s": rate, "vs torch.mm": rate / rates[blas], "vs floor": rate / floor}
            for name, rate in rates.items()]
    if "scikit-learn MiniBatchKMeans.partial_fit" in rates:
        sk = rates["scikit-learn MiniBatchKMeans.partial_fit"]
        for r in rows:
            r["vs scikit-learn"] = r["samples/s"] / sk
    info = machine()
    print(f"partial_fit, d={d}, K={K}, batch={b}, float32, device={dev} "
          f"({info.get('gpu', info['cpu'] + ', ' + info['cpu_id'])}, {info['torch_threads']} threads), median of {args.rounds} rounds; "
          f"floor = {floor_name}; partial_fit multiplies with {step_multiply}")
    print(table(rows, ["method", "samples/s", "vs torch.mm", "vs floor", "vs scikit-learn"]))
    result = {"config": {k: str(v) for k, v in vars(args).items()}, "machine": info, "rates": rates,
              "floor": floor_name, "partial_fit multiply": step_multiply}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print("wrote", args.out)
    elif not args.quick:
        print("wrote", write_json(f"partial_fit_{dev.type}", result))
    return result


if __name__ == "__main__":
    main()
