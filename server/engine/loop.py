"""Continuous batching over a `Runner`, on one dedicated thread. No HTTP, no Prometheus.

A request becomes one *sequence* per choice (prompts x n). Sequences wait in a bounded queue,
get a KV-cache slot as soon as one is free, are prefilled in chunks, then advance one token per
engine step together with every other running sequence:

    step:  take cancellations and arrivals   (a cancelled sequence frees its row here)
           prefill up to `prefill_chunk` prompt tokens (FIFO; a long prompt takes several steps),
           in forwards of up to `prefill_forward` tokens, handing out first tokens after each
           compact the rows, then one batched decode of all running rows
           per sequence: sample, detokenize, match stop strings, finish (output.py)
           hand the outputs to asyncio with one `loop.call_soon_threadsafe` per event loop
           (after each completed prefill forward, so a first token waits for neither the
           other prefills nor the decode, and after the decode)
           report a `StepStats` to the stats callback

Which sequence holds which cache row, and which rows move so that the running sequences are
rows 0..B-1 at every decode, is the `SlotTable`'s business (slots.py).

Prefix caching (`prefix_cache_rows` > 0): the runner gets that many rows more, after the slots'
rows, to keep finished sequences' keys and values in (prefix_cache.py says which tokens each
holds). A prompt starting its prefill copies the longest prefix it shares with a cached row or
with an active sequence's row into its own row and prefills only the rest (always at least its
last token, whose logits give the first token); a prompt that shares more with a prompt being
prefilled right now (the choices of an `n` > 1 request, a burst of requests on one context) waits
for that prefill and then copies it. A prompt that wants its prompt logprobs (echo) reuses a
prefix only as far as earlier prompts' logprobs are known too (prefix_cache.ScoredPrefixes).

Every sequence gets exactly one final output (finish_reason stop, length, abort or error),
whatever happens: cancelled, aborted at shutdown, its own output failed (that sequence alone
ends with "error"), or the model raised (every sequence of the batch ends with "error").
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import numpy as np

from nanogpt_mlx.model.runner import PrefillChunk, Runner
from nanogpt_mlx.server.engine import faults
from nanogpt_mlx.server.engine.output import OutputProcessor
from nanogpt_mlx.server.engine.prefix_cache import PrefixCache, ScoredPrefixes, common_prefix
from nanogpt_mlx.server.engine.slots import SlotTable
from nanogpt_mlx.server.engine.types import (
    RATE_WINDOW,
    EngineUnavailableError,
    QueueFullError,
    SequenceOutput,
    SequenceRequest,
    SequenceStats,
    StatsCallback,
    StepStats,
    retry_after_seconds,
)

log = logging.getLogger("nanogpt_mlx.engine")

# A prefix shorter than this is not worth reusing, nor waiting for, unless it is the whole prompt
# but its last token: a copied prefix makes the prompt's forward attend over the cache (and with
# it the batched forward of every prompt it is prefilled with), which costs more than a few tokens.
MIN_PREFIX = 16


# --- the asyncio side of a request --------------------------------------------------------------
class Submission:
    """A submitted request's sequences, as seen from the event loop that submitted them.

    Iterate it to receive `(sequence_index, SequenceOutput)` pairs until every sequence has
    finished. `cancel()` (e.g. when the client disconnects) frees their slots at the next step.
    """

    def __init__(self, engine: Engine, requests: list[SequenceRequest], tokenizer, arrival: float):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, SequenceOutput]] = asyncio.Queue()
        self._unfinished = len(requests)
        self.sequences: tuple[Sequence, ...] = tuple(Sequence(r, self, i, tokenizer, arrival) for i, r in enumerate(requests))

    def __aiter__(self) -> AsyncIterator[tuple[int, SequenceOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, SequenceOutput]]:
        while self._unfinished:
            index, output = await self._queue.get()
            if output.finish_reason is not None:
                self._unfinished -= 1
            yield index, output

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop that submitted the request (outputs are put on its queue there)."""
        return self._loop

    @property
    def finished(self) -> bool:
        return self._unfinished == 0

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far over all sequences (an int per sequence that only the engine
        thread updates: safe to read from any thread, and final once the request has ended)."""
        return sum(seq.generated for seq in self.sequences)

    def put(self, index: int, output: SequenceOutput) -> None:
        """Hand one output to the iterator. Call on `loop`."""
        self._queue.put_nowait((index, output))

    def cancel(self) -> None:
        if self._unfinished:
            self._engine.cancel(self)


def _deliver(batch: list[tuple[Submission, int, SequenceOutput]]) -> None:
    for submission, index, output in batch:
        submission.put(index, output)


# --- the engine's view of a sequence --------------------------------------------------------------
WAITING, PREFILLING, RUNNING, DONE = "waiting", "prefilling", "running", "done"


class Sequence:
    """One sequence inside the engine: where it is (state, prompt tokens prefilled, tokens in the
    cache), its output processor, and its times. Changed on the engine thread only."""

    def __init__(self, request: SequenceRequest, submission: Submission, index: int, tokenizer, arrival: float):
        self.request = request
        self.submission = submission
        self.index = index
        self.state = WAITING
        self.prefilled = 0  # prompt tokens already in the cache
        self.cached = 0  # tokens in the cache (prompt + generated ones fed back)
        self.output = OutputProcessor(request, tokenizer)
        self.has_output = False  # queued in this step's outputs
        self.arrival = arrival
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.fault: str | None = None  # tests only: the fault injected into it (faults.py)

    @property
    def generated(self) -> int:
        return self.output.generated

    def tokens_in_row(self) -> list[int]:
        """The tokens whose keys and values its cache row holds (positions 0..len-1)."""
        prompt = self.request.prompt
        if self.state == PREFILLING:
            return prompt[: self.prefilled]
        return prompt + self.output.tokens[: self.cached - len(prompt)]  # the last sampled token is not fed back yet


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# --- the engine -------------------------------------------------------------------------------
class Engine:
    """Owns the model runner and its thread. `start()`, `submit()`, `drain()`, `shutdown()`.

    runner_factory: builds the `Runner` (loading the model) for a number of cache rows, on the
    engine thread, so every MLX call of the server happens on that one thread.
    stats_callback: receives a `StepStats` after every step, on the engine thread (types.py).
    """

    def __init__(
        self,
        runner_factory: Callable[[int], Runner],
        tokenizer,
        max_batch: int,
        max_queue: int,
        max_len: int,
        prefill_chunk: int = 1024,
        prefill_forward: int = 1024,
        stats_callback: StatsCallback | None = None,
        prefix_cache_rows: int = 0,
    ):
        self._runner_factory = runner_factory
        self._tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.prefill_forward = min(prefill_forward, prefill_chunk)
        self.prefix_cache_rows = prefix_cache_rows  # 0: no prefix caching
        self._stats_callback = stats_callback
        self._faults = faults.from_environment(tokenizer)  # None unless a test asks (faults.py)

        self.state = "created"  # created -> loading -> ready -> stopped | failed
        self.failure: str | None = None
        self._accepting = True
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[Sequence] = deque()  # guarded by _lock
        self._cancelled: list[Submission] = []  # guarded by _lock
        self._abort_all = False  # guarded by _lock
        self._stop = False  # guarded by _lock
        self._thread: threading.Thread | None = None

        # Owned by the engine thread only. One row more than max_batch: see slots.py.
        self._runner: Runner | None = None
        self._slots: SlotTable[Sequence] = SlotTable(max_batch + 1)
        first_spare = max_batch + 1  # the prefix cache's rows follow the slots' rows
        self._prefix = PrefixCache(range(first_spare, first_spare + prefix_cache_rows)) if prefix_cache_rows > 0 else None
        self._scored = ScoredPrefixes(prefix_cache_rows) if prefix_cache_rows > 0 else None  # prompt logprobs kept
        self._prefilling: list[Sequence] = []  # admitted, prompt not complete (FIFO)
        self._outputs: list[Sequence] = []  # sequences with output pending this step
        self._stats = StepStats()  # this step's, until reported
        self._active = 0  # running + prefilling, readable from any thread
        self._ready_at = 0.0  # when the engine became ready (monotonic)
        self._finished_at: deque[float] = deque(maxlen=4096)  # recent finishes, for retry_after()

    # --- lifecycle (any thread) -----------------------------------------------------------------
    def start(self) -> None:
        self.state = "loading"
        self._thread = threading.Thread(target=self._main, name="nanogpt-mlx-engine", daemon=True)
        self._thread.start()

    def load(self) -> None:
        """Build the runner and warm it up on the calling thread. `start()` does this on the engine
        thread; call it yourself only to drive the engine by hand with `step()` (tests), and then
        make every later call on this thread."""
        self._runner = self._runner_factory(self.max_batch + 1 + self.prefix_cache_rows)
        self._warm_up()
        self._ready_at = time.monotonic()
        self.state = "ready"

    @property
    def ready(self) -> bool:
        """Loaded and serving: on its thread, or loaded by hand (`load()`) and driven by `step()`."""
        return self.state == "ready" and (self._thread is None or self._thread.is_alive())

    @property
    def runner(self) -> Runner | None:
        """The runner once the engine thread has built it (None before). Call it from that thread only."""
        return self._runner

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return self._active

    @property
    def idle(self) -> bool:
        return not self._waiting and self._active == 0

    def retry_after(self) -> int:
        """Seconds a client refused with a full queue should wait (types.retry_after_seconds)."""
        now = time.monotonic()
        finished = [t for t in list(self._finished_at) if now - t <= RATE_WINDOW]  # list(): a snapshot
        return retry_after_seconds(len(self._waiting), finished, now - self._ready_at, now)

    def stop_admitting(self) -> None:
        self._accepting = False

    def abort_all(self) -> None:
        """End every waiting and running sequence at the next step (finish_reason "abort")."""
        with self._wake:
            self._abort_all = True
            self._wake.notify()

    async def drain(self, timeout: float) -> bool:
        """Stop admitting, wait up to `timeout` s for in-flight sequences, abort the rest.

        Returns True if everything finished by itself.
        """
        self.stop_admitting()
        deadline = time.monotonic() + timeout
        while not self.idle and time.monotonic() < deadline and self.ready:
            await asyncio.sleep(0.05)
        finished = self.idle
        if not finished:
            self.abort_all()
            while not self.idle and self._thread is not None and self._thread.is_alive():
                await asyncio.sleep(0.01)
        return finished

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread (after ending any remaining sequences) and wait for it."""
        self._accepting = False
        with self._wake:
            self._abort_all = True
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.state == "ready":
            self.state = "stopped"

    # --- requests (event loop thread) -------------------------------------------------------------
    def submit(self, requests: list[SequenceRequest]) -> Submission:
        """Queue a request's sequences; raises QueueFullError or EngineUnavailableError at once."""
        if not self.ready or not self._accepting:
            reason = "is draining for shutdown" if not self._accepting else self.failure or f"is {self.state}"
            raise EngineUnavailableError(f"the engine {reason}")
        for r in requests:
            if not r.prompt or len(r.prompt) + r.max_tokens > self.max_len:
                raise ValueError(f"prompt of {len(r.prompt)} tokens + max_tokens {r.max_tokens} must be 1..{self.max_len}")
        submission = Submission(self, requests, self._tokenizer, time.monotonic())
        if self._faults is not None:
            self._faults.mark(submission.sequences)
        with self._wake:
            free_slots = self.max_batch - self._active
            if len(self._waiting) + len(requests) > self.max_queue + max(0, free_slots):
                message = f"{len(self._waiting)} sequences are already waiting (limit {self.max_queue})"
                raise QueueFullError(message, self.retry_after())
            for seq in submission.sequences:  # by priority (lower first), FIFO among equals
                at = len(self._waiting)
                while at and self._waiting[at - 1].request.priority > seq.request.priority:
                    at -= 1
                self._waiting.insert(at, seq)
            self._wake.notify()
        return submission

    def cancel(self, submission: Submission) -> None:
        with self._wake:
            self._cancelled.append(submission)
            self._wake.notify()

    # --- the engine thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.load()
            log.info("engine ready: %d slots, context %d, prefill chunk %d", self.max_batch, self.max_len, self.prefill_chunk)
            while True:
                with self._wake:
                    while not (self._stop or self._abort_all or self._cancelled or self._waiting or self._active):
                        self._wake.wait()
                    if self._stop and not self._waiting and not self._active:
                        break
                if self._faults is not None:
                    self._faults.before_step(self)  # tests only: may hold admissions or end this loop
                self.step()
        except BaseException as exc:
            self.failure = _describe(exc)
            self.state = "failed"
            log.exception("engine thread died")
            self._fail_everything(self.failure)
        else:
            self.state = "stopped"
        finally:
            if self._runner is not None:
                self._runner.close()

    def _warm_up(self) -> None:
        """The runner's warm-up with this engine's largest steps (`Runner.warm_up`)."""
        self._runner.warm_up(rows=self.max_batch, prefill_tokens=self.prefill_forward)

    def step(self) -> None:
        """One step, its outputs handed over and its stats reported, whatever the model does.

        The engine thread's loop calls it; call it yourself only on an engine loaded by hand."""
        started = time.perf_counter()
        try:
            self._step()
        except Exception as exc:  # the model failed: fail the active sequences, keep serving
            log.exception("engine step failed")
            self._fail_active(_describe(exc))
        self._flush_outputs()
        self._report(time.perf_counter() - started)

    def _step(self) -> None:
        with self._wake:
            cancelled, self._cancelled = self._cancelled, []
            abort_all, self._abort_all = self._abort_all, False
            if abort_all:
                cancelled.extend({s.submission for s in self._waiting})
                cancelled.extend({s.submission for s in self._active_sequences()})
            for submission in cancelled:
                for seq in submission.sequences:
                    if seq.state == WAITING:
                        self._waiting.remove(seq)
                        self._finish(seq, "abort")
            admitted = []
            while self._waiting and self._active + len(admitted) < self.max_batch:
                admitted.append(self._waiting.popleft())

        for submission in cancelled:
            for seq in submission.sequences:
                if seq.state in (PREFILLING, RUNNING):
                    self._release(seq, "abort")
        now = time.monotonic()
        for seq in admitted:
            self._admit(seq, now)
        self._prefill()
        self._compact()
        self._decode()
        self._active = self._slots.running + len(self._prefilling)

    def _active_sequences(self) -> list[Sequence]:
        """Running and prefilling sequences (a prefill gets its row only when it starts)."""
        return self._slots.items() + [s for s in self._prefilling if self._slots.row(s) < 0]

    # --- slots ---------------------------------------------------------------------------------------
    def _admit(self, seq: Sequence, now: float) -> None:
        """Give the sequence a slot; its row is chosen when its prefill starts."""
        seq.state = PREFILLING
        seq.admitted_at = now
        if self._prefix is not None:
            seq.output.cached_tokens = 0  # until its prefill finds a prefix
        self._prefilling.append(seq)
        self._active += 1
        self._stats.queue_times.append(now - seq.arrival)

    def _start_running(self, seq: Sequence) -> None:
        """A prefill completed: the sequence decodes from the next compaction on."""
        self._prefilling.remove(seq)
        seq.state = RUNNING
        self._slots.start_running(seq)

    def _release(self, seq: Sequence, finish_reason: str | None = None, error: str | None = None) -> None:
        """Free the sequence's slot and row (the next compaction closes the hole), keeping its
        keys and values in the prefix cache first, unless it ended in an error."""
        if self._prefix is not None and finish_reason in ("stop", "length", "abort"):
            self._keep_prefix(seq)
        if seq.state == PREFILLING:
            self._prefilling.remove(seq)
        self._slots.release(seq)
        self._active -= 1
        if finish_reason is not None:
            self._finish(seq, finish_reason, error)

    def _keep_prefix(self, seq: Sequence) -> None:
        """Copy the sequence's tokens' keys and values into a prefix-cache row (LRU)."""
        row = self._slots.row(seq)
        tokens = seq.tokens_in_row()
        if row < 0 or len(tokens) < 2:  # a lone token leaves nothing to reuse (one is always prefilled)
            return
        scored = seq.output.prompt_logprobs_so_far
        if len(scored) >= 2:
            self._scored.store(seq.request.prompt[: len(scored)], seq.request.prompt_logprobs, scored)
        target = self._prefix.store(tokens)
        if target is None:  # already cached
            return
        try:
            self._runner.copy_prefix(row, target, len(tokens))
        except Exception:
            log.exception("copying a finished sequence into the prefix cache failed")
            self._prefix.discard(target)

    def _find_prefix(self, seq: Sequence) -> tuple[int, int]:
        """The row holding the longest prefix of the sequence's prompt (a cached row, or an active
        sequence's), and its length up to all but the last prompt token: (row, length), (-1, 0) if
        none is worth copying."""
        prompt = seq.request.prompt
        limit = len(prompt) - 1
        if limit <= 0:
            return -1, 0
        tokens = np.asarray(prompt, dtype=np.int64)
        row, best = self._prefix.match(tokens)
        for other in self._slots.items():
            if other is not seq:
                n = common_prefix(tokens, np.asarray(other.tokens_in_row(), dtype=np.int64))
                if n > best:
                    row, best = self._slots.row(other), n
        best = min(best, limit)
        return (row, best) if best >= min(MIN_PREFIX, limit) else (-1, 0)

    def _find_scored(self, seq: Sequence) -> tuple[int, list]:
        """For a prompt that wants its prompt logprobs: the longest run of its first tokens whose
        logprobs (with enough alternatives) are known, from an earlier prompt or an active one's."""
        prompt, k = seq.request.prompt, seq.request.prompt_logprobs
        tokens = np.asarray(prompt, dtype=np.int64)
        best, entries = self._scored.match(tokens, k)
        for other in self._slots.items():
            if other is not seq and other.request.prompt_logprobs is not None and other.request.prompt_logprobs >= k:
                known = other.output.prompt_logprobs_so_far
                n = common_prefix(tokens, np.asarray(other.request.prompt[: len(known)], dtype=np.int64))
                if n > best:
                    best, entries = n, known[:n]
        return best, entries

    def _lookup(self, seq: Sequence) -> tuple[int, int, list]:
        """Where to copy the prompt's prefix from: (row, length, the prefix's prompt logprobs if
        it wants them); (-1, 0, []) when nothing is worth copying."""
        source, reused = self._find_prefix(seq)
        if not seq.output.wants_prompt_logprobs or reused == 0:
            return source, reused, []
        # Reusing positions 0..m-1 skips the logits that score tokens 1..m: their logprobs must be known.
        scored, entries = self._find_scored(seq)
        reused = min(reused, scored - 1)
        limit = len(seq.request.prompt) - 1
        if reused < min(MIN_PREFIX, limit):
            return -1, 0, []
        return source, reused, entries[: reused + 1]

    def _worth_waiting(self, seq: Sequence, available: int, prefilling: list[Sequence]) -> bool:
        """Would the sequence gain a longer prefix by waiting for one of these prompts' prefills?"""
        prompt = seq.request.prompt
        limit = len(prompt) - 1
        k = seq.request.prompt_logprobs
        if k is not None:  # only a prompt computing at least as many alternatives helps
            prefilling = [s for s in prefilling if s.request.prompt_logprobs is not None and s.request.prompt_logprobs >= k]
        if limit <= 0 or not prefilling:
            return False
        tokens = np.asarray(prompt, dtype=np.int64)
        shared = max(common_prefix(tokens, np.asarray(other.request.prompt, dtype=np.int64)) for other in prefilling)
        return min(shared, limit) - available >= min(MIN_PREFIX, limit)

    def _compact(self) -> None:
        """Make rows 0..B-1 exactly the running sequences, copying the cache rows that move."""
        for src, dst in self._slots.compact():
            self._runner.move_row(src, dst)

    # --- prefill ---------------------------------------------------------------------------------------
    def _prefill(self) -> None:
        """This step's prompt chunks: FIFO, `prefill_chunk` tokens in all (the longest the running
        sequences wait for it), in batched forwards of up to `prefill_forward` tokens each.

        First tokens are handed over after every forward: in a burst of short prompts the first
        ones need not wait for the others, and the last ones do not wait for decode steps in
        between. A batched forward can split its rows over several CPU streams (the runner's
        `prefill_many`), which is why whole `prefill_chunk`-sized forwards are the default; the
        measured trade-off is in benchmarks/README.md.
        """
        budget = self.prefill_chunk
        while budget > 0 and self._prefilling:
            budget -= self._prefill_forward(min(budget, self.prefill_forward))
            # Prompts that finished at once freed rows: close the holes before the next forward
            # assigns rows, so each forward starts from the layout a step starts from.
            self._compact()

    def _prefill_forward(self, budget: int) -> int:
        """One batched prefill call over up to `budget` prompt tokens; returns the tokens it took."""
        planned: list[tuple[Sequence, int, list[int], int]] = []  # (sequence, start, tokens, row)
        # An unfinished prefill (holding a row) goes first: were a prompt that waits for another's
        # prefill (below) to let a later one past it, two unfinished prefills could hold rows (slots.py).
        for seq in sorted(self._prefilling, key=lambda s: self._slots.row(s) < 0):
            if budget <= 0:
                break
            prompt = seq.request.prompt
            row = self._slots.row(seq)
            source, reused = -1, 0
            looks_up = row < 0 and self._prefix is not None
            if looks_up:
                source, reused, scored = self._lookup(seq)
                if self._worth_waiting(seq, reused, [s for s, _, _, _ in planned]):
                    continue  # prefilled by a later forward, copying the prefix this one writes
                seq.prefilled = reused
                if scored:
                    seq.output.reuse_prompt_logprobs(scored)
            begin = seq.prefilled
            chunk = prompt[begin : begin + budget]
            budget -= len(chunk)
            if row < 0:
                row = self._slots.assign(seq, completes_now=begin + len(chunk) == len(prompt))
            if looks_up:
                self._stats.prefix_cache_queries += len(prompt)
                self._stats.prefix_cache_hits += reused
                seq.output.cached_tokens = reused
                if reused:
                    self._runner.copy_prefix(source, row, reused)
            planned.append((seq, begin, chunk, row))
        if not planned:
            return budget
        started = time.perf_counter()
        all_logits = self._runner.prefill_many(
            [PrefillChunk(row, chunk, begin, seq.output.wants_prompt_logprobs) for seq, begin, chunk, row in planned]
        )
        self._stats.prefill_time += time.perf_counter() - started
        taken = sum(len(chunk) for _, _, chunk, _ in planned)
        self._stats.prefill_tokens += taken
        for (seq, begin, chunk, _), logits in zip(planned, all_logits):
            seq.prefilled += len(chunk)
            try:
                finish = self._prompt_chunk_done(seq, begin, logits)
            except Exception as exc:  # this sequence's output failed: end it alone
                self._sequence_failed(seq, exc)
                continue
            if finish is not None:
                self._release(seq, finish)
            elif seq.prefilled == len(seq.request.prompt):
                self._start_running(seq)
        self._flush_outputs()  # first tokens need not wait for this step's decode (TTFT)
        return taken

    def _prompt_chunk_done(self, seq: Sequence, begin: int, logits: np.ndarray) -> str | None:
        """A chunk of the prompt is in the cache: its logprobs, and once the prompt is complete the
        first token. Returns a finish_reason if the sequence ends here."""
        output = seq.output
        if output.wants_prompt_logprobs:
            output.add_prompt_logits(begin, logits)
            logits = logits[-1]
        prompt = seq.request.prompt
        if seq.prefilled < len(prompt):
            return None
        seq.cached = len(prompt)
        self._stats.prompt_tokens += len(prompt)
        if output.prompt_done():
            self._mark_output(seq)
        if seq.request.max_tokens == 0:
            return "length"
        return self._accept_token(seq, np.array(logits, dtype=np.float32))

    # --- decode ----------------------------------------------------------------------------------------
    def _decode(self) -> None:
        B = self._slots.running
        if B == 0:
            return
        running = self._slots.running_rows()
        tokens = np.fromiter((s.output.last_token for s in running), dtype=np.int32, count=B)
        positions = np.fromiter((s.cached for s in running), dtype=np.int32, count=B)
        started = time.perf_counter()
        logits = self._runner.decode(tokens, positions)
        self._stats.decode_time += time.perf_counter() - started
        self._stats.decode_batch_size = B
        ended: list[tuple[Sequence, str]] = []
        failed: list[tuple[Sequence, Exception]] = []
        for b, seq in enumerate(running):
            seq.cached += 1
            try:
                finish = self._accept_token(seq, logits[b])
            except Exception as exc:  # this sequence's output failed: end it alone
                failed.append((seq, exc))
                continue
            if finish:
                ended.append((seq, finish))
        for seq, finish in ended:
            self._release(seq, finish)
        for seq, exc in failed:
            self._sequence_failed(seq, exc)

    # --- one token --------------------------------------------------------------------------------------
    def _accept_token(self, seq: Sequence, logits: np.ndarray) -> str | None:
        """Sample the sequence's next token (output.py) and time it; return a finish_reason or None."""
        if seq.fault is not None:
            self._faults.on_token(seq)  # tests only: may raise, as a failing output step would
        finish = seq.output.accept(logits, at_context_end=seq.cached >= self.max_len)
        now = time.monotonic()
        stats = self._stats
        if seq.first_token_at is None:
            seq.first_token_at = now
            stats.time_to_first_tokens.append(now - seq.arrival)
            stats.prefill_times.append(now - seq.admitted_at)
        else:
            stats.inter_token_latencies.append(now - seq.last_token_at)
        seq.last_token_at = now
        stats.generation_tokens += 1
        self._mark_output(seq)
        return finish

    # --- finishing and handing outputs over ---------------------------------------------------------------
    def _sequence_failed(self, seq: Sequence, exc: Exception) -> None:
        log.error("sequence %d of a request failed; ending it alone", seq.index, exc_info=exc)
        self._release(seq, "error", _describe(exc))

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        try:
            seq.output.finish(reason, error)
        except Exception as exc:  # e.g. the detokenizer's flush: end with an error instead
            log.error("finishing sequence %d of a request failed", seq.index, exc_info=exc)
            reason, error = "error", _describe(exc)
            seq.output.finish(reason, error)
        seq.state = DONE
        self._mark_output(seq)
        now = time.monotonic()
        self._finished_at.append(now)
        admitted, first = seq.admitted_at, seq.first_token_at
        self._stats.finished.append(
            SequenceStats(
                finish_reason=reason,
                prompt_tokens=len(seq.request.prompt),
                completion_tokens=seq.generated,
                e2e_latency=now - seq.arrival,
                queue_time=None if admitted is None else admitted - seq.arrival,
                time_to_first_token=None if first is None else first - seq.arrival,
                prefill_time=None if first is None or admitted is None else first - admitted,
                decode_time=None if first is None else now - first,
            )
        )

    def _mark_output(self, seq: Sequence) -> None:
        if not seq.has_output:
            seq.has_output = True
            self._outputs.append(seq)

    def _flush_outputs(self) -> None:
        """Hand this step's outputs to their event loops, one thread-safe call per loop."""
        if not self._outputs:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Submission, int, SequenceOutput]]] = {}
        for seq in self._outputs:
            by_loop.setdefault(seq.submission.loop, []).append((seq.submission, seq.index, seq.output.take()))
            seq.has_output = False
        self._outputs = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _report(self, step_time: float) -> None:
        """Hand this step's stats, with the state after it, to the stats callback."""
        stats, self._stats = self._stats, StepStats()
        if self._stats_callback is None:
            return
        stats.step_time = step_time
        stats.running = self._active
        stats.waiting = len(self._waiting)
        stats.kv_rows_used = self._slots.used
        try:
            self._stats_callback(stats)
        except Exception:
            log.exception("the stats callback failed")

    def _fail_active(self, message: str) -> None:
        for seq in self._active_sequences():
            self._release(seq, "error", message)
        if self._prefix is not None:  # the model failed mid-way: trust no row it may have written
            self._prefix.clear()
            self._scored.clear()
        self._slots.clear()
        self._prefilling = []
        self._active = 0

    def _fail_everything(self, message: str) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in self._active_sequences():
            self._finish(seq, "error", message)
        for seq in waiting:
            self._finish(seq, "error", message)
        self._slots.clear()
        self._prefilling = []
        self._active = 0
        self._flush_outputs()
        self._report(0.0)
