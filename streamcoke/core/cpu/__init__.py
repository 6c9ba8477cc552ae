"""Fused CPU kernels for the step of online constrained k-means, compiled on first use.

On the CPU, what follows the scoring multiply (a per-head argmax over the score matrix, the
score-gap statistic, the running-mean center update) costs as much as half the multiply again
as a chain of torch operations. ``step.cpp`` does it in one pass over the scores and one over the
centers. On processors with AVX-512 it can also do the multiply itself: on AMD EPYC (measured)
the BLAS that torch ships reaches about half the rate of its register-blocked kernel, while on
an Intel Xeon (measured) that BLAS, MKL, is the faster; :func:`multiply_kernel` picks.
``tar_scan.cpp`` holds one more kernel, for the shard reader: the header checks of
:mod:`streamcoke.data.tar_rows`. The module is compiled once per machine with torch's
extension builder (a C++ compiler with OpenMP and ninja are needed; the build is cached under
torch's extension folder, ``TORCH_EXTENSIONS_DIR``) and loaded through pybind11, never
unpickled.

Where it cannot be built, or with ``STREAMCOKE_CPU_KERNELS=0``, the torch (and numpy)
implementations in :mod:`streamcoke.core` and :mod:`streamcoke.data.tar_rows` are used
instead, with a warning; they are also the GPU path, and the tests check that both agree.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("step.cpp")
SOURCES = (SOURCE, Path(__file__).with_name("tar_scan.cpp"))  # step.cpp holds the module's bindings
ENV_FLAG = "STREAMCOKE_CPU_KERNELS"
MULTIPLY_FLAG = "STREAMCOKE_CPU_MULTIPLY"
_lock = threading.Lock()
_module = None
_tried = False
_disabled = 0  # depth of use_cpu_kernels(False) blocks


def _build_name() -> str:
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:10]
    return f"streamcoke_cpu_step_{digest}"


def _build():
    from torch.utils import cpp_extension

    name = _build_name()
    build_dir = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()) / name
    if not any(build_dir.glob(f"{name}*.so")):
        print("streamcoke: compiling the CPU kernels (once per machine, about a minute)...",
              file=sys.stderr, flush=True)
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name, sources=[str(p) for p in SOURCES], build_directory=str(build_dir),
        # OpenMP for at::parallel_for: without it the kernels run on one thread. The runtime is
        # the one torch already loaded (same soname), so the two share one thread pool.
        extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def kernels():
    """The compiled module, or None where it is switched off or could not be built."""
    global _module, _tried
    if _disabled or os.environ.get(ENV_FLAG, "1") == "0":
        return None
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _module = _build()
                except Exception as exc:  # no compiler, no ninja, a failed build
                    warnings.warn(
                        f"streamcoke: the fused CPU kernels could not be built ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}); using the "
                        f"slower torch implementation. Set {ENV_FLAG}=0 to silence this.",
                        RuntimeWarning, stacklevel=3)
                    _module = None
                _tried = True
    return _module


def avx512_kernel():
    """The compiled module where its AVX-512 multiply can run on this processor, else None."""
    module = kernels()
    return module if module is not None and module.has_avx512() else None


def multiply_kernel():
    """The compiled module where its AVX-512 multiply is the one to use, else None (the BLAS
    does the multiply).

    ``STREAMCOKE_CPU_MULTIPLY`` chooses: ``auto`` (the default) takes the kernel on processors
    with AVX-512 unless they are Intel processors and torch's BLAS is MKL, which is the faster
    there; ``kernel`` takes it wherever it runs; ``blas`` never does. The choice decides the
    order in which a score's terms are added, and so its last bits: a model continues
    bit-identically where the choice is the same.
    """
    module = avx512_kernel()
    if module is None:
        return None
    choice = os.environ.get(MULTIPLY_FLAG, "auto")
    if choice == "kernel":
        return module
    if choice == "blas":
        return None
    if choice != "auto":
        raise ValueError(f"{MULTIPLY_FLAG}={choice!r} is not one of 'auto', 'kernel', 'blas'")
    return None if module.is_intel() and _blas_is_mkl() else module


def _blas_is_mkl() -> bool:
    import torch

    return torch.backends.mkl.is_available()


@contextlib.contextmanager
def use_cpu_kernels(enabled: bool):
    """Within the block, ``enabled=False`` routes CPU work through the torch implementations
    (for comparing the two, and for timing the difference)."""
    global _disabled
    _disabled += 0 if enabled else 1
    try:
        yield
    finally:
        _disabled -= 0 if enabled else 1
