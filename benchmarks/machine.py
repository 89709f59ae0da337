"""The machine a benchmark ran on, so every figure carries its context (this host is shared and noisy)."""

from __future__ import annotations

import os
import platform
import subprocess

from nanogpt_mlx.model.cpu.blas import cpuinfo_field


def cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def git_state() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True).stdout.strip()
        return rev + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def describe_machine() -> dict:
    """CPU, cores, MLX version and device, BLAS, and the load average at the start of the run."""
    import mlx.core as mx

    from nanogpt_mlx.model.cpu import blas, runtime

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "blas": runtime.REPORT.blas_name,
        "blas_threads": blas.threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git": git_state(),
    }
