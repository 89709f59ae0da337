"""`nanogpt-mlx bench NAME [ARGS...]`: run one of the benchmark scripts of this folder.

Each benchmark keeps its own flags (`nanogpt-mlx bench serve --help`); this only dispatches, so
`python -m nanogpt_mlx.benchmarks.serve_load ...` and `nanogpt-mlx bench serve ...` are the same.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "decode": ("decode_speed", "batch-1 decode, 1x512 prefill, 8x512 forward; MKL vs stock BLAS"),
    "step": ("decode_step", "batched decode step at 1-32 rows: the LM head in NumPy vs in MLX, side by side"),
    "serve": ("serve_load", "streaming load on `nanogpt-mlx serve`: tok/s, TTFT, ITL at several concurrencies"),
    "train": ("train_speed", "training-step tok/s and peak memory"),
    "fast-ops": ("fast_ops", "native vs polynomial softmax/cross-entropy/GELU in a training step, side by side"),
    "metrics-overhead": ("metrics_overhead", "server throughput with and without Prometheus metrics"),
    "structured": ("structured_mask", "structured output's token-mask cost at 1 and 32 rows: llguidance, xgrammar, outlines-core"),
}


def register_cli(subparsers) -> None:
    lines = "\n".join(f"  {name:17s} {text}" for name, (_, text) in BENCHMARKS.items())
    p = subparsers.add_parser(
        "bench",
        help="run a benchmark (decode, step, serve, train, fast-ops, metrics-overhead, structured)",
        description=f"Run a benchmark; every argument after NAME goes to it.\n\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags (see NAME --help)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    module = importlib.import_module(f"nanogpt_mlx.benchmarks.{BENCHMARKS[args.name][0]}")
    return int(module.main(args.args) or 0)
