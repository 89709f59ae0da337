"""The GPT-2-style network in MLX: one module for training, prefill and batched decode.

Shapes: B rows, T new tokens per row, C = n_embd, H heads of D = C / H, S cache length.
Parameter names follow Hugging Face GPT-2 (`wte`, `h.0.attn.c_attn`, ...) so checkpoints map
one to one; only HF's Conv1D (in x out) weights are transposed on the way in and out.

Inference keeps a preallocated KV cache (`KVCache`) with one row per sequence. Each call writes
the new keys/values at per-row positions and attends over the first `context` columns only,
so rows of different lengths decode together in one batched step.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from nanogpt_mlx.model import cpu_streams, fast_ops
from nanogpt_mlx.model.config import ModelConfig


class KVCache:
    """Keys and values for `rows` sequences of up to `max_len` tokens, allocated once.

    Layout per layer: (rows, H, max_len, D), so one head's keys of one row are contiguous and
    `q @ k^T` over the first `context` columns reads a plain slice (a (rows, max_len, H, D)
    layout made those matmuls copy and run 4x slower). New tokens are written in place: a decode
    step's with one scatter indexed by (row, head, position), a prefill chunk's with one slice
    copy per row.
    """

    def __init__(self, config: ModelConfig, rows: int, max_len: int | None = None, dtype=mx.float32):
        self.rows = rows
        self.max_len = max_len or config.block_size
        shape = (rows, config.n_head, self.max_len, config.head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(config.n_layer)]
        mx.eval(self.keys, self.values)

    @classmethod
    def wrap(cls, keys: list[mx.array], values: list[mx.array]) -> "KVCache":
        """A cache over existing arrays (inside a compiled step, where they arrive as inputs)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values = keys, values
        cache.rows, _, cache.max_len, _ = keys[0].shape
        return cache

    def state(self) -> list[mx.array]:
        return self.keys + self.values

    def copy_row(self, src: int, dst: int) -> None:
        """Move one sequence's cache row (used to keep running rows contiguous at the front).

        The source row is copied out and evaluated first: were the update to read `keys[src]`
        lazily, the cache array would still be referenced when the update runs, and MLX would
        copy the whole cache (all rows) instead of writing one row in place.
        """
        rows = [a[src] + 0 for a in self.keys + self.values]  # "+ 0": a copy, not a view of the cache
        mx.eval(rows)
        n = len(self.keys)
        for layer in range(n):
            self.keys[layer][dst] = rows[layer]
            self.values[layer][dst] = rows[n + layer]


class Linear(nn.Linear):
    """`nn.Linear` as a matmul followed by the bias add.

    MLX's CPU `addmm` (what `nn.Linear` calls) first writes the broadcast bias into the output
    and then runs the GEMM with beta = 1, an extra pass over the output; the add alone is fused
    by the JIT into whatever elementwise op follows (GELU, the residual). A batched prefill of
    32 x 41 tokens ran ~10% faster this way (AVX2 machine).
    """

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self.weight.T
        return y + self.bias if "bias" in self else y


