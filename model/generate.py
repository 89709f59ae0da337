"""Batch-1 generation with the KV cache: the engine behind `nanogpt-mlx generate` and the benchmarks.

The server's engine batches many sequences; this is the simplest correct loop for one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np

from nanogpt_mlx.model.gpt import GPT
from nanogpt_mlx.model.runner import ModelRunner
from nanogpt_mlx.model.sampling import SamplingParams, choose_token


def generate_tokens(
    model: GPT,
    prompt: list[int],
    max_tokens: int,
    params: SamplingParams | None = None,
    stop_tokens: frozenset[int] = frozenset(),
    prefill_chunk: int = 512,
) -> Iterator[int]:
    """Yield up to `max_tokens` new tokens after `prompt` (stops early at a stop token, yielded)."""
    params = params or SamplingParams(temperature=0.0)
    block = model.config.block_size
    if not prompt:
        raise ValueError("the prompt must hold at least one token")
    if len(prompt) + max_tokens > block:
        raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the context of {block}")
    runner = ModelRunner(model, max_rows=1, max_len=block)  # compiled decode step, one cache row
    rng = params.make_rng()
    counts: Counter[int] = Counter()

    logits = None
    for begin in range(0, len(prompt), prefill_chunk):
        logits = runner.prefill(0, prompt[begin : begin + prefill_chunk], begin)
    length = len(prompt)
    for _ in range(max_tokens):
        token = choose_token(logits, params, rng, counts)
        counts[token] += 1
        yield token
        if token in stop_tokens:
            return
        length += 1
        if length >= block:
            return
        logits = runner.decode(np.array([token], dtype=np.int32), np.array([length - 1], dtype=np.int32))[0]
