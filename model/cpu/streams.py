"""Extra MLX CPU streams, so independent pieces of one forward pass run on several cores.

MLX executes the ops of a CPU stream one after another on that stream's thread. The matmuls
inside use every core (the BLAS threads them), but everything else runs on one: softmax, the many
small per-head matmuls of attention, normalization. Ops placed on *different* streams run
concurrently, and MLX inserts the waits where one stream's output feeds another's op. The CPU ops
use them twice (ops.py): wide decode steps split their attention heads over the streams, batched
prefills their rows (measured in benchmarks/README.md).

MLX streams belong to the thread that made them (using one on another thread raises), so each
thread gets its own set, made on first use; `mx.compile` traces a function again on each thread,
so a compiled step that split its attention on one thread also works on the next. `release()`
forgets the calling thread's set; call it with `mx.clear_streams()` before that thread ends.
"""

from __future__ import annotations

import os
import threading

import mlx.core as mx

MAX_STREAMS = 4  # a cap, not a measured optimum: only 2 cores were at hand to measure

_local = threading.local()
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Switch the split off (or on) to compare side by side. Read when code runs or is traced:
    a compiled function keeps what it was traced with, so compare with separate models (each
    its own traces) or uncompiled runners."""
    global _enabled
    _enabled = enabled


def stream_count() -> int:
    """How many streams to split over: one per core (up to MAX_STREAMS), on the CPU only."""
    if not _enabled or mx.default_device() != mx.cpu:
        return 1
    return max(1, min(MAX_STREAMS, os.cpu_count() or 1))


def streams() -> tuple[mx.Stream, ...]:
    """This thread's CPU streams to split work over; empty when there is nothing to gain."""
    count = stream_count()
    if count < 2:
        return ()
    mine = getattr(_local, "streams", ())
    if len(mine) != count:
        mine = _local.streams = tuple(mx.new_stream(mx.cpu) for _ in range(count))
    return mine


def split_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous (lo, hi) ranges of nearly equal size covering 0..n (heads, rows)."""
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds, bounds[1:]))


def release() -> None:
    """Forget this thread's streams (they die with `mx.clear_streams()` or the thread)."""
    _local.__dict__.clear()
