"""Continuous batching over a `ModelRunner`, on one dedicated thread. No HTTP in here.

A request becomes one *sequence* per choice (prompts x n). Sequences wait in a bounded queue,
get a KV-cache row (slot) as soon as one is free, are prefilled in chunks, then advance one
token per engine step together with every other running sequence:

    step:  take cancellations and arrivals   (a cancelled sequence frees its row here)
           prefill up to `prefill_chunk` prompt tokens (FIFO; a long prompt takes several steps),
           in forwards of up to `prefill_forward` tokens, handing out first tokens after each
           compact the rows, then one batched decode of all running rows and per-row sampling
           detokenize, match stop strings, finish sequences
           hand the outputs to asyncio with one `loop.call_soon_threadsafe` (after each completed
           prefill, so a first token waits for neither the other prefills nor the decode, and
           after the decode)

Row layout: `ModelRunner.decode` advances rows 0..B-1, so at every decode the B running
sequences occupy exactly rows 0..B-1. Finished sequences leave holes; moving a row costs a
copy of its whole cache, so holes are first offered to new sequences whose prompt completes
in this step's prefill (they are prefilled straight into the hole), and only the holes left
after that are filled by moving the highest running rows down.

Prefill is FIFO and the first prompt that does not fit the step's budget takes the rest of it,
so at most one unfinished prefill holds a row at a time. It takes the highest free row, and
the runner has one row more than `max_batch`: together these keep that row at or above B
(no other sequence can start running while it is unfinished, so B cannot grow past it), and
compaction never has to move a prefill out of the way.

Every sequence gets exactly one final output (finish_reason stop, length, abort or error),
whatever happens: cancelled, aborted at shutdown, or the model raised.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np

from nanogpt_mlx.model.runner import PrefillChunk
from nanogpt_mlx.model.sampling import SamplingParams, choose_token, log_softmax, top_logprobs
from nanogpt_mlx.model.tokenizer import EOT_ID, StreamingDetokenizer
from nanogpt_mlx.server.metrics import ServerMetrics
from nanogpt_mlx.server.stop_strings import StopStringMatcher

log = logging.getLogger("nanogpt_mlx.engine")


# --- what goes in and what comes out ---------------------------------------------------------
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
    error: str | None = None  # with finish_reason "error"


class QueueFullError(Exception):
    """The waiting queue has no room for the request's sequences (try again later)."""


class EngineUnavailableError(Exception):
    """The engine is loading, draining for shutdown, or has stopped."""


# --- the asyncio side of a request --------------------------------------------------------------
class Submission:
    """A submitted request's sequences, as seen from the event loop that submitted them.

    Iterate it to receive `(sequence_index, SequenceOutput)` pairs until every sequence has
    finished. `cancel()` (e.g. when the client disconnects) frees their slots at the next step.
    """

    def __init__(self, engine: "Engine", count: int):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, SequenceOutput]] = asyncio.Queue()
        self._unfinished = count
        self.sequences: list[_Sequence] = []

    def __aiter__(self) -> AsyncIterator[tuple[int, SequenceOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, SequenceOutput]]:
        while self._unfinished:
            index, output = await self._queue.get()
            if output.finish_reason is not None:
                self._unfinished -= 1
            yield index, output

    @property
    def finished(self) -> bool:
        return self._unfinished == 0

    def cancel(self) -> None:
        if self._unfinished:
            self._engine.cancel(self)


# --- the engine's view of a sequence --------------------------------------------------------------
WAITING, PREFILLING, RUNNING, DONE = "waiting", "prefilling", "running", "done"


