"""Batch-1 generation with the KV cache: the engine behind `nanogpt-mlx generate` and the benchmarks.

The server's engine batches many sequences; this is the simplest correct loop for one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from nanogpt_mlx.model.gpt import GPT, KVCache
from nanogpt_mlx.model.sampling import SamplingParams, choose_token

CONTEXT_BUCKET = 64  # attend over cache columns rounded up to this: few distinct shapes


def context_for(length: int, max_len: int) -> int:
    """Cache columns to attend over for a sequence of `length` tokens."""
    return min(max_len, -(-length // CONTEXT_BUCKET) * CONTEXT_BUCKET)


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
    cache = KVCache(model.config, rows=1, max_len=block)
    rng = params.make_rng()
    counts: Counter[int] = Counter()

    hidden = None
    for begin in range(0, len(prompt), prefill_chunk):
        chunk = prompt[begin : begin + prefill_chunk]
        hidden = model.forward_cached(
            mx.array(np.asarray([chunk], dtype=np.int32)), mx.array([begin]), cache, context_for(begin + len(chunk), block)
        )
    length = len(prompt)
    for _ in range(max_tokens):
        logits = np.array(model.logits(hidden[:, -1]), dtype=np.float32)[0]  # only the last position
        token = choose_token(logits, params, rng, counts)
        counts[token] += 1
        yield token
        if token in stop_tokens:
            return
        length += 1
        if length >= block:
            return
        hidden = model.forward_cached(mx.array([[token]]), mx.array([length - 1]), cache, context_for(length, block))
