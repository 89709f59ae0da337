"""Which BLAS serves MLX's CPU matmuls, loaded before `mlx.core`, and how many threads it uses.

MLX's Linux CPU wheel links a reference BLAS (~5 GFLOP/s fp32). Its `cblas_sgemm` calls resolve
through the global symbol scope, so loading an optimized BLAS with RTLD_GLOBAL *before* libmlx is
loaded makes every matmul 50-100x faster: MKL (from PyPI) on Intel CPUs; on AMD ones Debian's
OpenBLAS, with MKL for the one-row products when both are there (`preferred_blas`). Loading it
after `mlx.core` has no effect, which is why `runtime.prepare_runtime` calls `load` first thing.

With "openblas+mkl" the library that exports `cblas_sgemm` is `_blas_dispatch`, compiled from
blas_dispatch.c by `pip install` (setup.py): it forwards each product to one of the two BLAS
libraries, both loaded privately (RTLD_LOCAL). Nothing here compiles anything.

Plain Python and ctypes only: this module is imported before `mlx.core` and NumPy.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import os
import sys
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanogpt_mlx.model.cpu.runtime import RuntimeReport

CHOICES = ("openblas+mkl", "openblas", "mkl")

# Debian's OpenBLAS (`apt-get install libopenblas0-pthread`, or libopenblas0 / libopenblas-dev).
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
)

# The compiled dispatch library (setup.py); a shared library in this package, not a Python module.
DISPATCH_MODULE = "nanogpt_mlx.model.cpu._blas_dispatch"

_handles: dict[str, ctypes.CDLL] = {}  # "mkl" / "openblas": the loaded libraries, for their thread counts
_dispatch: ctypes.CDLL | None = None  # the dispatch library, with "openblas+mkl"


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


def preferred_blas() -> str:
    """Which BLAS to load: 'openblas+mkl', 'openblas' or 'mkl' (each falls back to what exists).

    MKL on Intel CPUs. On AMD ones, where MKL's kernels are not its best, Debian's OpenBLAS for
    every matmul of two or more rows and MKL for the one-row ones: OpenBLAS ran batched decode
    steps and prefills quicker there, MKL the batch-1 step (measured in benchmarks/README.md).
    NANOGPT_MLX_BLAS=openblas+mkl|openblas|mkl overrides the choice.
    """
    forced = os.environ.get("NANOGPT_MLX_BLAS", "").strip().lower()
    if forced in CHOICES:
        return forced
    return "openblas+mkl" if cpu_vendor() == "AuthenticAMD" else "mkl"


def mkl_paths() -> list[str]:
    """MKL's single dynamic library from PyPI (`pip install mkl`), newest first; it finds its siblings itself."""
    paths: list[str] = []
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, sys.exec_prefix]):
        paths.extend(sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")), reverse=True))
    return paths


def openblas_paths() -> list[str]:
    return [path for path in OPENBLAS_PATHS if os.path.exists(path)]


def dispatch_library() -> str | None:
    """Path of the installed dispatch library, or None when it was not built (no C compiler at install)."""
    try:
        spec = importlib.util.find_spec(DISPATCH_MODULE)
    except ImportError:
        return None
    return spec.origin if spec is not None and spec.origin and os.path.exists(spec.origin) else None


def _load_dispatch(report: RuntimeReport) -> bool:
    """MKL for 1-row products, OpenBLAS for the rest; False if that cannot be set up."""
    global _dispatch
    mkl, openblas = mkl_paths(), openblas_paths()
    if not mkl or not openblas:
        report.notes.append("openblas+mkl needs both Debian's OpenBLAS and MKL; loading one")
        return False
    library = dispatch_library()
    if library is None:
        report.notes.append("openblas+mkl needs its dispatch library, built by `pip install` with a C compiler; loading one BLAS")
        return False
    # MKL's idle threads sleep at once instead of spinning while OpenBLAS works: the two pools'
    # spinning slowed each other down (benchmarks/README.md). MKL reads this when it loads.
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        mkl_lib = ctypes.CDLL(mkl[0])
        openblas_lib = ctypes.CDLL(openblas[0])
        handle = ctypes.CDLL(library, mode=os.RTLD_GLOBAL)
        one_row, other = (ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p) for lib in (mkl_lib, openblas_lib))
        handle.nanogpt_mlx_set_sgemm(one_row, other)
    except (OSError, AttributeError) as exc:
        report.notes.append(f"openblas+mkl dispatch not loaded: {exc}")
        return False
    _dispatch = handle
    _handles.update(mkl=mkl_lib, openblas=openblas_lib)
    report.blas_name, report.blas_path, report.blas_one_row_path = "openblas+mkl", openblas[0], mkl[0]
    return True