class _Sequence:
    def __init__(self, request: SequenceRequest, submission: Submission, index: int, tokenizer, arrival: float):
        self.request = request
        self.submission = submission
        self.index = index
        self.state = WAITING
        self.row = -1
        self.prefilled = 0  # prompt tokens already in the cache
        self.cached = 0  # tokens in the cache (prompt + generated ones fed back)
        self.last_token = -1  # sampled, not yet in the cache
        self.generated = 0
        self.counts: Counter[int] = Counter()
        self.rng = _rng_for(request)
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.stops = StopStringMatcher(request.stop, include_stop=request.include_stop_str_in_output)
        self.stop_string_hit = False
        self.stop_reason: int | str | None = None
        self.prompt_logprobs: list[TokenLogprob] | None = [] if request.prompt_logprobs is not None else None
        self.arrival = arrival
        self.admitted_at = 0.0
        self.first_token_at = 0.0
        self.last_token_at = 0.0
        self.pending = SequenceOutput()  # accumulates this step's output
        self.has_pending = False


def _rng_for(request: SequenceRequest) -> np.random.Generator:
    """Choice 0 draws like `nanogpt-mlx generate --seed`; other choices get their own stream."""
    seed = request.params.seed
    if seed is None or request.choice == 0:
        return request.params.make_rng()
    return np.random.default_rng([seed, request.choice])


