"""`ModelRunner`: the model plus one preallocated KV cache, driven with NumPy in and out.

This is the whole interface a serving engine needs (`Runner`): put a prompt (or a chunk of it)
into a cache row, advance many rows by one token in a single batched step, move a row to keep
the running rows contiguous, and copy a row's first positions (prefix caching). Everything
about speed on a given device (bucketing shapes, compiled graphs, the device's ops for the LM
head and batched prefills) belongs here or in ops.py, so the engine stays free of MLX details.

Invariant the caller keeps: `decode` advances rows 0..B-1, so those B rows must be the running
sequences; rows at B and above may hold prompts being prefilled (or cached prefixes) and are
left untouched.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol, runtime_checkable

import mlx.core as mx
import numpy as np

from nanogpt_mlx.model import ops
from nanogpt_mlx.model.cpu import streams as cpu_streams
from nanogpt_mlx.model.gpt import GPT
from nanogpt_mlx.model.kv_cache import CacheView, KVCache

CONTEXT_BUCKET = 64  # attend over cache columns rounded up to this: few distinct shapes


def context_for(length: int, max_len: int) -> int:
    """Cache columns to attend over for a sequence of `length` tokens."""
    return min(max_len, -(-length // CONTEXT_BUCKET) * CONTEXT_BUCKET)


PAD_WASTE = 0.5  # batched prefill may compute up to 50% padding on top of the real tokens


@dataclass
class PrefillChunk:
    """Prompt tokens to write into cache row `row` at positions start, start+1, ..."""

    row: int
    tokens: list[int] | np.ndarray
    start: int = 0
    all_logits: bool = False  # every position's logits (prompt logprobs), not just the last


def _group_by_length(chunks: list[PrefillChunk]) -> list[list[int]]:
    """Indices of `chunks` grouped so each group's padded size <= (1 + PAD_WASTE) x its tokens."""
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].tokens))
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        n = len(chunks[i].tokens)
        # sorted ascending, so n is the group's longest if i joins it
        if current and n * (len(current) + 1) > (1 + PAD_WASTE) * (real + n):
            groups.append(current)
            current, real = [], 0
        current.append(i)
        real += n
    if current:
        groups.append(current)
    return groups


