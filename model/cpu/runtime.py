"""Make MLX fast on the machine it runs on, before `mlx.core` is imported.

MLX's Linux CPU wheel links a reference BLAS (~5 GFLOP/s fp32). Its `cblas_sgemm` calls resolve
through the global symbol scope, so loading an optimized BLAS with RTLD_GLOBAL *before* libmlx is
loaded makes every matmul 50-100x faster: MKL (from PyPI) on Intel CPUs; on AMD ones Debian's
OpenBLAS with MKL for the 1-row products when both are installed (see `preferred_blas`). That
only works before the first `import mlx.core`, which is why `nanogpt_mlx/__init__.py` calls
`prepare_runtime()` as the very first thing.

Three more process-level settings pay on CPU (measured, see ../shared/README.md):
- flush-to-zero / denormals-are-zero: masked attention scores produce denormals, which are
  ~100x slower to compute with; threads created later (MLX's, MKL's) inherit the setting;
- glibc malloc without mmap for large blocks: MLX allocates every intermediate fresh, and
  mmap/munmap + page faults of >32 MB buffers cost more than the ops themselves;
- `-march=native` for the kernels `mx.compile` builds with g++ (2-3x on fused elementwise code).

Nothing here needs an environment variable from the user. `NANOGPT_MLX_NO_BLAS=1` and
`NANOGPT_MLX_BLAS=openblas+mkl|openblas|mkl` exist so benchmarks can measure the alternatives side
by side.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import mmap
import os
import platform
import shutil
import stat
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field


@dataclass
class RuntimeReport:
    """What `prepare_runtime` did, for `nanogpt-mlx info` and the tests."""

    blas_path: str | None = None
    blas_name: str = "reference (MLX wheel)"
    blas_one_row_path: str | None = None  # with "openblas+mkl": MKL, which serves the 1-row products
    ftz_daz: bool = False
    malloc_tuned: bool = False
    jit_march_native: bool = False
    numpy_blas_quiet: bool = False
    notes: list[str] = field(default_factory=list)


REPORT = RuntimeReport()
_BLAS_HANDLES: dict[str, ctypes.CDLL] = {}  # "mkl" / "openblas": the loaded libraries, for their thread counts
_DISPATCH_HANDLE: ctypes.CDLL | None = None  # the openblas+mkl dispatch library (blas_dispatch)
_PREPARED = False


# Debian's OpenBLAS (`apt-get install libopenblas0-pthread`, or libopenblas0 / libopenblas-dev).
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)


def cpuinfo_field(name: str) -> str:
    """The first value of `name` in /proc/cpuinfo ('vendor_id', 'model name'), or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The x86 vendor string ('GenuineIntel', 'AuthenticAMD'), or ''."""
    return cpuinfo_field("vendor_id")


BLAS_CHOICES = ("openblas+mkl", "openblas", "mkl")


def preferred_blas() -> str:
    """Which BLAS to load: 'openblas+mkl', 'openblas' or 'mkl' (each falls back to what exists).

    MKL on Intel CPUs. On AMD ones, where MKL's kernels are not its best, Debian's OpenBLAS for
    every matmul of two or more rows and MKL for the one-row ones (see blas_dispatch): on the
    2-core AMD EPYC (Zen 3) machine OpenBLAS ran a 32-row decode step in 56-72 against 68-98 ms
    and 32 streaming clients got 291-316 against 241-270 tok/s, MKL a batch-1 step in 17-19
    against 22-24 ms (benchmarks/README.md); on the earlier Intel machine MKL was the faster for
    batch-1 decode. NANOGPT_MLX_BLAS=openblas+mkl|openblas|mkl overrides the choice.
    """
    forced = os.environ.get("NANOGPT_MLX_BLAS", "").strip().lower()
    if forced in BLAS_CHOICES:
        return forced
    return "openblas+mkl" if cpu_vendor() == "AuthenticAMD" else "mkl"


def _mkl_paths() -> list[str]:
    paths: list[str] = []
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, sys.exec_prefix]):
        paths.extend(sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True))
    return paths


def _openblas_paths() -> list[str]:
    return [path for path in OPENBLAS_PATHS if os.path.exists(path)]


def _blas_candidates() -> list[tuple[str, str]]:
    """Single BLAS libraries to try, the preferred kind first: (name, path)."""
    mkl = [("mkl", path) for path in _mkl_paths()]
    openblas = [("openblas", path) for path in _openblas_paths()]
    return mkl + openblas if preferred_blas() == "mkl" else openblas + mkl


def _cache_dir(name: str) -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "nanogpt-mlx", name)


def _load_dispatch() -> bool:
    """MKL for 1-row products, OpenBLAS for the rest (blas_dispatch); False if it cannot be set up."""
    global _DISPATCH_HANDLE
    from nanogpt_mlx.model import blas_dispatch  # plain Python + ctypes: safe before mlx.core

    mkl_paths = _mkl_paths()
    openblas_paths = _openblas_paths()
    if not mkl_paths or not openblas_paths:
        REPORT.notes.append("openblas+mkl needs both Debian's OpenBLAS and MKL; loading one")
        return False
    try:
        library = blas_dispatch.build(_cache_dir("blas-dispatch"))
    except OSError as exc:  # e.g. an unwritable cache directory
        REPORT.notes.append(f"openblas+mkl dispatch not built: {exc}; loading one BLAS")
        return False
    if library is None:
        REPORT.notes.append("openblas+mkl needs a C compiler (cc) to build its dispatch; loading one BLAS")
        return False
    # MKL's idle threads sleep at once instead of spinning for 200 ms while OpenBLAS works (the
    # pools' spinning slowed each other with the NumPy head); openblas+mkl was measured this way.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        mkl = ctypes.CDLL(mkl_paths[0])
        openblas = ctypes.CDLL(openblas_paths[0])
        _DISPATCH_HANDLE = blas_dispatch.install(library, mkl.cblas_sgemm, openblas.cblas_sgemm)
    except (OSError, AttributeError) as exc:
        REPORT.notes.append(f"openblas+mkl dispatch not loaded: {exc}")
        return False
    _BLAS_HANDLES.update(mkl=mkl, openblas=openblas)
    REPORT.blas_name, REPORT.blas_path, REPORT.blas_one_row_path = "openblas+mkl", openblas_paths[0], mkl_paths[0]
    return True


def _load_blas() -> None:
    if os.environ.get("NANOGPT_MLX_NO_BLAS") == "1":
        REPORT.notes.append("optimized BLAS disabled by NANOGPT_MLX_NO_BLAS=1")
        return
    if preferred_blas() == "openblas+mkl" and _load_dispatch():
        return
    for name, path in _blas_candidates():
        try:
            _BLAS_HANDLES[name] = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as exc:
            REPORT.notes.append(f"could not load {path}: {exc}")
            continue
        REPORT.blas_path, REPORT.blas_name = path, name
        return
    warnings.warn(
        "nanogpt-mlx: no optimized BLAS found (pip install mkl); MLX CPU matmuls will use the "
        "reference BLAS and run 50-100x slower.",
        RuntimeWarning,
        stacklevel=3,
    )


def dispatch_calls() -> tuple[int, int] | None:
    """With openblas+mkl: (1-row products sent to MKL, others sent to OpenBLAS) so far."""
    if _DISPATCH_HANDLE is None:
        return None
    from nanogpt_mlx.model import blas_dispatch

    return blas_dispatch.calls(_DISPATCH_HANDLE)


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


_KEEP_ALIVE: list[object] = []


def _tune_malloc() -> bool:
    """Keep large freed blocks in the heap instead of returning them to the OS on every op."""
    if not sys.platform.startswith("linux"):
        return False
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name)
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_mmap_max, 0) == 1
    ok &= libc.mallopt(m_trim_threshold, 1 << 30) == 1
    return bool(ok)


# OpenBLAS waits 2^n cycles before an idle worker thread sleeps; 2^28 (~0.1 s) by default.
OPENBLAS_THREAD_TIMEOUT = "4"


def _quiet_openblas() -> bool:
    """Make OpenBLAS worker threads sleep right after their work instead of spinning; returns
    whether NumPy's will (it loads its own OpenBLAS with `import numpy`).

    On the CPU the LM head runs in NumPy (see ModelRunner), between MLX's matmuls. Both BLAS
    pools keep idle worker threads busy-waiting for a while, and on a 2-core machine each pool's
    spinning slowed the other's work: a 32-row decode step took 150 ms with the NumPy head
    against 95 with MLX's (MKL), and 76 ms once OpenBLAS threads slept at once (MKL's spin could
    stay: KMP_BLOCKTIME=0 changed nothing). OpenBLAS reads the setting when it loads, so it must
    be set before MLX's OpenBLAS (if that is the one chosen) and NumPy's load.
    """
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)
    if "numpy" in sys.modules:
        REPORT.notes.append("numpy was imported before nanogpt_mlx: its BLAS threads keep spinning")
        return False
    return True


def _jit_compiler_wrapper() -> bool:
    """Put a `g++` first on PATH that adds -march=native to the flags `mx.compile` uses on CPU."""
    if not sys.platform.startswith("linux"):
        return False
    real = shutil.which("g++")
    if real is None:
        return False
    cache = _cache_dir("jit-bin")
    if os.path.realpath(os.path.dirname(real)) == os.path.realpath(cache):
        return True  # already first on PATH (a parent process set it up)
    try:
        os.makedirs(cache, exist_ok=True)
        wrapper = os.path.join(cache, "g++")
        script = f'#!/bin/sh\nexec "{real}" -march=native "$@"\n'
        current = open(wrapper).read() if os.path.exists(wrapper) else None
        if current != script:
            fd, tmp = tempfile.mkstemp(dir=cache)
            with os.fdopen(fd, "w") as f:
                f.write(script)
            os.chmod(tmp, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
            os.replace(tmp, wrapper)
    except OSError as exc:
        REPORT.notes.append(f"no -march=native JIT wrapper: {exc}")
        return False
    os.environ["PATH"] = cache + os.pathsep + os.environ.get("PATH", "")
    return True


def prepare_runtime() -> RuntimeReport:
    """Idempotent process setup; must run before the first `import mlx.core` to take effect."""
    global _PREPARED
    if _PREPARED:
        return REPORT
    _PREPARED = True
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
        _load_blas()
        REPORT.ftz_daz = _set_ftz_daz()
        REPORT.malloc_tuned = _tune_malloc()
        REPORT.jit_march_native = _jit_compiler_wrapper()
    return REPORT


def blas_threads() -> int | None:
    """Threads the optimized BLAS will use (with openblas+mkl: OpenBLAS's); None if none is loaded."""
    try:
        counts = _thread_counts()
    except AttributeError:
        return None
    return counts.get("openblas", counts.get("mkl"))


def _thread_counts() -> dict[str, int]:
    counts = {}
    if "mkl" in _BLAS_HANDLES:
        counts["mkl"] = int(_BLAS_HANDLES["mkl"].MKL_Get_Max_Threads())
    if "openblas" in _BLAS_HANDLES:
        counts["openblas"] = int(_BLAS_HANDLES["openblas"].openblas_get_num_threads())
    return counts


def _set_thread_counts(counts: dict[str, int]) -> None:
    if "mkl" in counts:
        _BLAS_HANDLES["mkl"].MKL_Set_Num_Threads(ctypes.c_int(counts["mkl"]))
    if "openblas" in counts:
        _BLAS_HANDLES["openblas"].openblas_set_num_threads(ctypes.c_int(counts["openblas"]))


@contextlib.contextmanager
def single_threaded_blas():
    """Make the optimized BLAS use one thread per call for the duration (yields whether it could).

    For work split over several MLX CPU streams (see cpu_streams): each stream's matmuls then run
    on their own core, where two streams of matmuls each asking MKL for every core would
    oversubscribe them (measured 4 % slower than one stream, against 19 % faster with one
    thread each; benchmarks/README.md). MKL and OpenBLAS can be told (both, with openblas+mkl);
    without them this yields False. Process-wide, so only for code that owns the process's MLX
    work while it runs (the engine).
    """
    try:
        previous = _thread_counts()
    except AttributeError:
        previous = {}
    if not previous:
        yield False
        return
    _set_thread_counts({name: 1 for name in previous})
    try:
        yield True
    finally:
        _set_thread_counts(previous)


def loaded_blas_libraries() -> list[str]:
    """Shared objects mapped into this process whose name says BLAS, read from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    except OSError:
        return []
    return sorted(p for p in paths if any(k in os.path.basename(p) for k in ("mkl", "blas")))


def select_device(name: str = "auto") -> str:
    """Use the GPU (Metal or CUDA) when asked for and present; 'auto' prefers it. Returns 'gpu' or 'cpu'."""
    import mlx.core as mx

    if name not in ("auto", "cpu", "gpu"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or gpu")
    has_gpu = mx.is_available(mx.gpu) if hasattr(mx, "is_available") else mx.metal.is_available()
    if name == "gpu" and not has_gpu:
        raise RuntimeError("--device gpu: no Metal or CUDA device is available to MLX on this machine")
    use_gpu = has_gpu and name != "cpu"
    mx.set_default_device(mx.gpu if use_gpu else mx.cpu)
    return "gpu" if use_gpu else "cpu"


def measure_gflops(n: int = 1024, repeats: int = 5) -> float:
    """fp32 matmul GFLOP/s on the default device: best of a few n x n x n products."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
