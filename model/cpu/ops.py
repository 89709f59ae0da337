"""`CpuOps`: the model's and the runner's operations tuned for MLX on a CPU (see model/ops.py).

The same maths as the portable `Ops`, computed the way that measured fastest on the CPU
(benchmarks/README.md):

- `linear`: the matmul, then the bias add. `nn.Linear` calls MLX's `addmm`, which on the CPU first
  writes the broadcast bias into the output and then runs the GEMM with beta = 1, an extra pass
  over the output; the separate add is fused by the JIT into the elementwise op that follows.
- `softmax`, `gelu`, `token_cross_entropy`, `log_softmax`: the written-out forms of fast_ops.py.
- `attention`: decode steps of at least SPLIT_MIN_ROWS rows split their heads over this thread's
  CPU streams (streams.py), so each group's small matmuls and softmax run on a core of their own.
- `logits_head`: `HostHead`, the LM head in NumPy.
- `prefill_parts` / `eval_parts`: a batched prefill's rows in one part per CPU stream, evaluated
  together with the BLAS held to one thread per call.
- `decoder`: decode steps of up to HOST_MAX_ROWS rows as one C call (host_decode.py), off MLX.

Creating a `CpuOps` prepares the process for computing on the CPU (runtime.prepare_compute).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nanogpt_mlx.model.cpu import blas, fast_ops, host_decode, runtime, streams
from nanogpt_mlx.model.ops import DeviceHead, Ops

# Decode steps of at least this many rows split their attention heads over CPU streams. Below it
# the hand-offs between streams cost what the second core saves; prefills do not split their heads
# (their per-head matmuls are large enough for the BLAS to thread, and two streams of them
# oversubscribe the cores), they split their rows instead (`prefill_parts`). Measured in
# benchmarks/README.md.
SPLIT_MIN_ROWS = 16

# The NumPy LM head serves calls of at least HOST_HEAD_MIN_ROWS rows, computed for a multiple of
# HOST_HEAD_ROW_MULTIPLE rows (see HostHead).
HOST_HEAD_MIN_ROWS = 4
HOST_HEAD_ROW_MULTIPLE = 8


# Decode steps of at most this many rows run in C (host_decode.py) instead of MLX, unless
# NANOGPT_MLX_HOST_DECODE=0: the C step was the faster at every width measured, 1 to 64 rows
# (`python -m nanogpt_mlx.benchmarks.decode_step --settings host-step numpy-head`).
HOST_MAX_ROWS = 64


class HostHead(DeviceHead):
    """The LM head in NumPy, on a view of the MLX head's memory (no copy).

    The LM head (M x C x 50,257) is the largest matmul of a decode step, and NumPy's OpenBLAS ran
    it quicker than MLX's BLAS at 4 rows and more; the logits go to the host for sampling anyway,
    so only the (M, C) hidden states cross. Rows are padded to a multiple of 8, because OpenBLAS
    ran a few rows on a single thread; below 4 rows MLX's head is as fast alone and was faster
    inside a step (measured in benchmarks/README.md). The two BLAS pools' idle threads are told to
    sleep at once (runtime._quiet_openblas), or their spinning slows each other.
    """

    def __init__(self, head: mx.array):
        super().__init__(head)
        self.matrix = np.asarray(head)  # (C, V) float32, sharing the MLX array's memory

    def __call__(self, hidden: mx.array) -> np.ndarray:
        rows = hidden.shape[0]
        if rows < HOST_HEAD_MIN_ROWS:
            return super().__call__(hidden)
        states = np.asarray(hidden, dtype=np.float32)
        pad = -rows % HOST_HEAD_ROW_MULTIPLE
        if pad:
            states = np.concatenate([states, np.zeros((pad, states.shape[1]), dtype=np.float32)])
        return (states @ self.matrix)[:rows]


class CpuOps(Ops):
    def __init__(self):
        runtime.prepare_compute()

    # --- what the model calls ------------------------------------------------------------------
    def linear(self, layer: nn.Linear, x: mx.array) -> mx.array:
        y = x @ layer.weight.T
        return y + layer.bias if "bias" in layer else y

    def gelu(self, x: mx.array) -> mx.array:
        return fast_ops.gelu(x)

    def softmax(self, x: mx.array) -> mx.array:
        return fast_ops.softmax(x)

    def token_cross_entropy(self, logits: mx.array, targets: mx.array) -> mx.array:
        return fast_ops.token_cross_entropy(logits, targets)

    def log_softmax(self, x: mx.array) -> mx.array:
        return fast_ops.log_softmax(x)

    def attention(
        self,
        q: mx.array,
        k: mx.array,
        v: mx.array,
        mask: mx.array,
        scale: float,
        dropout: Callable[[mx.array], mx.array] | None = None,
    ) -> mx.array:
        B, H, T, _ = q.shape
        parallel = streams.streams() if T == 1 and B >= SPLIT_MIN_ROWS else ()
        groups = min(len(parallel), H)
        if groups < 2:
            return super().attention(q, k, v, mask, scale, dropout)
        outputs = []
        for stream, (lo, hi) in zip(parallel, streams.split_ranges(H, groups)):
            with mx.stream(stream):
                outputs.append(super().attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], mask, scale, dropout))
        return mx.concatenate(outputs, axis=1)

    # --- what the runner calls -----------------------------------------------------------------
    def logits_head(self, head: mx.array) -> HostHead:
        return HostHead(head)

    def prefill_parts(self, n: int) -> list[tuple[int, int, AbstractContextManager]]:
        """One part per CPU stream, each padded only to its own longest chunk by the runner.

        MLX runs a stream's ops one at a time, and only the matmuls of a forward use every core;
        with the rows in parts on separate streams and the BLAS held to one thread per call
        (`eval_parts`), every op (LayerNorm, softmax, GELU, the per-head matmuls) has a core.
        """
        parallel = streams.streams()
        parts = min(len(parallel), n)
        if parts < 2:
            return super().prefill_parts(n)
        return [(lo, hi, mx.stream(stream)) for stream, (lo, hi) in zip(parallel, streams.split_ranges(n, parts))]

    def decoder(self, model: nn.Module, head: mx.array, max_len: int) -> host_decode.HostDecoder | None:
        if not host_decode.enabled():
            return None
        library = host_decode.load_library()
        if library is None:
            return None
        return host_decode.HostDecoder(library, model, head, max_len, max_rows=HOST_MAX_ROWS)

    def eval_parts(self, outputs: list[mx.array]) -> None:
        if len(outputs) < 2:
            mx.eval(outputs)
            return
        with blas.single_threaded():
            mx.eval(outputs)
