"""nanogpt-mlx: a 53M GPT-2-style model in MLX, its OpenAI-compatible server, and its training code.

The folders `model/`, `server/`, `training/` and `benchmarks/` are installed as
`nanogpt_mlx.model`, `nanogpt_mlx.server`, ... (see pyproject.toml). Importing any of them runs
this file first, which does what must happen before `mlx.core` loads: an optimized BLAS, quiet
BLAS threads, FTZ/DAZ (model/cpu/runtime.py; the exact list is in model/cpu/README.md).
"""

from nanogpt_mlx.model.cpu.runtime import prepare_runtime

__version__ = "0.1.0"

prepare_runtime()