@runtime_checkable
class Runner(Protocol):
    """What a serving engine drives: NumPy token ids in, float32 NumPy logits out."""

    max_rows: int  # cache rows: sequences that can be held at once
    max_len: int  # positions per row

    @property
    def vocab_size(self) -> int: ...

    def prefill(self, row: int, tokens: list[int] | np.ndarray, start: int, all_logits: bool = False) -> np.ndarray:
        """Write `tokens` into cache row `row` at positions start..; the last position's logits (V,), or all (T, V)."""
        ...

    def prefill_many(self, chunks: list[PrefillChunk]) -> list[np.ndarray]:
        """Several rows' chunks at once; per chunk, in order, what `prefill` would return."""
        ...

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token for each of rows 0..B-1, token b at position positions[b]; (B, V) logits."""
        ...

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s cache into row `dst` (the caller then treats `src` as free)."""
        ...

    def warm_up(self, rows: int, prefill_tokens: int) -> None:
        """Before serving: run the largest steps a caller with `rows` rows and prefill forwards of
        `prefill_tokens` tokens will ask for, and a small one. Leaves no row holding anything a
        caller relies on (every row is prefilled before it is decoded)."""
        ...

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy positions 0..length-1 of row `src` into row `dst` (prefix caching); `src` is left as it was."""
        ...

    def close(self) -> None:
        """Release per-thread resources; call from the thread that ran the runner, before it ends."""
        ...


# id(model) -> {context bucket: compiled decode step}. Keyed by the model so runners created
# per call (`generate_tokens`) reuse the traced graphs; dropped when the model is collected.
_COMPILED_DECODE_STEPS: dict[int, dict[int, Callable]] = {}


def _decode_step_fn(model_ref: weakref.ref, context: int, tokens, positions, keys, values):
    model = model_ref()  # a weak reference: the compiled-step cache must not keep the model alive
    cache = KVCache.wrap(list(keys), list(values))
    hidden = model.hidden(tokens, CacheView.block(cache, positions, 1, context))
    return hidden[:, 0], cache.keys, cache.values


class ModelRunner:
    """A `Runner` over one `GPT` and one `KVCache` of `max_rows` rows."""

    def __init__(
        self,
        model: GPT,
        max_rows: int,
        max_len: int | None = None,
        compile: bool = True,
        host_logits: bool | None = None,
        host_decode: bool = True,
    ):
        self.model = model
        self.max_rows = max_rows
        self.max_len = max_len or model.config.block_size
        self.cache = KVCache(model.config, rows=max_rows, max_len=self.max_len)
        # The LM head as a row-contiguous (C, V) matrix, so logits are `hidden @ head`: the stored
        # (V, C) layout makes the BLAS run a few rows as a transposed-B GEMM, measured slower
        # (benchmarks/README.md). A copy made once: a runner serves fixed weights; build a new one
        # after changing the model's. `host_logits` (the default on the CPU) computes the logits
        # in NumPy on a view of it (cpu.ops.HostHead); otherwise on MLX's device.
        self.head = mx.contiguous(model.head_weight().T).astype(mx.float32)
        mx.eval(self.head)
        if host_logits is None:
            self.logits_head = ops.current().logits_head(self.head)
        elif host_logits:
            from nanogpt_mlx.model.cpu.ops import HostHead

            self.logits_head = HostHead(self.head)
        else:
            self.logits_head = ops.DeviceHead(self.head)
        self.compile = compile
        # Decode steps of a few rows outside MLX where the device's ops offer it (on the CPU, one C
        # call over the same cache: cpu/host_decode.py); `host_decode=False` keeps every step in MLX.
        self.decoder = ops.current().decoder(model, self.head, self.max_len) if host_decode else None

    def _decode_step(self, context: int):
        """The decode step for one context bucket, compiled (MLX retraces it per batch size).

        Compiling fuses the elementwise work (GELU, softmax, residual adds) and cuts the ~200
        separately dispatched ops of a step, which is what a batch-1 step mostly waits on. The
        cache goes in and comes out as arrays; the in-place scatter survives compilation
        because the caller drops its references to the old cache before evaluating.
        """
        if not self.compile:
            return partial(_decode_step_fn, weakref.ref(self.model), context)
        steps = _COMPILED_DECODE_STEPS.get(id(self.model))
        if steps is None:  # shared by every runner of this model, so traces are reused
            steps = _COMPILED_DECODE_STEPS[id(self.model)] = {}
            weakref.finalize(self.model, _COMPILED_DECODE_STEPS.pop, id(self.model), None)
        step = steps.get(context)
        if step is None:
            fn = partial(_decode_step_fn, weakref.ref(self.model), context)
            step = steps[context] = mx.compile(fn, inputs=self.model.state)
        return step

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def prefill(self, row: int, tokens: list[int] | np.ndarray, start: int, all_logits: bool = False) -> np.ndarray:
        """Write `tokens` into cache row `row` at positions start.. and return logits.

        Returns the last position's logits (vocab,), or every position's (T, vocab) when
        `all_logits` (prompt logprobs / echo). Only computing the last position saves the
        LM head over the whole chunk, a large share of a prefill's matmul work.
        """
        T = len(tokens)
        if T == 0:
            raise ValueError("prefill needs at least one token")
        if start + T > self.max_len:
            raise ValueError(f"positions {start}..{start + T - 1} exceed the cache length {self.max_len}")
        context = None if start == 0 else context_for(start + T, self.max_len)
        view = CacheView.block(self.cache, mx.array([start], dtype=mx.int32), T, context, first_row=row)
        hidden = self.model.hidden(mx.array(np.asarray(tokens, dtype=np.int32)[None, :]), view)
        logits = self.logits_head(hidden[0] if all_logits else hidden[0, -1:])
        return logits if all_logits else logits[0]

    def prefill_many(self, chunks: list[PrefillChunk]) -> list[np.ndarray]:
        """Prefill several rows' chunks in as few batched calls as padding allows.

        A burst of new requests would otherwise pay one ~200-op forward each; batching them is
        what keeps time-to-first-token flat under load. Chunks are grouped by length so padding
        costs at most `PAD_WASTE` of the real work; pad tokens go to positions past each row's
        chunk, which the row overwrites before it ever attends to them (a group whose padding
        would run past the cache is prefilled row by row instead). A group's rows may be split
        into parts that run side by side (`_forward_parts`; on the CPU one per CPU stream).
        Returns, per chunk in the given order, what `prefill` would.
        """
        results: list[np.ndarray | None] = [None] * len(chunks)
        for group in _group_by_length(chunks):
            members = [chunks[i] for i in group]
            if len(group) == 1 or self._pads_past_cache(members):
                for i, c in zip(group, members):
                    results[i] = self.prefill(c.row, c.tokens, c.start, c.all_logits)
                continue
            for i, logits in zip(group, self._forward_parts(members)):
                results[i] = logits
        return results

    def _pads_past_cache(self, group: list[PrefillChunk]) -> bool:
        """Would padding every chunk to the longest one write past the end of the cache?"""
        longest = max(len(c.tokens) for c in group)
        return max(c.start for c in group) + longest > self.max_len

    def _forward_parts(self, group: list[PrefillChunk]) -> list[np.ndarray]:
        """One batched prefill forward of `group` (sorted by length), in the parts `ops.prefill_parts` gives.

        Each part is padded only to its own longest chunk. The parts are evaluated together, and
        the cache writes after them: evaluated in one go with the parts, each part's writes
        chain after the other's (they update the same arrays) and hold the parts back.
        """
        o = ops.current()
        parts = [(group[lo:hi], where) for lo, hi, where in o.prefill_parts(len(group))]
        inputs = [self._part_inputs(part) for part, _ in parts]  # every view before any forward (kv_cache.py)
        lazy = []
        for (part, where), (tokens, view) in zip(parts, inputs):
            with where:
                hidden = self.model.hidden(tokens, view)
                last = mx.array([len(c.tokens) - 1 for c in part])
                lazy.append((part, hidden, hidden[mx.arange(len(part)), last]))
        o.eval_parts([last for _, _, last in lazy])
        mx.eval(self.cache.state())
        last_logits = self.logits_head(mx.concatenate([last for _, _, last in lazy]))
        results = []
        for part, hidden, _ in lazy:
            for b, c in enumerate(part):
                results.append(self.logits_head(hidden[b, : len(c.tokens)]) if c.all_logits else last_logits[len(results)])
        return results

    def _part_inputs(self, part: list[PrefillChunk]) -> tuple[mx.array, CacheView]:
        """One part's tokens (B, T), padded to its longest chunk, and its view of the cache."""
        T = max(len(c.tokens) for c in part)
        tokens = np.zeros((len(part), T), dtype=np.int32)
        for b, c in enumerate(part):
            tokens[b, : len(c.tokens)] = c.tokens
        starts = np.array([c.start for c in part], dtype=np.int32)
        fresh = not starts.any()  # all prompts start at 0: attention stays inside the chunk
        context = None if fresh else context_for(int(starts.max()) + T, self.max_len)
        return mx.array(tokens), CacheView.rows(self.cache, [c.row for c in part], mx.array(starts), T, context)

    def decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One step for rows 0..B-1: token b goes to position positions[b]. Returns (B, vocab) logits."""
        B = len(tokens)
        if B == 0 or B > self.max_rows:
            raise ValueError(f"decode needs 1..{self.max_rows} rows, got {B}")
        longest = int(np.max(positions)) + 1
        if longest > self.max_len:
            raise ValueError(f"position {longest - 1} exceeds the cache length {self.max_len}")
        if self.decoder is not None and B <= self.decoder.max_rows:
            return self.decoder(np.asarray(tokens), np.asarray(positions), self.cache.keys, self.cache.values)
        step = self._decode_step(context_for(longest, self.max_len))
        hidden, self.cache.keys, self.cache.values = step(
            mx.array(np.asarray(tokens, dtype=np.int32)[:, None]),
            mx.array(np.asarray(positions, dtype=np.int32)),
            self.cache.keys,
            self.cache.values,
        )
        return self.logits_head(hidden)

    def warm_up(self, rows: int, prefill_tokens: int) -> None:
        """The largest prefill forward (`prefill_tokens` tokens in rows of whole contexts), a decode
        of `rows` rows attending over the whole context, then a short prefill and a 1-row decode.

        The first request then pays no first-call (compile) costs, and the process takes the
        memory of its busiest steps now instead of in steps while it serves: freed memory stays in
        the process on the CPU (cpu/runtime.py's malloc settings), so resident memory is a
        high-water mark (tests/soak.py watches it). What these steps write into the cache is
        never read: rows are prefilled before they are decoded, and stale columns are masked.
        """
        rows = min(rows, self.max_rows)
        chunks, left = [], min(prefill_tokens, self.max_rows * self.max_len)
        while left > 0:
            length = min(left, self.max_len)
            chunks.append(PrefillChunk(len(chunks), np.zeros(length, dtype=np.int32), 0))
            left -= length
        self.prefill_many(chunks)
        self.decode(np.zeros(rows, dtype=np.int32), np.full(rows, self.max_len - 1, dtype=np.int32))
        self.prefill(0, np.zeros(8, dtype=np.int32), 0)
        self.decode(np.zeros(1, dtype=np.int32), np.array([8], dtype=np.int32))

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s cache into row `dst` (the caller then treats `src` as free)."""
        if src != dst:
            self.cache.copy_row(src, dst)
            mx.eval(self.cache.state())

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy positions 0..length-1 of row `src` into row `dst`, leaving the rest of `dst` as it was.

        Only `length` positions move, which is what makes a cached prefix cheap to reuse: a copy
        instead of a forward pass over those tokens.
        """
        if src != dst and length > 0:
            self.cache.copy_prefix(src, dst, length)
            mx.eval(self.cache.state())

    def close(self) -> None:
        """Call from the thread that ran this runner, before that thread ends.

        MLX 0.32 expects every thread that ran MLX work to free its streams
        (`mx.clear_streams()`) before it exits; otherwise the process aborts at exit now and
        then ("terminate called without an active exception", ml-explore/mlx#3126).
        """
        if hasattr(mx, "clear_streams"):
            mx.clear_streams()
        cpu_streams.release()  # forget this thread's CPU streams (any device: plain Python state)
