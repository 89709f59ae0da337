"""The fast CPU runtime (model/cpu/: runtime.py, blas.py), checked deterministically, never by timing.

Each check runs in a fresh subprocess, because what `prepare_runtime` does depends on what the
process imported first. `import nanogpt_mlx` only loads the BLAS, quiets BLAS threads and sets
FTZ/DAZ; malloc and the JIT wrapper wait until the model first computes on the CPU.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_mlx.model.cpu import blas, runtime

from conftest import cli_env

LINUX_X86 = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
# MKL is a dependency on Linux x86-64, so there its absence is a failure, not a reason to skip.
needs_mkl = pytest.mark.skipif(not LINUX_X86, reason="MKL from PyPI is only installed on Linux x86-64")

# Imports the package, runs a matmul, then reports what is mapped and what prepare_runtime did;
# then asks for the CPU's ops (what the model does first) and reports what that changed.
PROBE = r"""
import json, os, sys, warnings
warnings.simplefilter("always")
{before}
path_before = os.environ["PATH"]
import nanogpt_mlx
import mlx.core as mx
import numpy as np
from nanogpt_mlx.model.cpu import blas, runtime
a = mx.random.normal((256, 256))
mx.eval(a @ a)
with open("/proc/self/maps") as f:
    mapped = sorted({{line.split()[-1] for line in f if len(line.split()) >= 6}})
r = runtime.REPORT
cache = os.environ.get("XDG_CACHE_HOME")
at_import = {{
    "path_unchanged": os.environ["PATH"] == path_before, "malloc_tuned": r.malloc_tuned,
    "jit": r.jit_march_native, "cache_files": sorted(os.listdir(cache)) if cache and os.path.isdir(cache) else [],
}}
from nanogpt_mlx.model import ops
ops.current()
print(json.dumps({{
    "mapped": mapped, "at_import": at_import,
    "blas_name": r.blas_name, "blas_path": r.blas_path, "ftz_daz": r.ftz_daz,
    "malloc_tuned": r.malloc_tuned, "jit": r.jit_march_native, "notes": r.notes,
    "loaded_blas": blas.loaded_libraries(),
    "threads": blas.threads(),
    "blas_one_row_path": r.blas_one_row_path,
    "numpy_denormal": float(np.float32(1e-38) * np.float32(1e-3)),
    "mlx_denormal": (mx.array([1e-38]) * 1e-3).item(),
    "path0": os.environ["PATH"].split(os.pathsep)[0],
    "numpy_blas_quiet": r.numpy_blas_quiet,
    "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
}}))
"""


def probe(before: str = "", **env: str) -> tuple[dict, str]:
    child_env = cli_env(**env)
    child_env.pop("OPENBLAS_THREAD_TIMEOUT", None)  # this process's import of nanogpt_mlx set it
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)],
        capture_output=True, text=True, env=child_env, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def names(paths: list[str]) -> list[str]:
    return [os.path.basename(p) for p in paths]


def mkl_mapped(mapped: list[str]) -> list[str]:
    return [n for n in names(mapped) if n.startswith("libmkl_")]


@pytest.fixture(scope="module")
def default_probe(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k not in ("NANOGPT_MLX_NO_BLAS", "NANOGPT_MLX_BLAS", "OPENBLAS_THREAD_TIMEOUT")}
    env["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))  # to see what is written, and when
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(before="")],
        capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def debian_openblas_mapped(mapped: list[str]) -> list[str]:
    return [p for p in mapped if p.startswith("/usr/lib/") and "libopenblas" in os.path.basename(p)]


def installed_openblas() -> str | None:
    return next((p for p in blas.OPENBLAS_PATHS if os.path.exists(p)), None)


def dispatch_mapped(mapped: list[str]) -> list[str]:
    return [p for p in mapped if os.path.basename(p).startswith("_blas_dispatch.")]


# The dispatch library is built by `pip install` (setup.py) wherever a C compiler is: with one
# here, a missing library is a failed install, not a reason to skip.
dispatch_expected = installed_openblas() is not None and (blas.dispatch_library() is not None or shutil.which("cc") is not None)


@needs_mkl
def test_default_blas_follows_the_cpu_vendor(default_probe):
    """On AMD CPUs OpenBLAS with MKL for 1-row products when Debian's OpenBLAS is installed
    (.ci/run installs it) and the dispatch library was built at install; on Intel CPUs MKL."""
    report, stderr = default_probe
    if blas.cpu_vendor() == "AuthenticAMD" and dispatch_expected:
        assert report["blas_name"] == "openblas+mkl" and report["blas_path"] == installed_openblas()
        assert "libmkl_rt.so" in report["blas_one_row_path"]
        assert debian_openblas_mapped(report["mapped"]) and mkl_mapped(report["mapped"])
        assert dispatch_mapped(report["mapped"]) == [blas.dispatch_library()]
    else:
        assert report["blas_name"] == "mkl" and "libmkl_rt.so" in report["blas_path"]
        assert debian_openblas_mapped(report["mapped"]) == [] and dispatch_mapped(report["mapped"]) == []
    assert report["threads"] and report["threads"] >= 1
    assert "no optimized BLAS" not in stderr


DISPATCH_PROBE = r"""
import json
import nanogpt_mlx
import mlx.core as mx
import numpy as np
from nanogpt_mlx.model.cpu import blas, runtime
rng = np.random.default_rng(0)
w = rng.standard_normal((384, 1000)).astype(np.float32)
counts = [blas.dispatch_calls()]
errors = []
for rows in (1, 1, 32, 2):
    x = rng.standard_normal((rows, 384)).astype(np.float32)
    errors.append(float(np.abs(np.array(mx.array(x) @ mx.array(w)) - x @ w).max()))
    counts.append(blas.dispatch_calls())