def load(report: RuntimeReport) -> None:
    """Load the preferred optimized BLAS into the global symbol scope; say what was done in `report`."""
    if os.environ.get("NANOGPT_MLX_NO_BLAS") == "1":
        report.notes.append("optimized BLAS disabled by NANOGPT_MLX_NO_BLAS=1")
        return
    preferred = preferred_blas()
    if preferred == "openblas+mkl" and _load_dispatch(report):
        return
    mkl = [("mkl", path) for path in mkl_paths()]
    openblas = [("openblas", path) for path in openblas_paths()]
    for name, path in mkl + openblas if preferred == "mkl" else openblas + mkl:
        try:
            _handles[name] = ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
        except OSError as exc:
            report.notes.append(f"could not load {path}: {exc}")
            continue
        report.blas_path, report.blas_name = path, name
        return
    warnings.warn(
        "nanogpt-mlx: no optimized BLAS found (pip install mkl); MLX CPU matmuls will use the "
        "reference BLAS and run 50-100x slower.",
        RuntimeWarning,
        stacklevel=3,
    )


def dispatch_calls() -> tuple[int, int] | None:
    """With openblas+mkl: (1-row products sent to MKL, others sent to OpenBLAS) so far."""
    if _dispatch is None:
        return None
    counts = (ctypes.c_ulonglong * 2).in_dll(_dispatch, "nanogpt_mlx_sgemm_calls")
    return int(counts[0]), int(counts[1])


def thread_counts() -> dict[str, int]:
    """Threads each loaded optimized BLAS uses per call: {'mkl': n, 'openblas': m} (either or both, or none)."""
    counts = {}
    with contextlib.suppress(AttributeError):
        if "mkl" in _handles:
            counts["mkl"] = int(_handles["mkl"].MKL_Get_Max_Threads())
        if "openblas" in _handles:
            counts["openblas"] = int(_handles["openblas"].openblas_get_num_threads())
    return counts


def _set_thread_counts(counts: dict[str, int]) -> None:
    if "mkl" in counts:
        _handles["mkl"].MKL_Set_Num_Threads(ctypes.c_int(counts["mkl"]))
    if "openblas" in counts:
        _handles["openblas"].openblas_set_num_threads(ctypes.c_int(counts["openblas"]))


def threads() -> int | None:
    """Threads the optimized BLAS uses (with openblas+mkl: OpenBLAS's); None if none is loaded."""
    counts = thread_counts()
    return counts.get("openblas", counts.get("mkl"))


@contextlib.contextmanager
def single_threaded():
    """Make the optimized BLAS use one thread per call for the duration (yields whether it could).

    For work split over several MLX CPU streams (see streams.py): each stream's matmuls then run
    on their own core, where two streams of matmuls each asking the BLAS for every core would
    oversubscribe them (measured in benchmarks/README.md). MKL and OpenBLAS can be told (both,
    with openblas+mkl); without them this yields False. Process-wide, so only for code that owns
    the process's MLX work while it runs (the engine's thread).
    """
    previous = thread_counts()
    if not previous:
        yield False
        return
    _set_thread_counts({name: 1 for name in previous})
    try:
        yield True
    finally:
        _set_thread_counts(previous)


def loaded_libraries() -> list[str]:
    """Shared objects mapped into this process whose name says BLAS, read from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    except OSError:
        return []
    return sorted(p for p in paths if any(k in os.path.basename(p) for k in ("mkl", "blas")))
