"""Run every benchmark script in turn and collect their tables in benchmarks/results/summary.md.

    python benchmarks/run_all.py            # --quick: about 10 minutes on a 2-core CPU machine
    python benchmarks/run_all.py --full     # the full sweeps (much longer)
    python benchmarks/run_all.py --smoke    # seconds per script, a check that everything runs
    python benchmarks/run_all.py --device cuda   # speed benchmarks on the GPU

Each script runs in its own process (so one failure or one missing peer does not stop the
rest) and writes its own JSON and PNG files next to the summary. Peers that are not installed
(``faiss-cpu``, ``k-means-constrained``, ``river``, ``matplotlib``: ``pip install -e .[bench]``)
are named in a note and their rows skipped; a script that cannot run at all without one (the
river adapter benchmark needs river) is skipped with a note. The summary names the machine
(``common.machine()``), the command and the date; BENCHMARKS.md is left alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import add_size_flags, machine  # noqa: E402

PEERS = {"faiss": "faiss-cpu", "k_means_constrained": "k-means-constrained", "river": "river",
         "matplotlib": "matplotlib"}


def scripts(size: str, device: str, out: Path) -> list[tuple[str, list[str], str | None]]:
    """(script, arguments, module it cannot run without) for each benchmark, at one size."""
    new = [f"--{size}", "--out-dir", str(out)]
    existing = {
        "smoke": [("bench_partial_fit.py", ["--quick", "--out", str(out / "partial_fit.json")]),
                  ("bench_river.py", ["--quick", "--out", str(out / "river.json")]),
                  ("bench_streaming.py", ["--rows", "3000", "--repeats", "1", "--out", str(out / "streaming.json")])],
        "quick": [("bench_partial_fit.py", ["--out", str(out / "partial_fit.json")]),
                  ("bench_river.py", ["--out", str(out / "river.json")]),
                  ("bench_streaming.py", ["--quick", "--out", str(out / "streaming.json")])],
        "full": [("bench_partial_fit.py", ["--out", str(out / "partial_fit.json")]),
                 ("bench_river.py", ["--out", str(out / "river.json")]),
                 ("bench_streaming.py", ["--out", str(out / "streaming.json")])],
    }[size]
    dev = [] if device == "cpu" else ["--device", device]
    out_list = [("bench_speed.py", new + dev, None), ("bench_optimality.py", new, None),
                ("bench_quality.py", new, None)]
    for script, args in existing:
        args = args + (dev if script == "bench_partial_fit.py" else [])
        out_list.append((script, args, "river" if script == "bench_river.py" else None))
    # The trainer against the bare forward-backward loop: ResNet-50 at 224 px on a GPU; on a CPU,
    # the small encoder on 64 px images (about two minutes on 2 cores).
    if size == "smoke":
        trainer = ["--quick"]
    elif device == "cpu":
        trainer = ["--device", "cpu", "--encoder", "small", "--image-size", "64", "--batch-size", "128",
                   "--n-clusters", "300", "400", "500", "--n-images", "1024", "--steps", "6"]
    else:
        trainer = ["--device", device]
    name = "trainer_cpu.json" if device == "cpu" else "trainer.json"
    out_list.append(("bench_trainer.py", trainer + ["--out", str(out / name)], None))
    return out_list


def as_markdown(script: str, args: list[str], stdout: str) -> str:
    """A script's printed output as a section: Markdown tables as they are, other text fenced."""
    lines = [ln for ln in stdout.splitlines() if not ln.startswith("wrote ")]
    command = "`" + " ".join(["python", f"benchmarks/{script}", *map(shlex.quote, args)]) + "`"
    body = "\n".join(lines).strip()
    if any(ln.startswith("### ") for ln in lines):
        return f"{body}\n\nCommand: {command}\n"
    if any(ln.startswith("|") for ln in lines):
        return f"### {script}\n\nCommand: {command}\n\n{body}\n"
    return f"### {script}\n\nCommand: {command}\n\n```text\n{body}\n```\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_flags(p)
    p.add_argument("--device", default="cpu", help="for bench_speed.py and bench_partial_fit.py")
    p.add_argument("--only", nargs="*", default=None, help="run only these scripts (file names)")
    args = p.parse_args(argv)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    installed = {name: importlib.util.find_spec(name) is not None for name in PEERS}
    for name, ok in installed.items():
        if not ok:
            print(f"note: {PEERS[name]} is not installed: its rows are skipped (pip install -e .[bench])")
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/run_all.py", *map(shlex.quote, given)])
    info, start = machine(), time.perf_counter()
    sections, timings = [], []
    for script, script_args, needs in scripts(args.size, args.device, out):
        if args.only is not None and script not in args.only:
            continue
        if needs is not None and not installed.get(needs, False):
            note = f"skipped: needs {PEERS[needs]}, which is not installed"
            print(f"== {script}: {note}")
            sections.append(f"### {script}\n\n{note}\n")
            timings.append((script, None, note))
            continue
        print(f"== {script} {' '.join(script_args)}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / script), *script_args], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        print(done.stdout, flush=True)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1:] or [""]
            note = f"failed (exit {done.returncode}) {last[0]}".strip()
            print(f"== {script}: {note}\n{done.stderr[-3000:]}", file=sys.stderr)
            sections.append(f"### {script}\n\n{note}\n")
        else:
            sections.append(as_markdown(script, script_args, done.stdout))
            note = "ok"
        timings.append((script, seconds, note))
        print(f"== {script}: {note} in {seconds:.0f} s", flush=True)
    total = time.perf_counter() - start
    machine_line = ", ".join(f"{k}: {v}" for k, v in info.items())
    peers_line = ", ".join(f"{PEERS[n]} {'yes' if ok else 'NOT INSTALLED (rows skipped)'}"
                           for n, ok in installed.items())
    rows = "\n".join(f"| {s} | {'' if t is None else f'{t:.0f}'} | {n} |" for s, t, n in timings)
    summary = (f"# Benchmark summary ({args.size})\n\n"
               f"- Command: `{command.strip()}`\n- Date: {info['date']}\n- Machine: {machine_line}\n"
               f"- Peers: {peers_line}\n- Total: {total:.0f} s\n\n"
               f"| script | seconds | status |\n|---|---|---|\n{rows}\n\n"
               "Rates on a shared machine are noisy; contenders are interleaved within each script.\n\n"
               + "\n".join(sections))
    path = out / "summary.md"
    path.write_text(summary)
    print(f"wrote {path} ({total:.0f} s in all)")
    return 0 if all(n == "ok" or n.startswith("skipped") for _, _, n in timings) else 1


if __name__ == "__main__":
    sys.exit(main())
