"""What goes into the engine, what comes out of it, and what it reports about itself.

`SequenceRequest` in, `SequenceOutput`s out (through a `Submission`, see loop.py). After every
step the engine hands a `StepStats` to its stats callback, with a `SequenceStats` for each
sequence that finished in that step; the engine itself knows nothing of Prometheus
(server/metrics.py subscribes), as vLLM's scheduler emits `SchedulerStats`/`IterationStats`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from nanogpt_mlx.model.sampling import SamplingParams


# --- structured output -------------------------------------------------------------------------------
class StructureMatcher(Protocol):
    """One sequence's position in the structure its output must follow (server/structured.py's
    `TokenMatcher`): called by the sequence's OutputProcessor once per token."""

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """Set the logit of every token that cannot come next to -inf, in place."""

    def advance(self, token: int) -> None:
        """Move past the sampled token."""

    @property
    def finished(self) -> bool:
        """The structure is complete: nothing can follow it."""


class Structure(Protocol):
    """A compiled structure, shared by a request's sequences; each gets its own matcher."""

    def matcher(self) -> StructureMatcher: ...


# --- in and out ------------------------------------------------------------------------------------
@dataclass
class SequenceRequest:
    """One sequence to generate. The caller has checked len(prompt) + max_tokens <= context."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    prompt_logprobs: int | None = None  # echo + logprobs: logprobs of the prompt, with k alternatives
    choice: int = 0  # index among the request's choices; seeds a distinct stream for n > 1
    # vLLM's extensions (sampling.py masks the stop tokens until min_tokens are generated):
    stop_token_ids: frozenset[int] = frozenset()  # tokens that end generation, besides EOS
    include_stop_str_in_output: bool = False  # keep the stop string / stop token text
    skip_special_tokens: bool = True  # False: a generated <|endoftext|> shows as text
    min_tokens: int = 0  # no stop string (nor stop token) before this many tokens
    priority: int = 0  # admission order: lower first, FIFO among equals
    structure: Structure | None = None  # structured output: what the text must follow (None: free text)


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None  # None for a prompt's first token (nothing precedes it)
    top: list[tuple[int, float]]  # the k most likely alternatives at that position
    rank: int | None = None  # 1 + how many tokens were more likely (prompt logprobs only)


@dataclass
class SequenceOutput:
    """What one sequence produced in one engine step."""

    text: str = ""  # newly released text (stop-string holdback may delay text behind tokens)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when asked
    prompt_logprobs: list[TokenLogprob] | None = None  # once, before any generated token, when asked
    finish_reason: str | None = None  # stop | length | abort | error; set on the last output only
    stop_reason: int | str | None = None  # with "stop": the stop string or stop token id (None for EOS)
    prompt_tokens: int = 0  # set on the last output
    completion_tokens: int = 0  # set on the last output: every generated token, EOT included
    cached_tokens: int | None = None  # set on the last output: prompt tokens reused from the prefix cache (None: caching off)
    error: str | None = None  # with finish_reason "error"


FINISH_REASONS = ("stop", "length", "abort", "error")


# --- errors ------------------------------------------------------------------------------------------
class QueueFullError(Exception):
    """The waiting queue has no room for the request's sequences (try again later)."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after  # seconds: the engine's estimate (retry_after_seconds)


RATE_WINDOW = 60.0  # seconds of finished sequences the Retry-After estimate looks back on
MAX_RETRY_AFTER = 60


def retry_after_seconds(waiting: int, finished_at: list[float], ready_for: float, now: float) -> int:
    """When a refused client should come back: once the sequences waiting now have slots.

    Every finished sequence frees a slot for a waiting one, so the queue drains at the rate
    sequences finished recently: `rate` = finishes in the last RATE_WINDOW seconds (or since
    the engine became ready, `ready_for` seconds ago, if that is shorter) / that window; the
    answer is ceil(waiting / rate), at least 1 and at most MAX_RETRY_AFTER seconds. With no
    finish in the window there is no rate to go by, and the answer is 1.
    """
    window = min(RATE_WINDOW, ready_for)
    finished = sum(1 for t in finished_at if now - t <= window)
    if finished == 0 or window <= 0:
        return 1
    return max(1, min(MAX_RETRY_AFTER, math.ceil(waiting * window / finished)))


class EngineUnavailableError(Exception):
    """The engine is loading, draining for shutdown, or has stopped."""


# --- stats -------------------------------------------------------------------------------------------
@dataclass
class SequenceStats:
    """One finished sequence, from arrival to its final output. Times in seconds (monotonic clock).

    A phase the sequence never reached is None: `queue_time` when it was cancelled while waiting,
    `time_to_first_token`, `prefill_time` and `decode_time` when it generated no token.
    """

    finish_reason: str  # stop | length | abort | error
    prompt_tokens: int
    completion_tokens: int  # every generated token, EOT included
    e2e_latency: float  # arrival -> finished
    queue_time: float | None  # arrival -> got a KV-cache slot
    time_to_first_token: float | None  # arrival -> first token
    prefill_time: float | None  # got a slot -> first token
    decode_time: float | None  # first token -> finished

    @property
    def mean_inter_token_latency(self) -> float | None:
        """The decode time spread over the tokens after the first (the per-token latencies are in
        each step's `StepStats.inter_token_latencies`, observed as they happen)."""
        if self.decode_time is None or self.completion_tokens < 2:
            return None
        return self.decode_time / (self.completion_tokens - 1)


@dataclass
class StepStats:
    """What one engine step did, and the engine's state after it.

    The latency lists hold one entry per event of this step, so a subscriber observes each at the
    step where it happened: a queue time per sequence given a slot, a time to first token and a
    prefill time per first token, an inter-token latency per later token.
    """

    # state after the step
    running: int = 0  # sequences holding a KV-cache slot (prefilling or decoding)
    waiting: int = 0  # sequences waiting for a slot
    kv_rows_used: int = 0  # KV-cache rows held (= running: one row per sequence)
    # work done
    decode_batch_size: int = 0  # rows advanced by this step's batched decode (0: no decode)
    prefill_tokens: int = 0  # prompt tokens run through the model by this step's prefill forwards
    prompt_tokens: int = 0  # prompt tokens of the sequences whose prefill completed in this step
    generation_tokens: int = 0  # tokens sampled (first tokens and decoded ones)
    prefix_cache_queries: int = 0  # prompt tokens of the prefills that looked up the prefix cache (vLLM's counter)
    prefix_cache_hits: int = 0  # of those, tokens found in the cache (copied, not prefilled)
    # timings (seconds)
    step_time: float = 0.0  # the whole step, outputs and sampling included
    prefill_time: float = 0.0  # in the runner's prefill calls
    decode_time: float = 0.0  # in the runner's decode call
    # per-event latencies (seconds)
    queue_times: list[float] = field(default_factory=list)
    time_to_first_tokens: list[float] = field(default_factory=list)
    prefill_times: list[float] = field(default_factory=list)
    inter_token_latencies: list[float] = field(default_factory=list)
    # sequences that finished in this step (including those cancelled while waiting)
    finished: list[SequenceStats] = field(default_factory=list)


StatsCallback = Callable[[StepStats], None]
"""Called on the engine thread after every step (and once more if the thread dies, for the
sequences it ends). Keep it quick; an exception it raises is logged and ignored."""
