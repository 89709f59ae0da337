"""The preallocated KV cache, and the per-forward view the attention layers read and write it through.

`KVCache` holds keys and values for `rows` sequences of up to `max_len` tokens, allocated once.
A forward pass over new tokens gets a `CacheView`: which cache rows its batch rows are, where each
row's new tokens go, and how many cache columns they attend over. Each attention layer calls
`view.update_and_fetch(layer, k, v)` (as mlx-lm's caches do): the view writes the new keys and
values in place and returns the keys and values to attend over, and `view.mask` hides every
column a row may not see (the future, and stale entries past the row's own length).

Shapes: B batch rows, T new tokens per row, H heads of D dims, S = max_len cache columns.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from nanogpt_mlx.model.config import ModelConfig


class KVCache:
    """Keys and values for `rows` sequences of up to `max_len` tokens, allocated once.

    Layout per layer: (rows, H, S, D), so one head's keys of one row are contiguous and
    `q @ k^T` over the first `context` columns reads a plain slice (a (rows, S, H, D) layout made
    those matmuls copy and run slower).
    """

    def __init__(self, config: ModelConfig, rows: int, max_len: int | None = None, dtype=mx.float32):
        self.rows = rows
        self.max_len = max_len or config.block_size
        shape = (rows, config.n_head, self.max_len, config.head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        mx.eval(self.keys, self.values)

    @classmethod
    def wrap(cls, keys: list[mx.array], values: list[mx.array]) -> KVCache:
        """A cache over existing arrays (inside a compiled step, where they arrive as inputs)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values = keys, values
        cache.rows, _, cache.max_len, _ = keys[0].shape
        return cache

    @property
    def dtype(self) -> mx.Dtype:
        return self.keys[0].dtype

    def state(self) -> list[mx.array]:
        return self.keys + self.values

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst` (the rest of `dst` is kept).

        The source is copied out and evaluated first: were the update to read the cache lazily,
        the cache array would still be referenced when the update runs, and MLX would copy the
        whole cache (all rows) instead of writing one row in place.
        """
        if not 0 <= length <= self.max_len:
            raise ValueError(f"prefix length {length} outside 0..{self.max_len}")
        if length == 0 or src == dst:
            return
        prefix = [a[src, :, :length] + 0 for a in self.keys + self.values]  # "+ 0": a copy, not a view
        mx.eval(prefix)
        n = len(self.keys)
        for layer in range(n):
            self.keys[layer][dst, :, :length] = prefix[layer]
            self.values[layer][dst, :, :length] = prefix[n + layer]

    def copy_row(self, src: int, dst: int) -> None:
        """Copy one sequence's whole cache row (to keep the running rows contiguous at the front)."""
        self.copy_prefix(src, dst, self.max_len)


class CacheView:
    """One forward pass's window onto a `KVCache`. Make it with `block` or `rows`.

    positions: (B, T) the position of each new token (row b: start[b] .. start[b] + T - 1).
    context:   cache columns each row attends over, >= max(start) + T; passing a value rounded up
               to a bucket keeps the set of shapes (and compiled graphs) small. None when every
               row starts at 0 (fresh prompts): attention then stays inside the new chunk, with no
               read of the cache (the keys and values are still written to it).
    mask:      additive (B, 1, T, context) mask, 0 where a token may attend and -inf elsewhere
               (a causal (T, T) mask when context is None).

    Writes: one new token per row (decode) is one scatter per layer indexed by (row, head,
    position), which also runs inside `mx.compile`; a chunk of T > 1 tokens per row (prefill) is
    one in-place slice copy per row, whose rows and positions are read on the host (MLX's CPU
    scatter costs far more per element than a copy). Reads: a contiguous block of rows is a view
    of the cache; rows listed in any order are gathered (their first `context` columns) when the
    view is made, evaluated, and each layer's new keys and values are written into that copy as
    well as into the cache. Gathering later, from the cache as the writes leave it, would give
    the written cache array a second reader: MLX could then no longer update it in place and
    would copy the whole cache (every row) per write, and a batch split into parts on separate
    streams (runner.py) has its parts' writes chained onto one array. So a forward's listed-rows
    views are all made before any of them is used.
    """

    def __init__(
        self,
        cache: KVCache,
        start: mx.array,
        length: int,
        context: int | None,
        first_row: int | None,
        rows: Sequence[int] | None,
    ):
        self.cache = cache
        self.context = context
        self.first_row = first_row  # rows first_row .. first_row + B - 1, or None: the listed `rows`
        B = start.shape[0]
        self.positions = start[:, None] + mx.arange(length)[None, :]
        self.mask = self._make_mask(length, cache.dtype)
        self._spans: list[tuple[int, int]] | None = None  # prefill: (cache row, first position) per batch row
        heads = cache.keys[0].shape[1]
        if length == 1:
            row_ids = mx.arange(first_row, first_row + B) if rows is None else mx.array(rows, dtype=mx.int32)
            self._scatter_index = _token_index(row_ids, heads, self.positions)
        else:
            host_rows = range(first_row, first_row + B) if rows is None else rows
            self._spans = list(zip(host_rows, start.tolist()))
        # Listed rows that attend over the cache: evaluated copies of their first `context` columns.
        self._gathered: tuple[list[mx.array], list[mx.array]] | None = None
        if rows is not None and context is not None:
            index = mx.array(rows, dtype=mx.int32)
            self._gathered = (
                [mx.take(a, index, axis=0)[:, :, :context] + 0 for a in cache.keys],  # "+ 0": contiguous copies
                [mx.take(a, index, axis=0)[:, :, :context] + 0 for a in cache.values],
            )
            mx.eval(self._gathered)
            if length == 1:
                self._copy_where = _token_index(mx.arange(B), heads, self.positions)
            else:  # batch row b is row b of the copies
                self._copy_where = [(b, begin) for b, (_, begin) in enumerate(self._spans)]

    @classmethod
    def block(cls, cache: KVCache, start: mx.array, length: int, context: int | None, first_row: int = 0) -> CacheView:
        """Batch rows 0..B-1 are cache rows first_row .. first_row + B - 1 (decode; one prompt's row)."""
        return cls(cache, start, length, context, first_row=first_row, rows=None)

    @classmethod
    def rows(cls, cache: KVCache, rows: Sequence[int], start: mx.array, length: int, context: int | None) -> CacheView:
        """Batch row b is cache row rows[b], in any order (prompts prefilled together)."""
        return cls(cache, start, length, context, first_row=None, rows=list(rows))

    def _make_mask(self, length: int, dtype: mx.Dtype) -> mx.array:
        if self.context is None:
            return nn.MultiHeadAttention.create_additive_causal_mask(length, dtype=dtype)
        cols = mx.arange(self.context)
        allowed = cols[None, None, None, :] <= self.positions[:, None, :, None]  # (B, 1, T, context)
        return mx.where(allowed, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))

    def update_and_fetch(self, layer: int, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write this layer's new keys and values (B, H, T, D); return those to attend over (B, H, context, D)."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        _write(keys, values, k, v, self._scatter_index if self._spans is None else self._spans)
        if self.context is None:  # fresh prompts: the chunk is all there is to see
            return k, v
        if self._gathered is not None:  # listed rows: their copies, with the new keys and values written in
            keys, values = self._gathered[0][layer], self._gathered[1][layer]
            _write(keys, values, k, v, self._copy_where)
            return keys, values
        rows = slice(self.first_row, self.first_row + k.shape[0])  # a block of rows: a view, no copy
        return keys[rows, :, : self.context], values[rows, :, : self.context]


def _token_index(rows: mx.array, heads: int, positions: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """The index of one new token per row, every head: batch row b writes row rows[b] at
    positions[b, 0]. All three index arrays are adjacent, which MLX turns into one in-place scatter."""
    B = rows.shape[0]
    return rows.reshape(B, 1, 1), mx.arange(heads).reshape(1, heads, 1), positions[:, None, :]


def _write(keys: mx.array, values: mx.array, k: mx.array, v: mx.array, where) -> None:
    """Write k and v (B, H, T, D) into keys and values in place: at a scatter index (one token per
    row), or per batch row b at rows and columns where[b] = (row, first column) (a chunk per row)."""
    if isinstance(where, tuple):
        keys[where] = k
        values[where] = v
        return
    T = k.shape[2]
    for b, (row, begin) in enumerate(where):
        keys[row, :, begin : begin + T] = k[b]
        values[row, :, begin : begin + T] = v[b]
