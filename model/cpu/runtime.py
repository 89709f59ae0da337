"""Process-level settings that make MLX fast on a CPU, each applied only when it must be.

`prepare_runtime()` runs inside `import nanogpt_mlx`, before anything can import `mlx.core`,
and does only what cannot wait (Linux only; see README.md for the exact list):
- tells OpenBLAS's idle worker threads to sleep at once (`OPENBLAS_THREAD_TIMEOUT`), read by
  each OpenBLAS when it loads: MLX's (next step) and NumPy's (`import numpy`, later);
- loads an optimized BLAS into the global symbol scope (blas.py), which only works before libmlx;
- sets flush-to-zero / denormals-are-zero in the importing thread, so the threads MLX and the
  BLAS create afterwards inherit it: masked attention scores produce denormals, which are ~100x
  slower to compute with.

`prepare_compute()` runs when the model first computes on the CPU (the CPU ops are created,
see ops.py), because only then does the process need it:
- glibc malloc keeps large freed blocks instead of mmapping/munmapping them: MLX allocates every
  intermediate fresh, and the page faults of fresh >32 MB buffers cost more than the ops
  themselves. The cost: freed memory stays in the process;
- a `g++` wrapper adding `-march=native` goes first on PATH for the kernels `mx.compile` builds
  with g++ on the CPU (MLX reads no flag for this); fused elementwise kernels vectorize for the
  machine instead of baseline x86-64.

Nothing needs an environment variable from the user; NANOGPT_MLX_NO_BLAS=1 and
NANOGPT_MLX_BLAS=openblas+mkl|openblas|mkl exist so benchmarks can compare side by side.
Plain Python and ctypes only: this module is imported before `mlx.core` and NumPy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import shutil
import sys
import threading
import warnings
from dataclasses import dataclass, field

from nanogpt_mlx.atomic import atomic_file
from nanogpt_mlx.model.cpu import blas


@dataclass
class RuntimeReport:
    """What was done to this process, for `nanogpt-mlx info`, benchmarks and the tests."""

    blas_path: str | None = None
    blas_name: str = "reference (MLX wheel)"
    blas_one_row_path: str | None = None  # with "openblas+mkl": MKL, which serves the 1-row products
    ftz_daz: bool = False
    numpy_blas_quiet: bool = False
    compute_prepared: bool = False  # prepare_compute ran (the two below)
    malloc_tuned: bool = False
    jit_march_native: bool = False
    notes: list[str] = field(default_factory=list)


REPORT = RuntimeReport()
_runtime_prepared = False
_compute_lock = threading.Lock()

# OpenBLAS waits 2^n cycles before an idle worker thread sleeps; 2^28 (~0.1 s) by default.
OPENBLAS_THREAD_TIMEOUT = "4"


def prepare_runtime() -> RuntimeReport:
    """The settings that must precede `mlx.core` (idempotent). Called by `import nanogpt_mlx`."""
    global _runtime_prepared
    if _runtime_prepared:
        return REPORT
    _runtime_prepared = True
    if "mlx.core" in sys.modules:
        REPORT.notes.append("mlx.core was imported before nanogpt_mlx: the optimized BLAS could not be installed")
        warnings.warn(
            "nanogpt-mlx: import nanogpt_mlx before mlx.core, or CPU matmuls stay on the slow reference BLAS.",
            RuntimeWarning,
            stacklevel=3,
        )
        return REPORT
    if sys.platform.startswith("linux"):
        REPORT.numpy_blas_quiet = _quiet_openblas()  # before either OpenBLAS loads
        blas.load(REPORT)
        REPORT.ftz_daz = _set_ftz_daz()
    return REPORT


def prepare_compute() -> RuntimeReport:
    """The settings only a process that computes on the CPU needs (idempotent, thread-safe)."""
    with _compute_lock:
        if not REPORT.compute_prepared:
            REPORT.compute_prepared = True
            if sys.platform.startswith("linux"):
                REPORT.malloc_tuned = _tune_malloc()
                REPORT.jit_march_native = _jit_compiler_wrapper()
    return REPORT


def _quiet_openblas() -> bool:
    """Make OpenBLAS worker threads sleep right after their work instead of spinning; returns
    whether NumPy's will (it loads its own OpenBLAS with `import numpy`).

    On the CPU the LM head runs in NumPy (ops.HostHead), between MLX's matmuls. Both BLAS pools
    keep idle worker threads busy-waiting for a while, and on a machine with few cores each
    pool's spinning slowed the other's work (measured in benchmarks/README.md; MKL's spin made no
    difference there). OpenBLAS reads the setting when it loads, so it is set before MLX's
    OpenBLAS (if that is the one chosen) and NumPy's load.
    """
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)
    if "numpy" in sys.modules:
        REPORT.notes.append("numpy was imported before nanogpt_mlx: its BLAS threads keep spinning")
        return False
    return True


_KEEP_ALIVE: list[object] = []


def _set_ftz_daz() -> bool:
    """Set FTZ|DAZ in this thread's MXCSR (x86-64 only) with a 4-instruction leaf function.

    Python has no API for MXCSR; a few bytes of machine code in an executable page do it
    without a compiler: stmxcsr [rsp-4]; or dword [rsp-4], 0x8040; ldmxcsr [rsp-4]; ret.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    code = bytes.fromhex("0fae5c24fc" "814c24fc40800000" "0fae5424fc" "c3")
    try:
        buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return False
    buf.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ctypes.CFUNCTYPE(None)(address)()
    _KEEP_ALIVE.append(buf)
    return True


def _tune_malloc() -> bool:
    """Keep large freed blocks in the heap instead of returning them to the OS on every op."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name)
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_mmap_max, 0) == 1
    ok &= libc.mallopt(m_trim_threshold, 1 << 30) == 1
    return bool(ok)


def cache_dir(name: str) -> str:
    """~/.cache/nanogpt-mlx/<name> (or under $XDG_CACHE_HOME)."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanogpt-mlx", name)


def _jit_compiler_wrapper() -> bool:
    """Put a `g++` first on PATH that adds -march=native to the flags `mx.compile` uses on CPU.

    MLX runs `g++` by name when it builds a kernel, so PATH at that moment decides; the wrapper
    is a two-line shell script written into the cache directory once.
    """
    real = shutil.which("g++")
    if real is None:
        return False
    directory = cache_dir("jit-bin")
    if os.path.realpath(os.path.dirname(real)) == os.path.realpath(directory):
        return True  # already first on PATH (a parent process set it up)
    try:
        os.makedirs(directory, exist_ok=True)
        wrapper = os.path.join(directory, "g++")
        script = f'#!/bin/sh\nexec "{real}" -march=native "$@"\n'
        current = open(wrapper).read() if os.path.exists(wrapper) else None
        if current != script:
            with atomic_file(wrapper, "w", permissions=0o755) as f:
                f.write(script)
    except OSError as exc:
        REPORT.notes.append(f"no -march=native JIT wrapper: {exc}")
        return False
    os.environ["PATH"] = directory + os.pathsep + os.environ.get("PATH", "")
    return True
