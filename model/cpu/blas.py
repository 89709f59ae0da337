"""A tiny C library that sends MLX's one-row matmuls to MKL and all the others to OpenBLAS.

MLX calls `cblas_sgemm` from the global symbol scope, so one library serves every fp32 matmul.
On the 2-core AMD EPYC (Zen 3) machine neither BLAS is best everywhere: MKL runs the 1-row
products of a batch-1 decode step quicker (the step 17-19 against 22-24 ms with OpenBLAS), Debian's
OpenBLAS everything larger (a 32-row step 56-72 against 68-98 ms, a 32 x 45-token prefill and
1024^3 products too). This library exports `cblas_sgemm`, forwarding by the row count M; both
BLAS libraries are loaded privately (RTLD_LOCAL) and handed in as function pointers. Measured
with both in one process: 1 row 16.5-18.5 ms, 32 rows 59-60 ms (benchmarks/README.md).

It is compiled once with the system C compiler into the user's cache directory (keyed by a hash of
the source, written to a temporary file and renamed into place); without a compiler `build`
returns None and the caller loads one BLAS as before. `calls()` counts the forwarded products per
side, so tests can see the dispatch work.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

SOURCE = r"""
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
static sgemm_fn one_row_sgemm, other_sgemm;
unsigned long long nanogpt_mlx_sgemm_calls[2];

void nanogpt_mlx_set_sgemm(void *one_row, void *other) {
    one_row_sgemm = (sgemm_fn)one_row;
    other_sgemm = (sgemm_fn)other;
}

void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    int side = m == 1 ? 0 : 1;
    __atomic_fetch_add(&nanogpt_mlx_sgemm_calls[side], 1, __ATOMIC_RELAXED);
    (side == 0 ? one_row_sgemm : other_sgemm)(layout, trans_a, trans_b, m, n, k, alpha, a, lda,
                                              b, ldb, beta, c, ldc);
}
"""


def _compiler() -> list[str] | None:
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    path = shutil.which("g++")
    return [path, "-x", "c"] if path else None


def build(cache_dir: str) -> str | None:
    """Path of the compiled library (compiling it if needed), or None without a C compiler."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, f"libnanogpt_blas_dispatch-{digest}.so")
    if os.path.exists(target):
        return target
    compiler = _compiler()
    if compiler is None:
        return None
    os.makedirs(cache_dir, exist_ok=True)
    fd, source_path = tempfile.mkstemp(suffix=".c", dir=cache_dir)
    with os.fdopen(fd, "w") as f:
        f.write(SOURCE)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        subprocess.run([*compiler, "-O2", "-shared", "-fPIC", "-o", tmp, source_path],
                       check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError):
        if os.path.exists(tmp):
            os.unlink(tmp)
        return None
    finally:
        os.unlink(source_path)
    return target


def install(library: str, one_row_sgemm: ctypes._CFuncPtr, other_sgemm: ctypes._CFuncPtr) -> ctypes.CDLL:
    """Load the library into the global symbol scope and point it at the two `cblas_sgemm`s."""
    handle = ctypes.CDLL(library, mode=os.RTLD_GLOBAL)
    handle.nanogpt_mlx_set_sgemm(ctypes.cast(one_row_sgemm, ctypes.c_void_p), ctypes.cast(other_sgemm, ctypes.c_void_p))
    return handle


def calls(handle: ctypes.CDLL) -> tuple[int, int]:
    """(one-row products sent to MKL, other products sent to OpenBLAS) so far."""
    counts = (ctypes.c_ulonglong * 2).in_dll(handle, "nanogpt_mlx_sgemm_calls")
    return int(counts[0]), int(counts[1])
