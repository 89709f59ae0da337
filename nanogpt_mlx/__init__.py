"""nanogpt-mlx: a 53M GPT-2-style model in MLX, its OpenAI-compatible server, and its training code.

The folders `model/`, `server/`, `training/` and `benchmarks/` are installed as
`nanogpt_mlx.model`, `nanogpt_mlx.server`, ... (see pyproject.toml). Importing any of them runs
this file first, which prepares the process (optimized BLAS, FTZ/DAZ, malloc) before MLX loads.
"""

from nanogpt_mlx.model.backend import prepare_runtime

__version__ = "0.1.0"

prepare_runtime()
