"""`ModelRunner`: the model plus one preallocated KV cache, driven with NumPy in and out.

This is the whole interface a serving engine needs: put a prompt (or a chunk of it) into a cache
row, advance many rows by one token in a single batched step, and move a row to keep the
running rows contiguous. Everything about speed on a given device (bucketing shapes, compiled
graphs) belongs here, so the engine stays free of MLX details.

Invariant the caller keeps: `decode` advances rows 0..B-1, so those B rows must be the running
sequences; rows at B and above may hold prompts being prefilled and are left untouched.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from nanogpt_mlx.model.generate import context_for
from nanogpt_mlx.model.gpt import GPT, KVCache


class ModelRunner:
    def __init__(self, model: GPT, max_rows: int, max_len: int | None = None):
        self.model = model
        self.max_rows = max_rows
        self.max_len = max_len or model.config.block_size
        self.cache = KVCache(model.config, rows=max_rows, max_len=self.max_len)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def prefill(self, row: int, tokens: list[int] | np.ndarray, start: int, all_logits: bool = False) -> np.ndarray:
        """Write `tokens` into cache row `row` at positions start.. and return logits.

        Returns the last position's logits (vocab,), or every position's (T, vocab) when
        `all_logits` (prompt logprobs / echo). Only computing the last position saves the
        LM head over the whole chunk (~40% of a prefill's matmul time).
        """
        T = len(tokens)
        if T == 0:
            raise ValueError("prefill needs at least one token")
        if start + T > self.max_len:
            raise ValueError(f"positions {start}..{start + T - 1} exceed the cache length {self.max_len}")
        hidden = self.model.forward_cached(
            mx.array(np.asarray(tokens, dtype=np.int32)[None, :]),
            mx.array([start], dtype=mx.int32),
            self.cache,
            context_for(start + T, self.max_len),
            row_start=row,
        )
        logits = self.model.logits(hidden[0] if all_logits else hidden[0, -1])
        return np.array(logits, dtype=np.float32)

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One step for rows 0..B-1: token b goes to position positions[b]. Returns (B, vocab) logits."""
        B = len(tokens)
        if B == 0 or B > self.max_rows:
            raise ValueError(f"decode needs 1..{self.max_rows} rows, got {B}")
        longest = int(np.max(positions)) + 1
        if longest > self.max_len:
            raise ValueError(f"position {longest - 1} exceeds the cache length {self.max_len}")
        hidden = self.model.forward_cached(
            mx.array(np.asarray(tokens, dtype=np.int32)[:, None]),
            mx.array(np.asarray(positions, dtype=np.int32)),
            self.cache,
            context_for(longest, self.max_len),
        )
        return np.array(self.model.logits(hidden[:, 0]), dtype=np.float32)

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s cache into row `dst` (the caller then treats `src` as free)."""
        if src != dst:
            self.cache.copy_row(src, dst)
            mx.eval(self.cache.state())
