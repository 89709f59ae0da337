"""Timing one workload: seconds per run after warm-up.

Standard library only, so `peer_torch.py`, which runs as a plain script beside this file and must
not import nanogpt_mlx (see its docstring), shares it with `workloads.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Call `fn` `warmup` times untimed, then `runs` times; the seconds of each timed call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
