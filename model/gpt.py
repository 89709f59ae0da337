"""GPT-2 in MLX: token and position embeddings, pre-LayerNorm blocks, exact (erf) GELU, an LM head.

Shapes: B rows, T tokens per row, C = n_embd, H heads of D = C / H, V vocabulary.
Parameter names follow Hugging Face GPT-2 (`wte`, `h.0.attn.c_attn`, ...) so checkpoints map
one to one; only HF's Conv1D (in x out) weights are transposed on the way in and out.

One forward serves training and inference: without a cache, T tokens at positions 0..T-1 attend
causally among themselves; with a `CacheView` (kv_cache.py) each row's new tokens sit at its own
positions, their keys and values go into the cache, and they attend over the cached columns.
The few operations a device may compute its own way (linear, GELU, softmax, attention) come from
`ops.current()` (ops.py): MLX's own, or on the CPU the tuned ones of model/cpu/.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from nanogpt_mlx.model import ops
from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.kv_cache import CacheView


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer  # which of the cache's layers holds this one's keys and values
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=True)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=True)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def __call__(self, x: mx.array, mask: mx.array, cache: CacheView | None = None) -> mx.array:
        B, T, C = x.shape
        o = ops.current()
        q, k, v = mx.split(o.linear(self.c_attn, x), 3, axis=-1)
        q, k, v = (t.reshape(B, T, self.n_head, self.head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update_and_fetch(self.layer, k, v)
        y = o.attention(q, k, v, mask, self.scale, self.dropout)
        y = o.linear(self.c_proj, y.transpose(0, 2, 1, 3).reshape(B, T, C))
        return self.dropout(y) if self.dropout is not None else y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner, bias=True)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd, bias=True)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None

    def __call__(self, x: mx.array) -> mx.array:
        o = ops.current()
        x = o.linear(self.c_proj, o.gelu(o.linear(self.c_fc, x)))
        return self.dropout(x) if self.dropout is not None else x


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array, mask: mx.array, cache: CacheView | None = None) -> mx.array:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.h = [Block(config, layer) for layer in range(config.n_layer)]
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

    def head_weight(self) -> mx.array:
        """The (V, C) matrix that maps hidden states to logits (the token embedding when tied)."""
        return self.wte.weight if self.config.tie_embeddings else self.lm_head.weight

    # --- forward ------------------------------------------------------------------------------
    def hidden(self, tokens: mx.array, cache: CacheView | None = None) -> mx.array:
        """(B, T) token ids -> final hidden states (B, T, C), after the last LayerNorm.

        Without `cache`: positions 0..T-1, causal attention among the T tokens (training,
        scoring). With it: positions, cache writes and the attention mask come from the view.
        """
        B, T = tokens.shape
        if cache is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
        positions = mx.arange(T) if cache is None else cache.positions
        x = self.wte(tokens) + self.wpe(positions)
        if self.drop is not None:
            x = self.drop(x)
        mask = nn.MultiHeadAttention.create_additive_causal_mask(T, dtype=x.dtype) if cache is None else cache.mask
        for block in self.h:
            x = block(x, mask, cache)
        return self.ln_f(x)

    def logits(self, hidden: mx.array) -> mx.array:
        """(..., C) hidden states -> (..., V) logits."""
        if self.config.tie_embeddings:
            return self.wte.as_linear(hidden)
        return self.lm_head(hidden)

    def __call__(self, tokens: mx.array) -> mx.array:
        """Training / scoring: (B, T) token ids -> (B, T, V) logits, positions 0..T-1."""
        return self.logits(self.hidden(tokens))

    def loss(self, inputs: mx.array, targets: mx.array) -> mx.array:
        """Mean next-token cross-entropy of (B, T) inputs against (B, T) targets."""
        return ops.cross_entropy(self(inputs), targets)

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
