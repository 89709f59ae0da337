"""`nanogpt-mlx bench [NAME] [ARGS...]`: the suite, its report, the llama-server build, or one benchmark script.

Without NAME (or with `suite`) it runs the suite (suite.py), whose flags the `bench` parser itself
knows, so `nanogpt-mlx bench --smoke --out DIR` works. Every other NAME only dispatches: its
flags go to that script, so `python -m nanogpt_mlx.benchmarks.serve_load ...` and
`nanogpt-mlx bench serve ...` are the same.
"""

from __future__ import annotations

import argparse
import importlib

COMMANDS = {
    "suite": ("suite", "the whole suite (the default): card's table, engine, server, peers, limits -> benchmarks/results/<machine-id>/"),
    "report": ("report", "redo report.md and plots from a results.json; --update-readme rewrites README.md's generated section"),
    "build-llama-server": ("llama_cpp", "build llama.cpp's llama-server once into ~/.cache/nanogpt-mlx/llama.cpp/ (the suite's peer)"),
}
BENCHMARKS = {
    "decode": ("decode_speed", "batch-1 decode, 1x512 prefill, 8x512 forward; MKL vs stock BLAS"),
    "step": ("decode_step", "batched decode step at 1-32 rows: the LM head in NumPy vs in MLX, side by side"),
    "serve": ("serve_load", "streaming load on `nanogpt-mlx serve`: tok/s, TTFT, ITL at several concurrencies"),
    "train": ("train_speed", "training-step tok/s and peak memory"),
    "fast-ops": ("fast_ops", "native vs polynomial softmax/cross-entropy/GELU in a training step, side by side"),
    "metrics-overhead": ("metrics_overhead", "server throughput with and without Prometheus metrics"),
    "prefix-cache": ("prefix_cache", "prefix caching on vs off: TTFT and throughput on lm-eval-like, multi-turn chat and unique prompts"),
    "generate": ("generate_vs_llama", "batch-1 generation (50-token prompt, 100 greedy tokens) against llama.cpp on the same weights"),
    "structured": ("structured_mask", "structured output's token-mask cost at 1 and 32 rows: llguidance, xgrammar, outlines-core"),
}


def register_cli(subparsers) -> None:
    from nanogpt_mlx.benchmarks.suite import add_arguments

    lines = "\n".join(f"  {name:19s} {text}" for name, (_, text) in {**COMMANDS, **BENCHMARKS}.items())
    p = subparsers.add_parser(
        "bench",
        help="benchmarks: the suite (default), its report, the llama-server build, or one script",
        description=f"Run the benchmark suite, or NAME with its own flags (NAME --help).\n\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", choices=sorted({**COMMANDS, **BENCHMARKS}), metavar="NAME", help="default: suite")
    p.add_argument("args", nargs=argparse.REMAINDER, help="NAME's own flags (see NAME --help)")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if args.name is None:
        from nanogpt_mlx.benchmarks.suite import run_suite

        out = run_suite(args)
        print(f"wrote {out}/results.json, report.md and plots")
        return 0
    module_name = (COMMANDS.get(args.name) or BENCHMARKS[args.name])[0]
    module = importlib.import_module(f"nanogpt_mlx.benchmarks.{module_name}")
    return int(module.main(args.args) or 0)