# --- the engine -------------------------------------------------------------------------------
class Engine:
    """Owns the model runner and its thread. `start()`, `submit()`, `drain()`, `shutdown()`.

    runner_factory: builds the `ModelRunner` (loading the model) on the engine thread, so every
    MLX call of the server happens on that one thread.
    """

    def __init__(
        self,
        runner_factory: Callable[[int], object],
        tokenizer,
        max_batch: int,
        max_queue: int,
        max_len: int,
        prefill_chunk: int = 1024,
        prefill_forward: int = 1024,
        metrics: ServerMetrics | None = None,
    ):
        self._runner_factory = runner_factory
        self._tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.prefill_forward = min(prefill_forward, prefill_chunk)
        self.metrics = metrics or ServerMetrics(max_batch)

        self.state = "created"  # created -> loading -> ready -> stopped | failed
        self.failure: str | None = None
        self._accepting = True
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Sequence] = deque()  # guarded by _lock
        self._cancelled: list[Submission] = []  # guarded by _lock
        self._abort_all = False  # guarded by _lock
        self._stop = False  # guarded by _lock
        self._thread: threading.Thread | None = None

        # Owned by the engine thread only.
        self._runner = None
        self._rows: list[_Sequence | None] = [None] * (max_batch + 1)
        self._running = 0  # B: rows 0..B-1 are the running sequences
        self._prefilling: list[_Sequence] = []
        self._outputs: list[_Sequence] = []  # sequences with output pending this step
        self._active = 0  # running + prefilling, readable from any thread

    # --- lifecycle (any thread) -----------------------------------------------------------------
    def start(self) -> None:
        self.state = "loading"
        self._thread = threading.Thread(target=self._main, name="nanogpt-mlx-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self._thread is not None and self._thread.is_alive()

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    @property
    def active_count(self) -> int:
        return self._active

    @property
    def idle(self) -> bool:
        return not self._waiting and self._active == 0

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
        submission = Submission(self, len(requests))
        now = time.monotonic()
        submission.sequences = [_Sequence(r, submission, i, self._tokenizer, now) for i, r in enumerate(requests)]
        with self._wake:
            free_slots = self.max_batch - self._active
            if len(self._waiting) + len(requests) > self.max_queue + max(0, free_slots):
                raise QueueFullError(f"{len(self._waiting)} sequences are already waiting (limit {self.max_queue})")
            for seq in submission.sequences:  # by priority (lower first), FIFO among equals
                at = len(self._waiting)
                while at and self._waiting[at - 1].request.priority > seq.request.priority:
                    at -= 1
                self._waiting.insert(at, seq)
            self.metrics.waiting.set(len(self._waiting))
            self._wake.notify()
        return submission

    def cancel(self, submission: Submission) -> None:
        with self._wake:
            self._cancelled.append(submission)
            self._wake.notify()

    # --- the engine thread --------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._runner = self._runner_factory(self.max_batch + 1)
            self._warm_up()
            self.state = "ready"
            log.info("engine ready: %d slots, context %d, prefill chunk %d", self.max_batch, self.max_len, self.prefill_chunk)
            while True:
                with self._wake:
                    while not (self._stop or self._abort_all or self._cancelled or self._waiting or self._active):
                        self._wake.wait()
                    if self._stop and not self._waiting and not self._active:
                        break
                try:
                    self._step()
                except Exception as exc:  # the model or sampling failed: fail those sequences, keep serving
                    log.exception("engine step failed")
                    self._fail_active(f"{type(exc).__name__}: {exc}")
                self._flush_outputs()
        except BaseException as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.exception("engine thread died")
            self._fail_everything(self.failure)
        else:
            self.state = "stopped"
        finally:
            self._runner.close()

    def _warm_up(self) -> None:
        """One prefill and one decode, so the first request does not pay MLX's first-call costs."""
        self._runner.prefill(0, [EOT_ID] * 8, 0)
        self._runner.decode(np.array([EOT_ID], dtype=np.int32), np.array([8], dtype=np.int32))

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
            self.metrics.waiting.set(len(self._waiting))

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
        self._active = self._running + len(self._prefilling)
        self.metrics.running.set(self._active)
        self.metrics.kv_slots_used.set(self._active)

    def _active_sequences(self) -> list[_Sequence]:
        """Running and prefilling sequences (a prefill gets its row only when it starts)."""
        return [s for s in self._rows if s is not None] + [s for s in self._prefilling if s.row < 0]

    # --- slots ---------------------------------------------------------------------------------------
    def _admit(self, seq: _Sequence, now: float) -> None:
        """Give the sequence a slot; its row is chosen when its prefill starts."""
        seq.state = PREFILLING
        seq.admitted_at = now
        self._prefilling.append(seq)
        self._active += 1
        self.metrics.queue_time.observe(now - seq.arrival)

    def _assign_row(self, seq: _Sequence, completes_now: bool) -> None:
        """A prompt that completes in this step takes the lowest free row (a hole it can run in
        without a move); a longer one the highest, where it is least in the way."""
        free = [r for r, occupant in enumerate(self._rows) if occupant is None]
        seq.row = free[0] if completes_now else free[-1]
        self._rows[seq.row] = seq

    def _start_running(self, seq: _Sequence) -> None:
        """A prefill completed: the sequence decodes from the next compaction on."""
        self._prefilling.remove(seq)
        seq.state = RUNNING
        self._running += 1

    def _move(self, seq: _Sequence, row: int) -> None:
        self._runner.move_row(seq.row, row)
        self._rows[seq.row] = None
        self._rows[row] = seq
        seq.row = row

    def _release(self, seq: _Sequence, finish_reason: str | None = None) -> None:
        """Free the sequence's row (the next compaction closes the hole)."""
        if seq.state == RUNNING:
            self._running -= 1
        elif seq.state == PREFILLING:
            self._prefilling.remove(seq)
        if seq.row >= 0:
            self._rows[seq.row] = None
        self._active -= 1
        if finish_reason is not None:
            self._finish(seq, finish_reason)

    def _compact(self) -> None:
        """Make rows 0..B-1 exactly the running sequences: move running rows above B into holes."""
        B = self._running
        movers = [s for s in self._rows[B:] if s is not None and s.state == RUNNING]
        if not movers:
            return
        holes = [r for r in range(B) if self._rows[r] is None]
        # As many holes as movers, unless an unfinished prefill sat below B (see the module doc).
        assert len(holes) == len(movers), "an unfinished prefill holds a row below B"
        for hole, seq in zip(holes, movers):
            self._move(seq, hole)

    # --- prefill ---------------------------------------------------------------------------------------
    def _prefill(self) -> None:
        """This step's prompt chunks: FIFO, `prefill_chunk` tokens in all (the longest the running
        sequences wait for it), in batched forwards of up to `prefill_forward` tokens each.

        First tokens are handed over after every forward: in a burst of short prompts the first
        ones need not wait for the others, and the last ones do not wait for decode steps in
        between (32 lockstep clients: TTFT p95 ~10% lower with a 1024-token chunk in 512-token
        forwards than with one 512-token forward a step). Since a batched forward splits its rows
        over the CPU streams (ModelRunner.prefill_many), whole 1024-token forwards are the default:
        TTFT p95 median 964 against 1,007 ms in 512-token forwards and 1,042 ms unsplit
        (benchmarks/README.md).
        """
        budget = self.prefill_chunk
        while budget > 0 and self._prefilling:
            budget -= self._prefill_forward(min(budget, self.prefill_forward))
            # Prompts that finished at once freed rows: close the holes before the next forward
            # assigns rows, so each forward starts from the layout a step starts from.
            self._compact()

    def _prefill_forward(self, budget: int) -> int:
        """One batched prefill call over up to `budget` prompt tokens; returns the tokens it took."""
        planned: list[tuple[_Sequence, int, list[int]]] = []
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            prompt = seq.request.prompt
            begin = seq.prefilled
            chunk = prompt[begin : begin + budget]
            budget -= len(chunk)
            if seq.row < 0:
                self._assign_row(seq, completes_now=begin + len(chunk) == len(prompt))
            planned.append((seq, begin, chunk))
        if not planned:
            return budget
        all_logits = self._runner.prefill_many(
            [PrefillChunk(seq.row, chunk, begin, seq.prompt_logprobs is not None) for seq, begin, chunk in planned]
        )
        for (seq, begin, chunk), logits in zip(planned, all_logits):
            prompt = seq.request.prompt
            want_all = seq.prompt_logprobs is not None
            seq.prefilled += len(chunk)
            if want_all:
                self._record_prompt_logprobs(seq, begin, logits)
                logits = logits[-1]
            if seq.prefilled < len(prompt):
                continue
            seq.cached = len(prompt)
            self.metrics.prompt_tokens.inc(len(prompt))
            if seq.prompt_logprobs is not None:
                seq.pending.prompt_logprobs = seq.prompt_logprobs
                self._mark_output(seq)
            if seq.request.max_tokens == 0:
                self._release(seq, "length")
                continue
            finish = self._accept_token(seq, np.array(logits, dtype=np.float32))
            if finish:
                self._release(seq, finish)
            else:
                self._start_running(seq)
        self._flush_outputs()  # first tokens need not wait for this step's decode (TTFT)
        return sum(len(chunk) for _, _, chunk in planned)

    def _record_prompt_logprobs(self, seq: _Sequence, begin: int, logits: np.ndarray) -> None:
        """Logits at position p score prompt token p+1; the prompt's first token has none."""
        prompt, k = seq.request.prompt, seq.request.prompt_logprobs
        if begin == 0:
            seq.prompt_logprobs.append(TokenLogprob(prompt[0], None, []))
        scored = min(len(logits), len(prompt) - begin - 1)  # the chunk's last row may score a generated token
        if scored <= 0:
            return
        logprobs = log_softmax(logits[:scored])
        targets = np.asarray(prompt[begin + 1 : begin + 1 + scored])
        chosen = logprobs[np.arange(scored), targets]
        ranks = 1 + np.count_nonzero(logprobs > chosen[:, None], axis=1)
        for j in range(scored):
            seq.prompt_logprobs.append(TokenLogprob(int(targets[j]), float(chosen[j]), top_logprobs(logprobs[j], k), int(ranks[j])))

    # --- decode ----------------------------------------------------------------------------------------
    def _decode(self) -> None:
        B = self._running
        if B == 0:
            return
        running = self._rows[:B]
        assert all(s is not None and s.state == RUNNING for s in running), "rows 0..B-1 must be the running sequences"
        tokens = np.fromiter((s.last_token for s in running), dtype=np.int32, count=B)
        positions = np.fromiter((s.cached for s in running), dtype=np.int32, count=B)
        logits = self._runner.decode(tokens, positions)
        self.metrics.batch_size.observe(B)
        finished = []
        for b, seq in enumerate(running):
            seq.cached += 1
            finish = self._accept_token(seq, logits[b])
            if finish:
                finished.append((seq, finish))
        for seq, finish in finished:
            self._release(seq, finish)

    # --- one token --------------------------------------------------------------------------------------
    def _accept_token(self, seq: _Sequence, logits: np.ndarray) -> str | None:
        """Sample the next token from `logits` (modified), record it; return a finish_reason or None."""
        request = seq.request
        params = request.params
        raw_logprobs = log_softmax(logits) if params.logprobs is not None else None  # the model's own distribution
        token = choose_token(logits, params, seq.rng, seq.counts)
        seq.counts[token] += 1
        seq.generated += 1
        seq.last_token = token
        now = time.monotonic()
        if seq.generated == 1:
            seq.first_token_at = now
            self.metrics.time_to_first_token.observe(now - seq.arrival)
            self.metrics.prefill_time.observe(now - seq.admitted_at)
        else:
            self.metrics.inter_token_latency.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.generation_tokens.inc()

        out = seq.pending
        out.token_ids.append(token)
        if raw_logprobs is not None:
            if out.logprobs is None:
                out.logprobs = []
            out.logprobs.append(TokenLogprob(token, float(raw_logprobs[token]), top_logprobs(raw_logprobs, params.logprobs)))
        self._mark_output(seq)

        stop_token = (token == EOT_ID and not request.ignore_eos) or token in request.stop_token_ids
        shows_text = token != EOT_ID or not request.skip_special_tokens  # with ignore_eos an EOT may be generated
        if shows_text and (not stop_token or request.include_stop_str_in_output):
            text, hit = seq.stops.feed(seq.detokenizer.add(token), can_stop=seq.generated > request.min_tokens)
            out.text += text
            if hit:
                seq.stop_string_hit = True
                seq.stop_reason = seq.stops.matched
                return "stop"
        if stop_token:
            seq.stop_reason = token if token in request.stop_token_ids else None  # vLLM: None for EOS
            return "stop"
        if seq.generated >= request.max_tokens or seq.cached >= self.max_len:
            return "length"
        return None

    # --- finishing and handing outputs over ---------------------------------------------------------------
    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        out = seq.pending
        if not seq.stop_string_hit:
            # Flush what the detokenizer and the stop matcher still hold (a stop string may
            # complete in the flushed bytes, which ends the text there).
            text, hit = seq.stops.feed(seq.detokenizer.finalize())
            out.text += text if hit else text + seq.stops.flush()
        seq.state = DONE
        out.finish_reason = reason
        out.stop_reason = seq.stop_reason if reason == "stop" else None
        out.error = error
        out.prompt_tokens = len(seq.request.prompt)
        out.completion_tokens = seq.generated
        self._mark_output(seq)
        now = time.monotonic()
        m = self.metrics
        m.finished.labels(finish_reason=reason).inc()
        m.request_latency.observe(now - seq.arrival)
        if seq.generated:
            m.decode_time.observe(now - seq.first_token_at)

    def _mark_output(self, seq: _Sequence) -> None:
        if not seq.has_pending:
            seq.has_pending = True
            self._outputs.append(seq)

    def _flush_outputs(self) -> None:
        """Hand this step's outputs to their event loops, one thread-safe call per loop."""
        if not self._outputs:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Submission, int, SequenceOutput]]] = {}
        for seq in self._outputs:
            by_loop.setdefault(seq.submission._loop, []).append((seq.submission, seq.index, seq.pending))
            seq.pending = SequenceOutput()
            seq.has_pending = False
        self._outputs = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _fail_active(self, message: str) -> None:
        for seq in self._active_sequences():
            self._release(seq)
            self._finish(seq, "error", message)
        self._rows = [None] * len(self._rows)
        self._running = 0
        self._prefilling = []
        self._active = 0
        self.metrics.running.set(0)
        self.metrics.kv_slots_used.set(0)

    def _fail_everything(self, message: str) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), deque()
        for seq in self._active_sequences():
            if seq.row >= 0:
                self._rows[seq.row] = None
            self._finish(seq, "error", message)
        for seq in waiting:
            self._finish(seq, "error", message)
        self._active = 0
        self._flush_outputs()



def _deliver(batch: list[tuple[Submission, int, SequenceOutput]]) -> None:
    for submission, index, output in batch:
        submission._queue.put_nowait((index, output))
