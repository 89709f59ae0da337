"""Batched decode step side by side: the C host step or MLX, where MLX's LM head runs and which BLAS it uses, 1-32 rows.

    python -m nanogpt_mlx.benchmarks.decode_step                  # 3 rounds, ~2 minutes
    python -m nanogpt_mlx.benchmarks.decode_step --rows 8 32 --position 400 --rounds 5
    python -m nanogpt_mlx.benchmarks.decode_step --blas mkl openblas --settings numpy-head

A benchmark, not a test. Random weights of the card's full shape, fp32, on the CPU. One decode
step is `ModelRunner.decode` for B rows at cache position --position: the compiled MLX step plus
the LM head (B x 384 x 50,257), logits as row-major NumPy, exactly what the server's engine calls
once per token. Four settings, each in its own subprocess (NumPy's BLAS reads its thread
settings when it loads), in alternating order each round, so a noisy machine hits all alike:

- host-step:         the default on the CPU: the whole step in C (model/cpu/host_decode.py) up to
                     its rows, MLX beyond;
- numpy-head:        the MLX step (`host_decode=False`) with the LM head in NumPy's OpenBLAS, whose idle worker
                     threads sleep at once (model/cpu/runtime.py);
- numpy-head-spin:   the same with OpenBLAS's default idle wait (OPENBLAS_THREAD_TIMEOUT=28), to
                     show what the setting is for;
- mlx-head:          the head as an MLX matmul (`hidden @ head`), `host_logits=False`.

Each setting runs with each BLAS of --blas (MLX's matmuls: `auto` = what nanogpt-mlx picks on
this CPU, or `openblas+mkl` / `openblas` / `mkl` forced through NANOGPT_MLX_BLAS). Reports the
median step time per setting and row count, and ratios to the first column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "host-step": {"host_logits": True, "host_decode": True, "env": {}},
    "numpy-head": {"host_logits": True, "host_decode": False, "env": {}},
    "numpy-head-spin": {"host_logits": True, "host_decode": False, "env": {"OPENBLAS_THREAD_TIMEOUT": "28"}},
    "mlx-head": {"host_logits": False, "host_decode": False, "env": {}},
}


def worker(setting: str, rows: list[int], position: int, steps: int) -> dict:
    import nanogpt_mlx  # noqa: F401  (before mlx.core and numpy: BLAS, thread settings)
    # isort: split
    import mlx.core as mx
    import numpy as np

    from nanogpt_mlx.model.config import ModelConfig
    from nanogpt_mlx.model.gpt import GPT
    from nanogpt_mlx.model.runner import ModelRunner

    mx.random.seed(0)
    model = GPT(ModelConfig())
    model.eval()
    mx.eval(model.parameters())
    chosen = SETTINGS[setting]
    runner = ModelRunner(model, max_rows=max(rows), host_logits=chosen["host_logits"], host_decode=chosen["host_decode"])
    medians = {}
    for B in rows:
        tokens = np.arange(B, dtype=np.int32)
        positions = np.full(B, position, dtype=np.int32)
        for _ in range(2):  # trace and warm up this shape
            runner.decode(tokens, positions)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            runner.decode(tokens, positions)
            times.append(time.perf_counter() - start)
        medians[B] = 1e3 * statistics.median(times)
    runner.close()
    return medians


def run_worker(blas: str, setting: str, args) -> dict[int, float]:
    env = {**os.environ, **SETTINGS[setting]["env"]}
    if not SETTINGS[setting]["env"]:
        env.pop("OPENBLAS_THREAD_TIMEOUT", None)
    env.pop("NANOGPT_MLX_BLAS", None)
    if blas != "auto":
        env["NANOGPT_MLX_BLAS"] = blas
    cmd = [sys.executable, "-m", "nanogpt_mlx.benchmarks.decode_step", "--worker", setting,
           "--rows", *map(str, args.rows), "--position", str(args.position), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {setting} failed:\n{proc.stderr}")
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 12, 16, 24, 32])
    p.add_argument("--position", type=int, default=100, help="cache position of every row (context bucket: next multiple of 64)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per row count; the median is reported")
    p.add_argument("--rounds", type=int, default=3, help="subprocesses per setting, in alternating order")
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    p.add_argument(
        "--blas", nargs="+", choices=["auto", "openblas+mkl", "openblas", "mkl"], default=["auto"], help="BLAS for MLX's matmuls"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.position, args.steps)))
        return 0

    from nanogpt_mlx.benchmarks.machine import describe_machine

    machine = describe_machine()
    columns = [(blas, setting) for blas in args.blas for setting in args.settings]
    names = [f"{blas}/{setting}" if len(args.blas) > 1 else setting for blas, setting in columns]
    results: dict[str, list[dict[int, float]]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = list(zip(columns, names)) if r % 2 == 0 else list(zip(columns, names))[::-1]
        for (blas, setting), name in order:
            results[name].append(run_worker(blas, setting, args))
    medians = {name: {B: statistics.median(run[B] for run in runs) for B in args.rows} for name, runs in results.items()}

    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['system']}, mlx {machine['mlx']}, "
        f"auto BLAS {machine['blas']} ({machine['blas_threads']} threads), load avg {machine['load_average']}, {machine['git']}"
    )
    print(f"decode step, position {args.position}: median ms over {args.rounds} rounds x {args.steps} steps")
    print("rows | " + " | ".join(names) + (f" | ratios to {names[0]}" if len(names) > 1 else ""))
    for B in args.rows:
        line = f"{B:4d} | " + " | ".join(f"{medians[n][B]:.1f}" for n in names)
        if len(names) > 1:
            base = medians[names[0]][B]
            line += " | " + " ".join(f"{n}={medians[n][B] / base:.2f}" for n in names[1:])
        print(line)
    if args.json:
        print(json.dumps({"machine": machine, "args": vars(args), "rounds": results, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
