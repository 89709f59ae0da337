"""Batch-1 decode, prefill and forward speed, with and without the optimized BLAS, side by side.

    python benchmarks/decode_speed.py                 # both paths, default sizes
    python benchmarks/decode_speed.py --runs 7 --stock-forward

A benchmark, not a test. Random weights of the card's full shape (52,990,464 parameters), fp32,
on the device MLX picks (or --device). The quantities are the model card's, defined the same way:

- decode: a 50-token prompt, then 100 greedy tokens at batch 1 with `generate_tokens` (KV cache);
  tok/s = new tokens / wall time including the prefill (what `nanogpt-mlx generate --stats` shows);
  median over --runs runs after one warm-up;
- forward 8x512: one `model(tokens)` pass over 8 x 512 random tokens with full logits;
  tok/s = 4096 / mean time, latency mean / p95 / p99 over --forward-runs passes (the card's pass had
  dropout on; ours runs in inference mode);
- prefill 1x512: `ModelRunner.prefill` of 512 tokens into the KV cache, logits at the last
  position only (what the server's engine does with a prompt); tok/s = 512 / median time.

Each path runs in its own subprocess, because the BLAS can only be chosen before `mlx.core` loads:
the stock path gets NANOGPT_MLX_NO_BLAS=1. The stock path is 7-50x slower, so by default it decodes
fewer tokens (--stock-tokens, 20) with fewer runs and skips the 8x512 forward (~1 minute a pass);
the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata

from nanogpt_mlx.benchmarks.machine import cpu_model, git_state

PROMPT_TOKENS = 50


# --- worker: runs in a subprocess with the runtime chosen by its environment -------------------------
def worker(args) -> dict:
    import nanogpt_mlx  # noqa: F401  (before mlx.core: BLAS, FTZ/DAZ, malloc)
    # isort: split
    import mlx.core as mx
    import numpy as np

    from nanogpt_mlx.model.config import ModelConfig
    from nanogpt_mlx.model.cpu import blas, runtime
    from nanogpt_mlx.model.device import measure_gflops, select_device
    from nanogpt_mlx.model.generate import generate_tokens
    from nanogpt_mlx.model.gpt import GPT
    from nanogpt_mlx.model.runner import ModelRunner
    from nanogpt_mlx.model.sampling import SamplingParams

    device = select_device(args.device)
    mx.random.seed(0)
    model = GPT(ModelConfig())
    model.eval()
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 50257, PROMPT_TOKENS).tolist()
    greedy = SamplingParams(temperature=0.0)
    result = {
        "device": device,
        "blas": runtime.REPORT.blas_name,
        "blas_path": runtime.REPORT.blas_path,
        "blas_threads": blas.threads(),
        "params": model.num_params(),
        "gflops": measure_gflops(),
    }

    # batch-1 decode: 50-token prompt + N greedy tokens
    def decode_once(n: int) -> float:
        start = time.perf_counter()
        produced = sum(1 for _ in generate_tokens(model, prompt, n, greedy))
        elapsed = time.perf_counter() - start
        assert produced == n, f"generation stopped early ({produced} of {n})"
        return n / elapsed

    decode_once(min(args.tokens, 20))  # warm-up
    rates = [decode_once(args.tokens) for _ in range(args.runs)]
    result["decode"] = {"tokens": args.tokens, "runs": args.runs, "median": statistics.median(rates), "all": rates}

    # 1x512 prefill, last-position logits
    if args.prefill_runs:
        tokens = rng.integers(0, 50257, 512).astype(np.int32)
        runner = ModelRunner(model, max_rows=1)  # what the server's engine prefills with

        def prefill_once() -> float:
            start = time.perf_counter()
            runner.prefill(0, tokens, 0)  # returns the last position's logits as NumPy
            return time.perf_counter() - start

        prefill_once()
        times = [prefill_once() for _ in range(args.prefill_runs)]
        result["prefill"] = {"runs": args.prefill_runs, "tok_s": 512 / statistics.median(times), "median_s": statistics.median(times)}

    # 8x512 forward, full logits
    if args.forward_runs:
        tokens = mx.array(rng.integers(0, 50257, (8, 512)).astype(np.int32))

        def forward_once() -> float:
            start = time.perf_counter()
            mx.eval(model(tokens))
            return time.perf_counter() - start

        forward_once()
        times = sorted(forward_once() for _ in range(args.forward_runs))
        mean = statistics.fmean(times)
        result["forward"] = {
            "runs": args.forward_runs,
            "tok_s": 8 * 512 / mean,
            "mean_ms": 1e3 * mean,
            "p95_ms": 1e3 * float(np.percentile(times, 95)),
            "p99_ms": 1e3 * float(np.percentile(times, 99)),
        }
    return result


# --- driver -----------------------------------------------------------------------------------------
def run_worker(no_blas: bool, worker_args: list[str]) -> dict:
    env = dict(os.environ)
    env.pop("NANOGPT_MLX_NO_BLAS", None)
    if no_blas:
        env["NANOGPT_MLX_NO_BLAS"] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *worker_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({'stock' if no_blas else 'optimized'} BLAS):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def runs_text(n: int) -> str:
    return "1 run" if n == 1 else f"median of {n}"


def fmt_decode(r: dict) -> str:
    d = r["decode"]
    return f"{d['median']:.1f} tok/s  ({PROMPT_TOKENS}+{d['tokens']}, {runs_text(d['runs'])})"


def fmt_prefill(r: dict) -> str:
    p = r.get("prefill")
    return f"{p['tok_s']:.0f} tok/s  ({p['median_s'] * 1e3:.0f} ms, {runs_text(p['runs'])})" if p else "skipped"


def fmt_forward(r: dict) -> tuple[str, str]:
    f = r.get("forward")
    if not f:
        return "skipped", "skipped"
    return f"{f['tok_s']:.0f} tok/s  ({f['runs']} passes)", f"{f['mean_ms']:.0f} / {f['p95_ms']:.0f} / {f['p99_ms']:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=100, help="greedy tokens after the 50-token prompt (card: 100)")
    p.add_argument("--runs", type=int, default=5, help="decode runs; the median is reported")
    p.add_argument("--prefill-runs", type=int, default=5)
    p.add_argument("--forward-runs", type=int, default=10, help="8x512 forward passes for mean/p95/p99")
    p.add_argument("--stock-tokens", type=int, default=20, help="decode tokens on the slow stock-BLAS path")
    p.add_argument("--stock-runs", type=int, default=2)
    p.add_argument("--stock-forward", action="store_true", help="also run one 8x512 forward on the stock path (~1 min)")
    p.add_argument("--no-stock", action="store_true", help="skip the stock-BLAS path")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    common = ["--device", args.device]
    fast = run_worker(False, [*common, "--tokens", str(args.tokens), "--runs", str(args.runs),
                              "--prefill-runs", str(args.prefill_runs), "--forward-runs", str(args.forward_runs)])
    stock = None
    if not args.no_stock:
        stock = run_worker(True, [*common, "--tokens", str(args.stock_tokens), "--runs", str(args.stock_runs),
                                  "--prefill-runs", "1", "--forward-runs", "1" if args.stock_forward else "0"])

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, load avg {load}")
    versions = f"python {platform.python_version()}, mlx {metadata.version('mlx')}, nanogpt-mlx {metadata.version('nanogpt-mlx')}"
    print(f"software: {versions} at {git_state()}")
    print(f"model: random weights, {fast['params']:,} parameters, fp32, device {fast['device']}")
    print()
    cols = [("", "optimized BLAS"), ("", "stock (NANOGPT_MLX_NO_BLAS=1)")]
    blas_fast = f"{fast['blas']} ({os.path.basename(fast['blas_path'] or '')}, {fast['blas_threads']} threads)"
    rows = [
        ("BLAS", blas_fast, stock["blas"] if stock else "skipped"),
        ("fp32 matmul 1024^3", f"{fast['gflops']:.1f} GFLOP/s", f"{stock['gflops']:.1f} GFLOP/s" if stock else "skipped"),
        ("decode, batch 1 (greedy)", fmt_decode(fast), fmt_decode(stock) if stock else "skipped"),
        ("prefill 1x512 (last logits)", fmt_prefill(fast), fmt_prefill(stock) if stock else "skipped"),
        ("forward 8x512 (full logits)", fmt_forward(fast)[0], fmt_forward(stock)[0] if stock else "skipped"),
        ("  latency mean / p95 / p99", fmt_forward(fast)[1], fmt_forward(stock)[1] if stock else "skipped"),
    ]
    widths = [max(len(r[i]) for r in rows + [("", cols[0][1], cols[1][1])]) for i in range(3)]
    header = ("", cols[0][1], cols[1][1])
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if stock:
        print()
        print(
            f"The stock path decodes {args.stock_tokens} tokens ({runs_text(args.stock_runs)}), not {args.tokens}, because it is slow;"
            " its prefill and forward figures come from one pass each."
            + ("" if args.stock_forward else " Its 8x512 forward is skipped (--stock-forward runs one pass).")
        )
    if args.json:
        print(json.dumps({"optimized": fast, "stock": stock}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
