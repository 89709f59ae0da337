"""The machine a benchmark ran on, so every figure carries its context (hosts are shared and noisy).

`machine_id()` is a stable slug naming the results folder, `benchmarks/results/<machine-id>/`:
the CPU model, the core count and the widest vector extension, e.g. `amd-epyc-2c-avx512`
(plus `-gpu` for runs on Metal / CUDA). `describe_machine()` is the full description stored
beside every result.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from importlib import metadata

# Library versions worth recording beside a figure (those installed; the rest are left out).
LIBRARIES = ("nanogpt-mlx", "mlx", "mlx-metal", "mlx-cuda", "mlx-lm", "numpy", "mkl", "torch", "transformers", "gguf", "uvicorn", "fastapi")

# CPU flags that decide the speed of fp32 matmuls and elementwise code here.
VECTOR_FLAGS = (
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_vnni",
    "amx_tile",
    "amx_bf16",
    "neon",
    "asimd",
    "sve",
)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none, e.g. macOS)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def cpu_model() -> str:
    info = _cpuinfo()
    return (
        info.get("model name")
        or (_sysctl("machdep.cpu.brand_string") if sys.platform == "darwin" else "")
        or platform.processor()
        or platform.machine()
    )


def cpu_flags() -> list[str]:
    """The vector extensions of VECTOR_FLAGS this CPU has."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    if sys.platform == "darwin" and platform.machine() == "arm64":
        flags.update({"neon", "asimd"})
    return [f for f in VECTOR_FLAGS if f in flags]


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        value = _sysctl("hw.memsize")
        return int(value) if value.isdigit() else None


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def widest_vector_extension(flags: list[str]) -> str:
    for name, label in (("amx_tile", "amx"), ("avx512f", "avx512"), ("avx2", "avx2"), ("avx", "avx"), ("sve", "sve"), ("neon", "neon")):
        if name in flags:
            return label
    return platform.machine().lower()


def machine_id(device: str = "cpu") -> str:
    """A stable slug for the results folder: CPU model, cores, widest vector extension (+ device)."""
    model = cpu_model().lower()
    model = re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", model)
    model = re.sub(r"[^a-z0-9]+", "-", model).strip("-") or platform.machine().lower()
    slug = f"{model}-{os.cpu_count()}c-{widest_vector_extension(cpu_flags())}"
    return slug + ("-gpu" if device == "gpu" else "")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def git_state() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True
        ).stdout.strip()
        return rev + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe_machine() -> dict:
    """CPU, cores, flags, memory, MLX version and device, BLAS, library versions, load average now."""
    import mlx.core as mx

    from nanogpt_mlx.benchmarks.internals import blas_description

    blas = blas_description()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "memory_gb": round(memory_bytes() / 2**30, 1) if memory_bytes() else None,
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": blas["name"],
        "blas_threads": blas["threads"],
        "blas_details": blas,
        "libraries": library_versions(),
        "load_average": load_average(),
        "git": git_state(),
    }
