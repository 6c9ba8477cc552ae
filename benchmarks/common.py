"""Shared helpers of the benchmark scripts: timing, machine description, result files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_id": _cpu_id(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_id() -> str:
    """Vendor, family and model, and the widest vector extension: machines that share a
    model name (as virtual ones often do) can still be told apart."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "flags") and key not in fields:
                fields[key] = value.strip()
            if len(fields) == 4:
                break
    except OSError:
        return platform.machine() or "unknown"
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')}, {vector}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def throughput(step: Callable[[int], object], n_items: int, *, n_steps: int, warmup: int = 3,
               sync: Callable[[], None] = lambda: None) -> float:
    """Items per second of ``step(i)`` run ``n_steps`` times after ``warmup`` untimed calls."""
    for i in range(warmup):
        step(i)
    sync()
    start = time.perf_counter()
    for i in range(n_steps):
        step(i)
    sync()
    return n_items * n_steps / (time.perf_counter() - start)


def interleaved(contenders: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Run every contender once per round, in turn, and keep each one's median: slow drifts of
    the machine (other load, clock changes) then hit all contenders alike."""
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            samples[name].append(run())
    return {name: statistics.median(v) for name, v in samples.items()}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-flavoured Markdown table."""
    def fmt(v):
        return f"{v:,.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:,.0f}" if isinstance(v, float) else str(v))
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------- shared by the
# peer benchmarks (bench_speed, bench_optimality, bench_quality, run_all)

def add_size_flags(parser, *, out_dir: bool = True) -> None:
    """``--smoke`` (seconds, for the tests), ``--quick`` (the default) and ``--full`` sizes."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", dest="size", action="store_const", const="smoke",
                      help="tiny sizes, a few seconds (the smoke test)")
    size.add_argument("--quick", dest="size", action="store_const", const="quick",
                      help="a few minutes on a 2-core CPU (the default)")
    size.add_argument("--full", dest="size", action="store_const", const="full", help="the full sweep")
    parser.set_defaults(size="quick")
    if out_dir:
        parser.add_argument("--out-dir", type=Path, default=RESULTS,
                            help="where to write NAME.json and NAME*.png (default benchmarks/results)")


def optional_import(module: str, note: str = ""):
    """The module, or None with a printed note: peers are optional (the ``bench`` extra)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        print(f"note: {module} is not installed ({exc.__class__.__name__}); its rows are skipped"
              + (f" ({note})" if note else "") + ". `pip install -e .[bench]` adds it.")
        return None


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (plots skipped) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; plots are skipped")
        return None
    return plt


def save_figure(fig, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(folder) / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    print("wrote", path)
    return path


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds taken by ``fn()`` and what it returned."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def keeping_result(results: dict, name: str, fn: Callable[[], object]) -> Callable[[], float]:
    """A contender for :func:`interleaved`: times ``fn()`` and keeps what it returned in
    ``results[name]`` (the last round's), for scoring after the timing."""
    def run() -> float:
        seconds, results[name] = timed(fn)
        return seconds
    return run


def capped_rate(step: Callable[[int], object], *, chunk: int, budget_s: float, max_items: int) -> float:
    """Items per second of ``step(i)`` for slow per-item peers (pure-Python river): whole chunks
    of ``chunk`` items until ``budget_s`` seconds or ``max_items`` items have passed, at least one
    chunk. A rate from a few items; meant for orders of magnitude."""
    done, start = 0, time.perf_counter()
    while True:
        for _ in range(chunk):
            step(done)
            done += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s or done + chunk > max_items:
            return done / elapsed


def write_json_to(folder: Path, name: str, payload: dict) -> Path:
    """``write_json`` into another folder (the smoke tests write to a temporary one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def save_result(payload: dict, out: Path | None, name: str, quick: bool) -> Path | None:
    """A dedicated benchmark's JSON: to ``out`` when given, else to ``results/NAME.json``
    unless it was a ``--quick`` run (which must not replace a real one); written atomically."""
    if out is not None:
        return write_json_to(Path(out).parent, Path(out).stem, payload)
    return None if quick else write_json_to(RESULTS, name, payload)


def _jsonable(v):
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v)}")
