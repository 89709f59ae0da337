"""Side by side: the training step with the written-out softmax / cross-entropy / GELU of
model/cpu/fast_ops.py, and with MLX's native ops.

Each measurement is the real trainer's compiled step (`train_speed.measure`: forward, backward,
clipping, AdamW) in a fresh process, the two variants alternating round by round so the ratio
survives a noisy, shared machine. (Two variants traced in one process disagreed with this, the
real configuration, so each gets its own process.)

    python -m nanogpt_mlx.benchmarks.fast_ops --batch 12 --seq 512 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from nanogpt_mlx.benchmarks.machine import cpu_model, git_state


def worker(fast: bool, batch: int, seq: int, steps: int) -> dict:
    import nanogpt_mlx  # noqa: F401  (prepares the CPU runtime before MLX loads)
    # isort: split
    from nanogpt_mlx.benchmarks.train_speed import measure
    from nanogpt_mlx.model.cpu import fast_ops

    fast_ops.set_fast_ops(fast)
    return measure(batch, seq, steps=steps, warmup=1)


def run_worker(fast: bool, args) -> dict:
    cmd = [sys.executable, "-m", "nanogpt_mlx.benchmarks.fast_ops", "--worker", "fast" if fast else "native",
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanogpt-mlx bench fast-ops", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, alternating")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=["fast", "native"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker == "fast", args.batch, args.seq, args.steps)))
        return 0

    runs: dict[str, list[dict]] = {"fast": [], "native": []}
    for _ in range(args.rounds):
        for name in ("fast", "native"):
            runs[name].append(run_worker(name == "fast", args))
    tokens = args.batch * args.seq
    result = {"machine": cpu_model(), "git": git_state(), "batch": args.batch, "seq": args.seq, "runs": runs}
    print(f"train step {args.batch}x{args.seq} (real trainer step), {args.rounds} alternating processes each")
    for name, samples in runs.items():
        step = statistics.median(s["step_s_median"] for s in samples)
        result[name] = {"step_s": step, "tok_per_s": tokens / step, "peak_memory_gb": max(s["peak_memory_gb"] for s in samples)}
        print(f"  {name:7s} {step:6.2f} s/step  {tokens / step:6.0f} tok/s  peak {result[name]['peak_memory_gb']:.2f} GB")
    result["speedup"] = result["native"]["step_s"] / result["fast"]["step_s"]
    print(f"  written-out ops speed-up: {result['speedup']:.2f}x   ({cpu_model()}, git {git_state()})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
