"""The continuous-batching engine: no HTTP, no Prometheus.

    types.py   requests, outputs, errors, and the stats records it reports
    slots.py   the KV-cache row table (plain Python)
    output.py  one sequence's logits -> (structure mask) tokens, text, logprobs, finish reasons
    loop.py    the Engine: its thread, the waiting queue, the step, the lifecycle
    faults.py  tests only: fault injection from NANOGPT_MLX_FAULT_INJECTION
"""

from nanogpt_mlx.server.engine.loop import Engine, Sequence, Submission
from nanogpt_mlx.server.engine.output import OutputProcessor
from nanogpt_mlx.server.engine.slots import SlotTable
from nanogpt_mlx.server.engine.types import (
    FINISH_REASONS,
    EngineUnavailableError,
    QueueFullError,
    SequenceOutput,
    SequenceRequest,
    SequenceStats,
    StatsCallback,
    StepStats,
    Structure,
    StructureMatcher,
    TokenLogprob,
)

__all__ = [
    "FINISH_REASONS",
    "Engine",
    "EngineUnavailableError",
    "OutputProcessor",
    "QueueFullError",
    "Sequence",
    "SequenceOutput",
    "SequenceRequest",
    "SequenceStats",
    "SlotTable",
    "StatsCallback",
    "StepStats",
    "Structure",
    "StructureMatcher",
    "Submission",
    "TokenLogprob",
]
