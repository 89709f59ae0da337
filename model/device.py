"""Which device MLX computes on, and how fast it multiplies matrices there."""

from __future__ import annotations

import time


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
