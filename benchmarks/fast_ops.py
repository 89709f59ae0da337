"""Side by side: MLX's native softmax / cross-entropy / GELU vs the polynomial ones of model/fast_ops.py.

Both variants are compiled in ONE process and timed alternately, so the ratio survives a noisy,
shared machine. Reports wall and process-CPU time of a full training step (forward, backward,
AdamW) at the given batch shape, plus the ops alone.

    python -m nanogpt_mlx.benchmarks.fast_ops --batch 4 --seq 512 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import nanogpt_mlx  # noqa: F401  (prepares the CPU runtime before MLX loads)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from nanogpt_mlx.benchmarks.machine import describe_machine
from nanogpt_mlx.model import fast_ops
from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.gpt import GPT


def make_step(fast: bool, config: ModelConfig, seed: int = 0):
    """A compiled train step whose ops are chosen (traced) with fast ops on or off."""
    fast_ops.set_fast_ops(fast)
    mx.random.seed(seed)
    model = GPT(config)
    optimizer = optim.AdamW(3e-4, weight_decay=0.1)
    state = [model.state, optimizer.state]
    loss_and_grad = nn.value_and_grad(model, lambda x, y: model.loss(x, y))

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = loss_and_grad(x, y)
        optimizer.update(model, grads)
        return loss

    return step, state


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanogpt-mlx bench fast-ops", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    config = ModelConfig(n_layer=args.layers)
    x = mx.random.randint(0, config.vocab_size, (args.batch, args.seq))
    y = mx.random.randint(0, config.vocab_size, (args.batch, args.seq))
    steps = {}
    for fast in (True, False):
        step, state = make_step(fast, config)
        mx.eval(step(x, y), state)  # compile + warm up, traced with this setting
        steps["fast" if fast else "native"] = (step, state)
    fast_ops.set_fast_ops(True)

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, (step, state) in steps.items():
            times[name].append(timed(lambda: mx.eval(step(x, y), state)))

    tokens = args.batch * args.seq
    result = {"machine": describe_machine(), "batch": args.batch, "seq": args.seq, "layers": args.layers}
    print(f"train step {args.batch}x{args.seq}, {args.layers} layers, {args.rounds} alternating rounds (median)")
    for name, samples in times.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        result[name] = {"wall_s": wall, "cpu_s": cpu, "tok_per_s": tokens / wall}
        print(f"  {name:7s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  {tokens / wall:7.0f} tok/s")
    ratio = result["native"]["wall_s"] / result["fast"]["wall_s"]
    result["speedup_wall"] = ratio
    print(f"  fast ops speed-up (wall): {ratio:.2f}x   cpu: {result['native']['cpu_s'] / result['fast']['cpu_s']:.2f}x")
    print(f"machine: {result['machine']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
