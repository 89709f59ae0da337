"""The one place the benchmarks reach into the model's CPU runtime (BLAS loading, device choice).

Everything else the benchmarks use from the model is its public surface (`GPT`, `ModelConfig`,
`ModelRunner`, `generate_tokens`, checkpoints, the tokenizer). The runtime module may move; only
this file names it.
"""

from __future__ import annotations

import os

import nanogpt_mlx  # noqa: F401  (prepares the runtime before mlx.core loads)

# isort: split
from nanogpt_mlx.model import device
from nanogpt_mlx.model.cpu import blas, runtime


def blas_description() -> dict:
    """What `import nanogpt_mlx` loaded for MLX's matmuls (as `nanogpt-mlx info` shows it)."""
    report = runtime.REPORT
    return {
        "name": report.blas_name,
        "path": report.blas_path,
        "one_row_path": report.blas_one_row_path,
        "threads": blas.threads(),
        "ftz_daz": report.ftz_daz,
        "malloc_tuned": report.malloc_tuned,
        "jit_march_native": report.jit_march_native,
        "notes": list(report.notes),
        "libraries": [os.path.basename(p) for p in blas.loaded_libraries()],
    }


def select_device(name: str) -> str:
    """'cpu' or 'gpu' (Metal / CUDA); raises RuntimeError for `gpu` where there is none."""
    return device.select_device(name)