with blas.single_threaded() as limited:
    inside = blas.thread_counts()
print(json.dumps({"name": runtime.REPORT.blas_name, "counts": counts, "errors": errors,
                  "limited": limited, "inside": inside, "after": blas.thread_counts()}))
"""


@needs_mkl
@pytest.mark.skipif(not dispatch_expected, reason="needs Debian's libopenblas0-pthread (.ci/run installs it) and a C compiler at install")
def test_openblas_plus_mkl_sends_one_row_products_to_mkl(tmp_path):
    assert blas.dispatch_library(), "the dispatch library was not built: reinstall (pip install -e .) with a C compiler"
    env = cli_env(NANOGPT_MLX_BLAS="openblas+mkl", XDG_CACHE_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", DISPATCH_PROBE], capture_output=True, text=True,
                          env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["name"] == "openblas+mkl"
    assert list(tmp_path.iterdir()) == []  # nothing compiled or cached at import
    # each product went to exactly one side: 1 row to MKL, 32 and 2 rows to OpenBLAS
    deltas = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(r["counts"], r["counts"][1:])]
    assert deltas == [(1, 0), (1, 0), (0, 1), (0, 1)], r["counts"]
    assert max(r["errors"]) < 1e-3
    assert r["limited"] and r["inside"] == {"mkl": 1, "openblas": 1}
    assert set(r["after"]) == {"mkl", "openblas"} and all(n >= 1 for n in r["after"].values())
    if (os.cpu_count() or 1) > 1:
        assert r["after"] != r["inside"]  # restored


# Hides the installed dispatch library, as if `pip install` had found no C compiler.
HIDE_DISPATCH = r"""
class HideDispatch:
    def find_spec(self, name, path=None, target=None):
        if name.endswith("._blas_dispatch"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, HideDispatch())
