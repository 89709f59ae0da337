"""Training throughput: tok/s of the real compiled train step and peak memory.

    python -m nanogpt_mlx.benchmarks.train_speed                 # the card's shape, 12 x 512
    python -m nanogpt_mlx.benchmarks.train_speed --batch 24 --seq-len 256 --steps 5

Runs the exact step `nanogpt-mlx train` runs (forward, backward, AdamW, clipping; compiled),
on random tokens with the card's architecture, after `--warmup` untimed steps (the first call
compiles). Reports the median step time, tok/s = batch x seq_len / median, and
`mx.get_peak_memory()`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import nanogpt_mlx  # noqa: F401  (sets up the fast CPU runtime before mlx.core is imported)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.gpt import GPT
from nanogpt_mlx.training.optim import build_optimizer
from nanogpt_mlx.training.recipe import OptimSection
from nanogpt_mlx.training.train import default_loss


def measure(batch: int, seq_len: int, steps: int, warmup: int, grad_accum: int = 1, config: ModelConfig | None = None) -> dict:
    config = config or ModelConfig()
    model = GPT(config)
    model.init_weights(seed=0)
    optimizer = build_optimizer(OptimSection(warmup_steps=10), max_steps=1000)
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    def step(x, y):
        loss, grads = loss_and_grad(model, x, y)
        grads, norm = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return loss, norm

    step = mx.compile(step, inputs=state, outputs=state)
    micro_grads = mx.compile(lambda x, y: loss_and_grad(model, x, y), inputs=[model.state], outputs=[model.state])

    def apply(grads):
        grads, norm = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        return norm

    apply = mx.compile(apply, inputs=state, outputs=state)

    def one_step():
        if grad_accum == 1:
            x = mx.random.randint(0, config.vocab_size, (batch, seq_len))
            y = mx.random.randint(0, config.vocab_size, (batch, seq_len))
            out = step(x, y)
            mx.eval(out, model.state, optimizer.state)
            return
        acc = None
        for _ in range(grad_accum):
            x = mx.random.randint(0, config.vocab_size, (batch, seq_len))
            y = mx.random.randint(0, config.vocab_size, (batch, seq_len))
            _, grads = micro_grads(x, y)
            acc = grads if acc is None else tree_map(mx.add, acc, grads)
            mx.eval(acc)
        mx.eval(apply(tree_map(lambda g: g / grad_accum, acc)), model.state, optimizer.state)

    for _ in range(warmup):
        one_step()
    mx.reset_peak_memory()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens = batch * seq_len * grad_accum
    return {
        "batch": batch,
        "seq_len": seq_len,
        "grad_accum": grad_accum,
        "params": model.num_params(),
        "step_s_median": round(median, 3),
        "step_s_min": round(min(times), 3),
        "step_s_all": times,
        "tok_per_s": round(tokens / median, 1),
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 2),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.batch, args.seq_len, args.steps, args.warmup, args.grad_accum)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
