"""What makes MLX fast on a CPU: BLAS loading, process settings, CPU streams, tuned ops.

Entered through two seams: `runtime.prepare_runtime()` (run by `import nanogpt_mlx`, before
`mlx.core` loads) and `ops.CpuOps` (what `nanogpt_mlx.model.ops.current()` returns on the CPU).
See README.md here. This file imports nothing: `import nanogpt_mlx` passes through it before
`mlx.core` may load.
"""