"""


@needs_mkl
@pytest.mark.skipif(installed_openblas() is None, reason="needs Debian's libopenblas0-pthread (.ci/run installs it)")
def test_openblas_plus_mkl_without_its_dispatch_library_loads_openblas_alone(tmp_path):
    report, stderr = probe(before=HIDE_DISPATCH, NANOGPT_MLX_BLAS="openblas+mkl", XDG_CACHE_HOME=str(tmp_path))
    assert report["blas_name"] == "openblas" and dispatch_mapped(report["mapped"]) == []
    assert debian_openblas_mapped(report["mapped"]) and mkl_mapped(report["mapped"]) == []
    assert any("needs its dispatch library" in n for n in report["notes"])
    assert "no optimized BLAS" not in stderr


@needs_mkl
def test_mkl_and_its_compute_kernels_are_mapped():
    report, stderr = probe(NANOGPT_MLX_BLAS="mkl")
    mkl = mkl_mapped(report["mapped"])
    assert any(re.fullmatch(r"libmkl_rt\.so\.\d+", n) for n in mkl), mkl
    assert any(n.startswith("libmkl_core.so") for n in mkl), mkl
    # the kernels a matmul actually ran: a CPU-specific compute library and a threading layer
    assert any(re.match(r"libmkl_(def|mc3|avx2|avx512|avx10)\.so", n) for n in mkl), mkl
    assert any(re.match(r"libmkl_(intel_thread|gnu_thread|sequential|tbb_thread)\.so", n) for n in mkl), mkl
    assert report["blas_name"] == "mkl" and "libmkl_rt.so" in report["blas_path"]
    assert any("libmkl_rt" in p for p in report["loaded_blas"])
    assert report["threads"] and report["threads"] >= 1
    assert debian_openblas_mapped(report["mapped"]) == []
    assert "no optimized BLAS" not in stderr


@pytest.mark.skipif(installed_openblas() is None, reason="Debian's libopenblas0-pthread is not installed (.ci/run installs it)")
def test_openblas_when_asked_and_its_threads_can_be_set():
    report, stderr = probe(NANOGPT_MLX_BLAS="openblas")
    assert report["blas_name"] == "openblas" and report["blas_path"] == installed_openblas()
    assert debian_openblas_mapped(report["mapped"]) and mkl_mapped(report["mapped"]) == []
    assert dispatch_mapped(report["mapped"]) == []
    assert report["threads"] and report["threads"] >= 1
    assert "no optimized BLAS" not in stderr


@needs_mkl
def test_no_blas_switch_keeps_mkl_out():
    report, _ = probe(NANOGPT_MLX_NO_BLAS="1")
    assert mkl_mapped(report["mapped"]) == [] and debian_openblas_mapped(report["mapped"]) == []
    assert report["blas_name"].startswith("reference") and report["blas_path"] is None
    assert any("NANOGPT_MLX_NO_BLAS" in n for n in report["notes"])


@needs_mkl
def test_importing_mlx_first_warns_and_cannot_load_blas():
    report, stderr = probe(before="import mlx.core")
    assert "RuntimeWarning" in stderr and "import nanogpt_mlx before mlx.core" in stderr
    assert mkl_mapped(report["mapped"]) == []
    assert any("mlx.core was imported before" in n for n in report["notes"])


@pytest.mark.skipif(not LINUX_X86, reason="FTZ/DAZ is set through MXCSR on x86-64")
def test_flush_to_zero_is_on(default_probe):
    report, _ = default_probe
    assert report["ftz_daz"] is True
    # a product that would be denormal comes out as zero, in NumPy and in MLX
    assert report["numpy_denormal"] == 0.0 and report["mlx_denormal"] == 0.0
    product = "import numpy as np; print(float(np.float32(1e-38) * np.float32(1e-3)))"
    plain = subprocess.run([sys.executable, "-c", product], capture_output=True, text=True)
    assert float(plain.stdout) != 0.0  # without nanogpt_mlx the same product is a denormal


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc / g++ JIT are Linux-only")
def test_malloc_and_jit_wrapper_wait_for_cpu_compute(default_probe):
    report, _ = default_probe
    at_import = report["at_import"]
    assert at_import == {"path_unchanged": True, "malloc_tuned": False, "jit": False, "cache_files": []}
    assert report["malloc_tuned"] is True  # once the CPU's ops were asked for
    if report["jit"]:
        wrapper = Path(report["path0"]) / "g++"
        text = wrapper.read_text()
        assert "-march=native" in text and os.access(wrapper, os.X_OK)
    else:
        import shutil

        assert shutil.which("g++") is None  # only skipped when there is no compiler at all


def test_numpy_blas_threads_are_told_to_sleep_when_idle(default_probe):
    report, _ = default_probe
    if not sys.platform.startswith("linux"):
        pytest.skip("set on Linux only")
    assert report["numpy_blas_quiet"] is True
    assert report["openblas_thread_timeout"] == runtime.OPENBLAS_THREAD_TIMEOUT


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="set on Linux only")
def test_numpy_imported_first_keeps_its_blas_threads_and_says_so():
    report, _ = probe(before="import numpy")
    assert report["numpy_blas_quiet"] is False  # too late for NumPy's, in time for MLX's OpenBLAS
    assert report["openblas_thread_timeout"] == runtime.OPENBLAS_THREAD_TIMEOUT
    assert any("numpy was imported before nanogpt_mlx" in n for n in report["notes"])


def test_select_device():
    import mlx.core as mx

    from nanogpt_mlx.model.device import select_device

    assert select_device("cpu") == "cpu"
    with pytest.raises(ValueError):
        select_device("tpu")
    has_gpu = mx.is_available(mx.gpu)
    if not has_gpu:
        with pytest.raises(RuntimeError, match="no Metal or CUDA"):
            select_device("gpu")
    assert select_device("auto") == ("gpu" if has_gpu else "cpu")
    mx.set_default_device(mx.cpu)


def test_prepare_runtime_and_prepare_compute_are_idempotent():
    assert runtime.prepare_runtime() is runtime.REPORT
    assert runtime.prepare_runtime() is runtime.REPORT
    assert runtime.prepare_compute() is runtime.REPORT and runtime.REPORT.compute_prepared
    path = os.environ["PATH"]
    assert runtime.prepare_compute() is runtime.REPORT
    assert os.environ["PATH"] == path  # the JIT wrapper goes on PATH once


@needs_mkl
def test_single_threaded_blas_holds_the_blas_to_one_thread_and_restores_it():
    """In this process, whichever BLAS was chosen (MKL or OpenBLAS)."""
    before = blas.threads()
    assert before is not None, runtime.REPORT
    with blas.single_threaded() as limited:
        assert limited and blas.threads() == 1
    assert blas.threads() == before
    with pytest.raises(KeyError):
        with blas.single_threaded():
            raise KeyError("restored on errors too")
    assert blas.threads() == before


@needs_mkl
def test_info_prints_mkl_and_gflops(run_cli):
    proc = run_cli("info", env=cli_env(NANOGPT_MLX_BLAS="mkl"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^blas: mkl \(.*libmkl_rt\.so.*\)$", out, re.M), out
    assert re.search(r"^blas threads: \d+$", out, re.M), out
    assert re.search(r"^device: (cpu|gpu)$", out, re.M), out
    assert re.search(r"^nanogpt-mlx \d+\.\d+\.\d+ +mlx \d+\.\d+", out, re.M), out
    assert "ftz/daz=on" in out
    m = re.search(r"fp32 matmul .*: ([\d.]+) GFLOP/s", out)
    assert m and float(m.group(1)) > 0, out


@needs_mkl
def test_info_without_blas(run_cli):
    proc = run_cli("info", env=cli_env(NANOGPT_MLX_NO_BLAS="1"))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^blas: reference", proc.stdout, re.M), proc.stdout
    assert "GFLOP/s" in proc.stdout


def test_importing_the_package_loads_neither_mlx_nor_numpy(tmp_path):
    """`import nanogpt_mlx` must run before `mlx.core` loads, so it cannot load it itself; and it
    compiles and writes nothing (model/cpu/README.md lists what it does)."""
    code = "import sys, nanogpt_mlx; print(sorted(m for m in ('mlx.core', 'numpy') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=cli_env(XDG_CACHE_HOME=str(tmp_path)), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert list(tmp_path.iterdir()) == []
