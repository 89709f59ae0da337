"""The seam between the maths and the machine: the few operations a device may run its own way.

The model (gpt.py) and the runner (runner.py) never call device-tuned code directly; they ask
`current()` for an `Ops` and call its methods:

    model:   linear(layer, x)   gelu(x)   softmax(x)   attention(q, k, v, mask, scale, dropout)
             token_cross_entropy(logits, targets)   log_softmax(x)
    runner:  logits_head(head) -> (M, C) hidden states -> (M, V) NumPy logits
             prefill_parts(n) -> [(lo, hi, where to build part lo..hi)]   eval_parts(outputs)
             decoder(model, head, max_len) -> a whole decode step off MLX for a few rows, or None

`Ops` itself is MLX's own kernels, one forward in one part: the portable default, and what
Metal and CUDA use. On the CPU `current()` returns `nanogpt_mlx.model.cpu.ops.CpuOps`, the same
maths with the CPU's tuned kernels (see model/cpu/README.md); the tests check both agree.

The choice is made when a function runs (or is traced: a compiled function keeps the ops it was
traced with), from MLX's default device, so `device.select_device` decides it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class StepDecoder(Protocol):
    """A decode step outside MLX over the runner's KV cache arrays (cpu/host_decode.py)."""

    max_rows: int  # steps of more rows run in MLX

    def __call__(self, tokens: np.ndarray, positions: np.ndarray, keys: list[mx.array], values: list[mx.array]) -> np.ndarray:
        """One token for each of cache rows 0..B-1 at `positions`, written into `keys` / `values`; (B, V) logits."""
        ...


class DeviceHead:
    """The LM head as `hidden @ head` on MLX's device, with logits returned as float32 NumPy."""

    def __init__(self, head: mx.array):
        self.head = head  # (C, V)

    def __call__(self, hidden: mx.array) -> np.ndarray:
        return np.array(hidden @ self.head, dtype=np.float32)


class Ops:
    """MLX's own operations: the portable default."""

    # --- what the model calls ------------------------------------------------------------------
    def linear(self, layer: nn.Linear, x: mx.array) -> mx.array:
        return layer(x)

    def gelu(self, x: mx.array) -> mx.array:
        """Exact (erf) GELU, as GPT-2 and `transformers`' "gelu"."""
        return nn.gelu(x)

    def softmax(self, x: mx.array) -> mx.array:
        """Over the last axis."""
        return mx.softmax(x, axis=-1, precise=True)

    def attention(
        self,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        mask: mx.array,
        scale: float,
        dropout: Callable[[mx.array], mx.array] | None = None,
    ) -> mx.array:
        """softmax(q k^T * scale + mask) v over (B, H, T, D) heads; `mask` is additive (0 / -inf)."""
        scores = (q * scale) @ k.transpose(0, 1, 3, 2)
        weights = self.softmax(scores + mask)
        if dropout is not None:
            weights = dropout(weights)
        return weights @ v

    def token_cross_entropy(self, logits: mx.array, targets: mx.array) -> mx.array:
        """Per-position -log p(target): logits (..., V), targets (...) -> (...)."""
        *lead, vocab = logits.shape
        rows = nn.losses.cross_entropy(logits.astype(mx.float32).reshape(-1, vocab), targets.astype(mx.int32).reshape(-1), reduction="none")
        return rows.reshape(lead)

    def log_softmax(self, x: mx.array) -> mx.array:
        """x - logsumexp(x) over the last axis."""
        return x - mx.logsumexp(x, axis=-1, keepdims=True)

    # --- what the runner calls -----------------------------------------------------------------
    def logits_head(self, head: mx.array) -> Callable[[mx.array], np.ndarray]:
        """What turns (M, C) final hidden states into (M, V) float32 NumPy logits, given the (C, V) head."""
        return DeviceHead(head)

    def prefill_parts(self, n: int) -> list[tuple[int, int, AbstractContextManager]]:
        """Split a batched prefill of n rows into parts: (lo, hi, context to build rows lo..hi-1 in)."""
        return [(0, n, contextlib.nullcontext())]

    def eval_parts(self, outputs: list[mx.array]) -> None:
        """Evaluate the parts' outputs (one array per part) together."""
        mx.eval(outputs)

    def decoder(self, model: nn.Module, head: mx.array, max_len: int) -> StepDecoder | None:
        """What runs whole decode steps of up to `max_rows` rows instead of MLX, or None (MLX runs them all)."""
        return None


PORTABLE = Ops()
_cpu_ops: Ops | None = None
_forced: Ops | None = None


def current() -> Ops:
    """The ops for MLX's default device: the CPU's tuned ones there, MLX's own elsewhere."""
    if _forced is not None:
        return _forced
    if mx.default_device() != mx.cpu:
        return PORTABLE
    global _cpu_ops
    if _cpu_ops is None:
        from nanogpt_mlx.model.cpu.ops import CpuOps  # creating it prepares the process for CPU work

        _cpu_ops = CpuOps()
    return _cpu_ops


@contextlib.contextmanager
def using(ops: Ops) -> Iterator[Ops]:
    """Run with `ops` whatever the device (to compare implementations side by side). Process-wide;
    compiled functions keep the ops they were traced with, so compare uncompiled code or fresh models."""
    global _forced
    previous, _forced = _forced, ops
    try:
        yield ops
    finally:
        _forced = previous


# Module-level forms for training and evaluation code.
def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position -log p(target): logits (..., V), targets (...) -> (...)."""
    return current().token_cross_entropy(logits, targets)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy (nats)."""
    return token_cross_entropy(logits, targets).mean()


def log_softmax(x: mx.array) -> mx.array:
    return current().log_softmax(x)
