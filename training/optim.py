"""AdamW with the card's schedule: linear warm-up, then cosine decay to a floor.

Weight decay applies to matrices only (embeddings, attention and MLP weights, the LM head),
not to biases and LayerNorm gains, as in GPT-2 / nanoGPT: decaying a LayerNorm gain toward 0
only fights the normalisation. Both groups share one schedule.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim

from nanogpt_mlx.training.recipe import OptimSection


def lr_schedule(o: OptimSection, max_steps: int):
    """Step -> learning rate: 0 -> lr over `warmup_steps`, then cosine lr -> min_lr."""
    decay_steps = o.decay_steps or max(max_steps - o.warmup_steps, 1)
    cosine = optim.cosine_decay(o.lr, decay_steps, o.min_lr)
    if o.warmup_steps == 0:
        return cosine
    # Warm-up starts at lr / warmup rather than 0 so the very first step already moves.
    warmup = optim.linear_schedule(o.lr / o.warmup_steps, o.lr, o.warmup_steps)
    return optim.join_schedules([warmup, cosine], [o.warmup_steps])


def _no_decay(path: str, weight: mx.array) -> bool:
    return weight.ndim < 2


def build_optimizer(o: OptimSection, max_steps: int) -> optim.Optimizer:
    schedule = lr_schedule(o, max_steps)
    common = dict(learning_rate=schedule, betas=[o.beta1, o.beta2], eps=o.eps, bias_correction=True)
    return optim.MultiOptimizer(
        [optim.AdamW(weight_decay=0.0, **common), optim.AdamW(weight_decay=o.weight_decay, **common)],
        [_no_decay],
    )


def current_lr(optimizer: optim.Optimizer) -> float:
    return float(optimizer.learning_rate.item())
