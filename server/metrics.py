"""Prometheus metrics of the server, all named `nanogpt_mlx_*`, in one registry per server.

The engine knows nothing of Prometheus: it reports a `StepStats` after every step (with a
`SequenceStats` per finished sequence, server/engine/types.py) to a callback, and
`ServerMetrics.observe_step` is that callback. It runs on the engine thread (prometheus-client's
metrics are thread-safe) and observes each event in the step it happened: queue times when a
sequence gets a slot, time to first token and prefill time at the first token, one inter-token
latency per later token, and the end-to-end and decode times when a sequence finishes. Each
"request" histogram is observed once per generated sequence (a request with `n` = 2 or two
prompts is two sequences). The HTTP layer counts responses and errors.

Every bucket bound lives in `BUCKETS` below, sized for this model on a CPU: inter-token latencies
span one engine step, first tokens and queueing add prompt processing and waiting for a slot,
and whole requests add every token of a completion.

A private `CollectorRegistry` (not prometheus-client's global one) lets several servers live in
one process, as the tests do; it still carries the process and Python platform collectors.

The HTTP middleware (request_log.py) counts every response by route, method and status, and
every 4xx/5xx by status and OpenAI error code, so no error path can be missed.

With `--no-metrics` the engine gets no stats callback, /metrics is a 404, and every family is
replaced by `DISCARD`, which takes the same calls and does nothing (benchmarks/metrics_overhead.py
compares the two).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

if TYPE_CHECKING:
    from nanogpt_mlx.server.engine.types import SequenceStats, StepStats

PREFIX = "nanogpt_mlx"

BUCKETS: dict[str, tuple[float, ...]] = {
    # Time to first token: queueing + prefill + one sampling; from a lone short prompt to a full queue.
    "ttft": (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0),
    # Between two tokens of one sequence: one engine step (decode of the batch + any prefill chunk).
    "itl": (0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0),
    # Whole requests and their decode phase: up to the whole context, one engine step a token.
    "request": (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0),
    # Waiting for a KV-cache slot: zero when the server keeps up.
    "queue": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    # Prefill of one prompt (up to 512 tokens, in chunks interleaved with decode steps).
    "prefill": (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    # Sequences advanced by one decode step (the batch size; --max-batch defaults to 32).
    "batch": (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256),
}


class _Discard:
    """Stands in for every metric when metrics are off: the same calls, no work."""

    def observe(self, value: float) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def labels(self, *values: str, **labels: str) -> _Discard:
        return self


DISCARD = _Discard()


class ServerMetrics:
    def __init__(self, kv_cache_slots: int, registry: CollectorRegistry | None = None, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            self.registry = None
            for name in _FAMILIES:
                setattr(self, name, DISCARD)
            return
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        def histogram(name: str, doc: str, buckets: str, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, registry=r, buckets=BUCKETS[buckets])

        self.time_to_first_token = histogram("time_to_first_token_seconds", "From arrival to the first generated token.", "ttft")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Between consecutive tokens of one sequence.", "itl")
        self.request_latency = histogram("request_duration_seconds", "From arrival to the last token (end to end).", "request")
        self.queue_time = histogram("queue_time_seconds", "From arrival until a KV-cache slot was assigned.", "queue")
        self.prefill_time = histogram("prefill_time_seconds", "From slot assignment to the first token (prompt processing).", "prefill")
        self.decode_time = histogram("decode_time_seconds", "From the first token to the last.", "request")
        self.batch_size = histogram("decode_batch_size", "Sequences advanced by one decode step.", "batch")

        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated.", registry=r)
        # vLLM's names (vllm:prefix_cache_queries / _hits), in tokens: hits / queries is the hit rate.
        self.prefix_cache_queries = Counter(
            f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_cache_hits = Counter(
            f"{PREFIX}_prefix_cache_hits", "Prompt tokens found in the prefix cache (copied, not prefilled).", registry=r
        )
        self.finished = Counter(
            f"{PREFIX}_requests_finished",
            "Sequences finished, by finish_reason (stop, length, abort, error).",
            ["finish_reason"],
            registry=r,
        )
        self.errors = Counter(
            f"{PREFIX}_http_errors", "Error responses, by HTTP status and OpenAI error code.", ["status", "code"], registry=r
        )
        self.http_requests = Counter(
            f"{PREFIX}_http_requests", "HTTP responses, by route template, method and status.", ["route", "method", "status"], registry=r
        )

        self.running = Gauge(f"{PREFIX}_requests_running", "Sequences holding a KV-cache slot (prefilling or decoding).", registry=r)
        self.waiting = Gauge(f"{PREFIX}_requests_waiting", "Sequences waiting for a KV-cache slot.", registry=r)
        self.kv_slots_used = Gauge(f"{PREFIX}_kv_cache_slots_used", "KV-cache slots in use.", registry=r)
        self.kv_slots_total = Gauge(f"{PREFIX}_kv_cache_slots_total", "KV-cache slots (--max-batch).", registry=r)
        self.kv_slots_total.set(kv_cache_slots)
        for reason in ("stop", "length", "abort", "error"):
            self.finished.labels(finish_reason=reason)  # export zeros, so rate() works from the start

    # --- the engine's stats callback -------------------------------------------------------------------
    def observe_step(self, step: StepStats) -> None:
        """Observe one engine step's record (the engine's `stats_callback`)."""
        # A slot is held from admission on (its cache row is assigned when its prefill starts),
        # so slots used = sequences running or prefilling.
        self.running.set(step.running)
        self.kv_slots_used.set(step.running)
        self.waiting.set(step.waiting)
        if step.decode_batch_size:
            self.batch_size.observe(step.decode_batch_size)
        if step.prompt_tokens:
            self.prompt_tokens.inc(step.prompt_tokens)
        if step.generation_tokens:
            self.generation_tokens.inc(step.generation_tokens)
        if step.prefix_cache_queries:
            self.prefix_cache_queries.inc(step.prefix_cache_queries)
        if step.prefix_cache_hits:
            self.prefix_cache_hits.inc(step.prefix_cache_hits)
        for seconds in step.queue_times:
            self.queue_time.observe(seconds)
        for seconds in step.time_to_first_tokens:
            self.time_to_first_token.observe(seconds)
        for seconds in step.prefill_times:
            self.prefill_time.observe(seconds)
        for seconds in step.inter_token_latencies:
            self.inter_token_latency.observe(seconds)
        for finished in step.finished:
            self.observe_finished(finished)

    def observe_finished(self, seq: SequenceStats) -> None:
        """Observe one finished sequence (its first-token and queue times came with their steps)."""
        self.finished.labels(finish_reason=seq.finish_reason).inc()
        self.request_latency.observe(seq.e2e_latency)
        if seq.decode_time is not None:
            self.decode_time.observe(seq.decode_time)

    def count_error(self, status: int, code: str | None) -> None:
        self.errors.labels(status=str(status), code=code or "none").inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        if self.registry is None:
            raise RuntimeError("metrics are disabled")
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# Every metric attribute of ServerMetrics (what DISCARD replaces when metrics are off).
_FAMILIES = (
    "time_to_first_token",
    "inter_token_latency",
    "request_latency",
    "queue_time",
    "prefill_time",
    "decode_time",
    "batch_size",
    "prompt_tokens",
    "generation_tokens",
    "prefix_cache_queries",
    "prefix_cache_hits",
    "finished",
    "errors",
    "http_requests",
    "running",
    "waiting",
    "kv_slots_used",
    "kv_slots_total",
)