# Decode steps of at least this many rows split their attention over CPU streams. Measured on the
# 2-core AVX2 machine, whole decode step split / one stream: 32 rows 0.81-0.92, 16-24 rows
# 0.94-0.95, 8 rows 1.01, 1 row 1.06 (the hand-offs between streams cost what they save);
# prefills 1.03-1.07 (their per-head matmuls are large enough for MKL to thread, and two
# streams of them oversubscribe the cores; prefills split their rows instead, see ModelRunner).
SPLIT_MIN_ROWS = 16


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=True)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=True)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def _split_heads(self, x: mx.array) -> mx.array:
        B, T, _ = x.shape
        return x.reshape(B, T, self.n_head, self.head_dim).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, cache: tuple | None = None) -> tuple[mx.array, tuple | None]:
        B, T, C = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)

        if cache is None:
            # Training / full-sequence path: plain causal attention over the T tokens.
            mask = nn.MultiHeadAttention.create_additive_causal_mask(T, dtype=x.dtype)
            y = self._attend(q, k, v, mask)
            new_cache = None
        else:
            keys, values, rows, write_pos, spans, context, mask = cache
            if spans is None:
                # One new token per row (decode): scatter the new keys/values (B, H, 1, D) into
                # each row at its own position. All three index arrays are adjacent, which MLX
                # turns into one in-place scatter.
                row_index = rows.reshape(B, 1, 1) if isinstance(rows, mx.array) else mx.arange(rows, rows + B).reshape(B, 1, 1)
                heads = mx.arange(self.n_head).reshape(1, self.n_head, 1)
                cols = write_pos[:, None, :]  # (B, 1, T)
                keys[row_index, heads, cols] = k
                values[row_index, heads, cols] = v
            else:
                # A chunk of T tokens per row (prefill): one in-place slice copy per row. MLX's
                # CPU scatter costs ~15 ns an element, which made the cache writes ~20% of a
                # 32 x 42-token batched prefill; the slice copies run at memcpy speed.
                for b, (row, begin) in enumerate(spans):
                    keys[row, :, begin : begin + T] = k[b]
                    values[row, :, begin : begin + T] = v[b]
            if context is None:  # fresh prompts (all start at 0): the chunk is all there is to see
                k_ctx, v_ctx = k, v
            elif isinstance(rows, mx.array):  # scattered rows (batched prefill): gather a copy
                # of the first `context` columns only (slice first: a view), not of whole rows.
                k_ctx = mx.take(keys[:, :, :context], rows, axis=0)
                v_ctx = mx.take(values[:, :, :context], rows, axis=0)
            else:  # a contiguous block of rows (decode): a view, no copy
                k_ctx = keys[rows : rows + B, :, :context]
                v_ctx = values[rows : rows + B, :, :context]
            y = self._attend(q, k_ctx, v_ctx, mask)
            new_cache = (keys, values)

        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        y = self.c_proj(y)
        if self.dropout is not None:
            y = self.dropout(y)
        return y, new_cache

    def _attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(D) + mask) v, over (B, H, T, D) heads.

        On the CPU the heads are split over a few MLX streams (see cpu_streams): each group's
        small matmuls and softmax run on their own core instead of one after the other.
        """
        B, _, T, _ = q.shape
        parallel = cpu_streams.streams() if T == 1 and B >= SPLIT_MIN_ROWS else ()
        groups = min(len(parallel), self.n_head)
        if groups < 2:
            return self._attend_heads(q, k, v, mask)
        outputs = []
        for stream, (lo, hi) in zip(parallel, cpu_streams.split_ranges(self.n_head, groups)):
            with mx.stream(stream):
                outputs.append(self._attend_heads(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mask))
        return mx.concatenate(outputs, axis=1)

    def _attend_heads(self, q, k, v, mask):
        scores = (q * self.scale) @ k.transpose(0, 1, 3, 2)
        scores = scores + mask
        weights = fast_ops.softmax(scores)
        if self.dropout is not None:
            weights = self.dropout(weights)
        return weights @ v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.n_inner, bias=True)
        self.c_proj = Linear(config.n_inner, config.n_embd, bias=True)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def __call__(self, x: mx.array) -> mx.array:
        x = self.c_proj(fast_ops.gelu(self.c_fc(x)))  # exact erf GELU
        if self.dropout is not None:
            x = self.dropout(x)
        return x


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array, cache: tuple | None = None):
        a, new_cache = self.attn(self.ln_1(x), cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, new_cache


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.h = [Block(config) for _ in range(config.n_layer)]
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()

    # --- weights ------------------------------------------------------------------------------
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer), zero biases."""
        key = mx.random.key(seed) if seed is not None else None
        std = 0.02
        proj_std = std / math.sqrt(2 * self.config.n_layer)
        new = {}
        flat = dict(nn.utils.tree_flatten(self.parameters()))
        for i, (name, p) in enumerate(sorted(flat.items())):
            sub = mx.random.split(key, len(flat))[i] if key is not None else None
            if name.endswith("bias"):
                value = mx.zeros_like(p)
            elif ".ln_" in name or name.startswith("ln_f"):
                value = mx.ones_like(p)
            else:
                scale = proj_std if name.endswith("c_proj.weight") else std
                value = scale * mx.random.normal(p.shape, key=sub)
            new[name] = value
        self.load_weights(list(new.items()))

    def num_params(self) -> int:
        return sum(p.size for _, p in nn.utils.tree_flatten(self.parameters()))

    # --- forward ------------------------------------------------------------------------------
    def logits(self, hidden: mx.array) -> mx.array:
        if self.config.tie_embeddings:
            return self.wte.as_linear(hidden)
        return self.lm_head(hidden)

    def head_weight(self) -> mx.array:
        """The (vocab, n_embd) matrix that maps hidden states to logits (the embedding when tied)."""
        return self.wte.weight if self.config.tie_embeddings else self.lm_head.weight

    def inference_head(self) -> mx.array:
        """The LM head as a row-contiguous (n_embd, vocab) matrix, so logits are `hidden @ head`.

        The stored (vocab, n_embd) layout makes BLAS treat a few rows of hidden states as a
        transposed-B GEMM; with this layout one row's logits ran 2.8x faster on CPU (MKL,
        1 x 384 x 50,257: 8.7 -> 3.1 ms, the largest single cost of a batch-1 decode step) and
        32 rows 1.2x. A copy (77 MB in fp32) that inference code makes once per runner (on a GPU;
        on the CPU the runner keeps this layout in NumPy and computes logits there).
        """
        return mx.contiguous(self.head_weight().T)

    def __call__(self, tokens: mx.array) -> mx.array:
        """Training / scoring: (B, T) token ids -> (B, T, vocab) logits, positions 0..T-1."""
        B, T = tokens.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
        x = self.wte(tokens) + self.wpe(mx.arange(T))
        if self.drop is not None:
            x = self.drop(x)
        for block in self.h:
            x, _ = block(x)
        return self.logits(self.ln_f(x))

    def loss(self, inputs: mx.array, targets: mx.array) -> mx.array:
        """Mean next-token cross-entropy of (B, T) inputs against (B, T) targets."""
        return fast_ops.cross_entropy(self(inputs), targets)

    def forward_cached(
        self,
        tokens: mx.array,
        start: mx.array,
        cache: KVCache,
        context: int | None,
        row_start: int = 0,
        rows: mx.array | None = None,
    ) -> mx.array:
        """Run T new tokens per row through the cache; return final hidden states (B, T, C).

        tokens: (B, T) ids for cache rows row_start .. row_start+B-1, or for the cache rows
                listed in `rows` (B,) when given (any rows, e.g. prompts prefilled together).
        start:  (B,) int32, each row's position of its first new token (= tokens already cached).
        context: how many cache columns to attend over; must be >= max(start) + T. Passing a
                 value rounded up to a bucket keeps the set of shapes (and compiled graphs) small.
                 None when every row starts at 0 (fresh prompts): attention then stays inside
                 the chunk, with no gather from the cache (the keys are still written to it).
        Columns past a row's own length are masked, so stale cache contents never leak.
        With T > 1 (prefill) `start` and `rows` are read on the host for the cache writes, so
        only the one-token (decode) form can run inside `mx.compile`.
        """
        B, T = tokens.shape
        positions = start[:, None] + mx.arange(T)[None, :]  # (B, T)
        x = self.wte(tokens) + self.wpe(positions)
        if context is None:
            mask = nn.MultiHeadAttention.create_additive_causal_mask(T, dtype=x.dtype)
        else:
            cols = mx.arange(context)
            allowed = cols[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, context)
            mask = mx.where(allowed, mx.array(0.0, x.dtype), mx.array(-mx.inf, x.dtype))
        spans = None  # (row, first position) of each row's chunk, for prefill's slice writes
        if T > 1:
            row_ids = range(row_start, row_start + B) if rows is None else rows.tolist()
            spans = list(zip(row_ids, start.tolist()))
        for i, block in enumerate(self.h):
            layer_cache = (cache.keys[i], cache.values[i], row_start if rows is None else rows, positions, spans, context, mask)
            x, (cache.keys[i], cache.values[i]) = block(x, layer_cache)
        return self.ln_f(x)

    # --- checkpoints --------------------------------------------------------------------------
    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map Hugging Face GPT-2 names and layouts onto this module.

        HF stores `transformer.`-prefixed names, Conv1D weights as (in, out), and non-parameter
        attention buffers (`attn.bias`, `attn.masked_bias`) in older checkpoints.
        """
        out = {}
        for name, value in weights.items():
            name = name.removeprefix("transformer.")
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                value = value.T
            out[name] = value
        return out

    def hf_weights(self) -> dict[str, mx.array]:
        """The inverse of `sanitize`: this module's parameters under HF GPT-2 names and layouts."""
        out = {}
        for name, value in nn.utils.tree_flatten(self.parameters()):
            if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                value = value.T
            out[name if name.startswith("lm_head") else f"transformer.{name}"] = value
        return out
