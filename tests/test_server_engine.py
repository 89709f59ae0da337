"""The continuous-batching engine on its own (no HTTP): batching never changes a sequence's
output, chunked prefill, stop strings, prompt logprobs, cancellation, queue bounds, failures of
the model and of one sequence's output, and the stats records it reports."""

from __future__ import annotations

import asyncio
import threading
import time

import mlx.core as mx
import numpy as np
import pytest

from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.model.generate import generate_tokens
from nanogpt_mlx.model.runner import ModelRunner
from nanogpt_mlx.model.sampling import SamplingParams, log_softmax
from nanogpt_mlx.model.tokenizer import EOT_ID, get_tokenizer
from nanogpt_mlx.server.engine import Engine, OutputProcessor, QueueFullError, SequenceRequest, StepStats

pytestmark = pytest.mark.timeout(600)


def make_engine(checkpoint, runner_wrapper=None, **kw) -> Engine:
    config_len = load_model(checkpoint).config.block_size

    def factory(rows: int):
        runner = ModelRunner(load_model(checkpoint), rows)
        return runner_wrapper(runner) if runner_wrapper else runner

    kw.setdefault("max_batch", 8)
    kw.setdefault("max_queue", 64)
    engine = Engine(factory, get_tokenizer(checkpoint), max_len=config_len, **kw)
    engine.start()
    deadline = time.monotonic() + 300  # bounds a hang only
    while not engine.ready:
        assert engine.state != "failed", engine.failure
        assert time.monotonic() < deadline, "engine did not become ready"
        time.sleep(0.02)
    return engine


async def collect(submission) -> list[dict]:
    """Every sequence's whole result: text, tokens, logprobs, finish_reason, counts."""
    results = [
        dict(text="", tokens=[], logprobs=[], prompt_logprobs=None, finish=None, completion_tokens=0, error=None)
        for _ in submission.sequences
    ]
    async for index, out in submission:
        r = results[index]
        r["text"] += out.text
        r["tokens"] += out.token_ids
        r["logprobs"] += out.logprobs or []
        if out.prompt_logprobs is not None:
            r["prompt_logprobs"] = out.prompt_logprobs
        if out.finish_reason:
            r["finish"] = out.finish_reason
            r["completion_tokens"] = out.completion_tokens
            r["error"] = out.error
    return results


def run(engine: Engine, requests: list[SequenceRequest]) -> list[dict]:
    async def go():
        return await collect(engine.submit(requests))

    return asyncio.run(go())


def greedy(prompt, max_tokens, **kw) -> SequenceRequest:
    return SequenceRequest(prompt=list(prompt), max_tokens=max_tokens, params=SamplingParams(temperature=0.0), **kw)


def reference_greedy(model, prompt, max_tokens) -> list[int]:
    return list(generate_tokens(model, list(prompt), max_tokens, SamplingParams(temperature=0.0), stop_tokens=frozenset({EOT_ID})))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(0, 50000, size=int(n))] for n in rng.integers(1, 60, size=20)]


def test_batched_greedy_equals_the_reference_loop_alone_and_in_a_full_batch(tiny_checkpoint, prompts):
    """20 sequences of different lengths through 4 slots, prefilled 7 tokens a step: every
    one equals `generate_tokens` alone. Rows join, leave and move while others decode."""
    model = load_model(tiny_checkpoint)
    lengths = [5 + (i * 7) % 40 for i in range(len(prompts))]
    expected = [reference_greedy(model, p, n) for p, n in zip(prompts, lengths)]
    moves = []

    def count_moves(runner):
        original = runner.move_row
        runner.move_row = lambda src, dst: (moves.append((src, dst)), original(src, dst))
        return runner

    engine = make_engine(tiny_checkpoint, runner_wrapper=count_moves, max_batch=4, prefill_chunk=7)
    try:
        alone = run(engine, [greedy(prompts[3], lengths[3])])
        assert alone[0]["tokens"] == expected[3]

        async def staggered():
            tasks = []
            for p, n in zip(prompts, lengths):
                tasks.append(asyncio.ensure_future(collect(engine.submit([greedy(p, n)]))))
                await asyncio.sleep(0.003)  # arrivals while others prefill and decode
            return [(await t)[0] for t in tasks]

        together = asyncio.run(staggered())
    finally:
        engine.shutdown()
    for got, want in zip(together, expected):
        assert got["tokens"] == want
        assert got["completion_tokens"] == len(want)
        assert got["finish"] == ("stop" if want[-1] == EOT_ID else "length")
    assert engine.active_count == 0 and engine.waiting_count == 0
    assert len(moves) > 5  # rows really moved under the running sequences


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny_checkpoint, prompts):
    engine = make_engine(tiny_checkpoint, max_batch=8)

    def sampled(seed, **params):
        params.setdefault("temperature", 1.0)
        return SequenceRequest(prompt=prompts[0], max_tokens=20, params=SamplingParams(seed=seed, **params))

    try:
        alone = run(engine, [sampled(42, top_p=0.9, top_k=50, presence_penalty=0.5, frequency_penalty=0.5)])
        crowd = [greedy(p, 20) for p in prompts[1:6]] + [sampled(7, temperature=0.7)]
        batch = run(engine, crowd + [sampled(42, top_p=0.9, top_k=50, presence_penalty=0.5, frequency_penalty=0.5)])
        other_seed = run(engine, [sampled(43)])
    finally:
        engine.shutdown()
    assert batch[-1]["tokens"] == alone[0]["tokens"]
    assert other_seed[0]["tokens"] != alone[0]["tokens"]


def test_a_full_batch_of_mixed_sampling_settings_equals_each_sequence_alone(tiny_checkpoint, prompts):
    """16 seeded sequences with different sampling settings (temperatures, top-p, top-k,
    penalties, greedy, logprobs) are prefilled in one forward and decode together; every one
    draws exactly what it draws alone."""
    settings = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.3, top_k=20),
                dict(temperature=1.0, presence_penalty=0.8, frequency_penalty=0.3), dict(temperature=0.0)]
    requests = [SequenceRequest(prompt=prompts[i], max_tokens=12, ignore_eos=True,
                                params=SamplingParams(seed=100 + i, logprobs=(2 if i % 3 == 0 else None), **settings[i % len(settings)]))
                for i in range(16)]
    batch_sizes = []

    def record_batches(runner):
        original = runner.decode
        runner.decode = lambda tokens, positions: (batch_sizes.append(len(tokens)), original(tokens, positions))[1]
        return runner

    engine = make_engine(tiny_checkpoint, runner_wrapper=record_batches, max_batch=16, prefill_chunk=1024)
    try:
        together = run(engine, requests)
        assert batch_sizes.count(16) >= 11, batch_sizes  # all rows decoded together
        del batch_sizes[:]
        alone = [run(engine, [r])[0] for r in requests]
    finally:
        engine.shutdown()
    assert max(batch_sizes) == 1
    for got, want in zip(together, alone):
        assert got["tokens"] == want["tokens"] and len(got["tokens"]) == 12
        assert [lp.token for lp in got["logprobs"]] == [lp.token for lp in want["logprobs"]]
    assert len({tuple(r["tokens"]) for r in together}) == 16


def test_chunked_prefill_gives_the_same_tokens_as_one_chunk(tiny_checkpoint, prompts):
    long_prompt = [t for p in prompts[:6] for t in p][:100]
    results = []
    for chunk in (256, 9):
        engine = make_engine(tiny_checkpoint, prefill_chunk=chunk)
        try:
            results.append(run(engine, [greedy(long_prompt, 20)])[0]["tokens"])
        finally:
            engine.shutdown()
    assert results[0] == results[1]


def test_a_burst_is_prefilled_in_several_forwards_before_the_next_decode(tiny_checkpoint, prompts):
    """6 prompts arriving together, prefill_chunk 200 in forwards of 40 tokens: all prefilled
    before any decode step, in several forwards, and the first prompts' first tokens reach the
    event loop while later forwards still run."""
    burst = [p for p in prompts if 10 <= len(p) <= 35][:6]
    assert len(burst) == 6 and sum(map(len, burst)) <= 200
    calls: list[tuple[str, float, float]] = []  # (kind, start, end)
    delivered = threading.Event()  # the event loop has received a first token

    def record(runner):
        prefill_many, decode = runner.prefill_many, runner.decode

        def timed_prefill(chunks):
            start = time.monotonic()
            if any(kind == "prefill" for kind, _, _ in calls):
                # Later forwards wait (bounded) for the first forward's tokens to reach the event
                # loop; were they held back until the burst's end, this wait would run out and
                # the ordering assertion below would fail.
                delivered.wait(60)
            out = prefill_many(chunks)
            calls.append(("prefill", start, time.monotonic()))
            return out

        def timed_decode(tokens, positions):
            start = time.monotonic()
            out = decode(tokens, positions)
            calls.append(("decode", start, time.monotonic()))
            return out

        runner.prefill_many, runner.decode = timed_prefill, timed_decode
        return runner

    model = load_model(tiny_checkpoint)
    engine = make_engine(tiny_checkpoint, runner_wrapper=record, max_batch=8, prefill_chunk=200, prefill_forward=40)
    try:
        async def go():
            calls.clear()
            first_token_at: dict[int, float] = {}
            got: list[list[int]] = [[] for _ in burst]
            # one submission, so the engine admits all six in the same step
            async for i, out in engine.submit([greedy(p, 4) for p in burst]):
                if out.token_ids and i not in first_token_at:
                    first_token_at[i] = time.monotonic()
                    delivered.set()
                got[i] += out.token_ids
            return got, first_token_at

        results, first_token_at = asyncio.run(go())
    finally:
        engine.shutdown()
    assert results == [reference_greedy(model, p, 4) for p in burst]
    kinds = [k for k, _, _ in calls]
    first_decode = kinds.index("decode")
    prefills = [c for c in calls[:first_decode] if c[0] == "prefill"]
    assert first_decode == len(prefills) >= 3 and "prefill" not in kinds[first_decode:]
    # the earliest first token arrived before the last forward of the burst ended
    assert min(first_token_at.values()) < prefills[-1][2]


def test_stop_string_cuts_the_text_and_ends_the_sequence(tiny_checkpoint):
    tokenizer = get_tokenizer(tiny_checkpoint)
    prompt = tokenizer.encode("The quick brown fox")
    engine = make_engine(tiny_checkpoint)
    try:
        free = run(engine, [greedy(prompt, 40, ignore_eos=True)])[0]
        text = free["text"]
        assert len(text) > 20
        stop = text[10:13]
        cut = text.index(stop)
        stopped = run(engine, [greedy(prompt, 40, ignore_eos=True, stop=["never-there", stop])])[0]
    finally:
        engine.shutdown()
    assert stopped["text"] == text[:cut]
    assert stopped["finish"] == "stop"
    assert stopped["completion_tokens"] < 40
    assert stopped["tokens"] == free["tokens"][: len(stopped["tokens"])]


def test_prompt_logprobs_match_a_full_forward_pass(tiny_checkpoint, prompts):
    prompt = prompts[5][:40]
    model = load_model(tiny_checkpoint)
    logits = np.array(model(mx.array([prompt]))[0], dtype=np.float32)
    want = log_softmax(logits)
    engine = make_engine(tiny_checkpoint, prefill_chunk=16)  # prompt logprobs across chunk borders
    try:
        echo = SequenceRequest(prompt=prompt, max_tokens=0, params=SamplingParams(temperature=0.0, logprobs=3), prompt_logprobs=3)
        result = run(engine, [echo])[0]
    finally:
        engine.shutdown()
    got = result["prompt_logprobs"]
    assert [e.token for e in got] == prompt
    assert got[0].logprob is None and got[0].top == []
    for i in range(1, len(prompt)):
        assert got[i].logprob == pytest.approx(float(want[i - 1, prompt[i]]), abs=1e-4)
        best = [t for t, _ in got[i].top]
        assert best == list(np.argsort(-want[i - 1])[:3])
    assert result["finish"] == "length" and result["completion_tokens"] == 0 and result["tokens"] == []


def test_generated_logprobs_are_the_models_distribution(tiny_checkpoint, prompts):
    engine = make_engine(tiny_checkpoint)
    try:
        result = run(engine, [SequenceRequest(prompt=prompts[2], max_tokens=5, params=SamplingParams(temperature=0.0, logprobs=2))])[0]
    finally:
        engine.shutdown()
    assert [e.token for e in result["logprobs"]] == result["tokens"]
    for e in result["logprobs"]:
        assert e.top[0][0] == e.token  # greedy picks the most likely token
        assert e.logprob == pytest.approx(e.top[0][1])
        assert e.top[0][1] >= e.top[1][1]


def test_cancel_frees_the_slot_at_the_next_step(full_checkpoint):
    engine = make_engine(full_checkpoint, max_batch=2)
    try:

        async def go():
            submission = engine.submit([greedy([464, 2068], 400, ignore_eos=True)])
            outputs = aiter(submission)
            first = await anext(outputs)
            assert first[1].token_ids  # it is decoding
            assert engine.active_count == 1
            submission.cancel()
            return [out async for _, out in outputs]

        rest = asyncio.run(go())
        assert rest[-1].finish_reason == "abort"
        assert sum(len(o.token_ids) for o in rest) <= 3  # at most the step in flight
        assert engine.active_count == 0
    finally:
        engine.shutdown()


def test_a_full_queue_refuses_at_once(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_batch=1, max_queue=2)
    try:

        async def go():
            # 1 slot + 2 waiting places: 3 sequences fit, a 4th does not.
            first = engine.submit([greedy([1, 2, 3], 100, ignore_eos=True) for _ in range(3)])
            with pytest.raises(QueueFullError):
                engine.submit([greedy([1, 2], 5)])
            first.cancel()
            results = await collect(first)
            return results

        results = asyncio.run(go())
        assert all(r["finish"] in ("abort", "length") for r in results)
    finally:
        engine.shutdown()


class FlakyRunner:
    """Wraps a runner and raises on one decode call, like a failing device would."""

    def __init__(self, runner, fail_on_call: int):
        self.runner = runner
        self.calls = 0
        self.fail_on_call = fail_on_call

    def prefill(self, *a, **kw):
        return self.runner.prefill(*a, **kw)

    def prefill_many(self, chunks):
        return self.runner.prefill_many(chunks)

    def close(self):
        self.runner.close()

    def move_row(self, *a):
        return self.runner.move_row(*a)

    def warm_up(self, rows, prefill_tokens):
        return self.runner.warm_up(rows, prefill_tokens)  # its decodes are not counted

    def decode(self, tokens, positions):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated device failure")
        return self.runner.decode(tokens, positions)


def test_a_failing_step_ends_its_sequences_with_an_error_and_the_engine_keeps_serving(tiny_checkpoint, prompts):
    engine = make_engine(tiny_checkpoint, runner_wrapper=lambda r: FlakyRunner(r, fail_on_call=3))
    try:
        failed = run(engine, [greedy(prompts[0], 10), greedy(prompts[1], 10)])
        after = run(engine, [greedy(prompts[0], 10)])
    finally:
        engine.shutdown()
    assert [r["finish"] for r in failed] == ["error", "error"]
    assert after[0]["finish"] in ("length", "stop") and after[0]["completion_tokens"] >= 1
    assert engine.state == "stopped"


def test_shutdown_ends_running_sequences_with_abort(tiny_checkpoint):
    """drain(0) while two sequences decode and two wait: all four end with "abort". The model is
    held in its first decode until drain() has begun, so no sequence can finish first."""
    decoding, released = threading.Event(), threading.Event()

    def held(runner):
        decode, warm_up, warmed = runner.decode, runner.warm_up, threading.Event()

        def held_decode(tokens, positions):
            if warmed.is_set() and not decoding.is_set():  # the first decode that serves a request
                decoding.set()
                released.wait(60)
            return decode(tokens, positions)

        def counted_warm_up(rows, prefill_tokens):
            warm_up(rows, prefill_tokens)  # its decodes go through held_decode, unheld
            warmed.set()

        runner.decode, runner.warm_up = held_decode, counted_warm_up
        return runner

    engine = make_engine(tiny_checkpoint, runner_wrapper=held, max_batch=2)

    async def go():
        submission = engine.submit([greedy([1, 2, 3], 120, ignore_eos=True) for _ in range(4)])
        assert await asyncio.to_thread(decoding.wait, 60), "no decode step"
        drained = asyncio.ensure_future(engine.drain(timeout=0.0))
        await asyncio.sleep(0)  # drain() runs until its first wait: it has stopped admitting and asked for the aborts
        released.set()
        assert await drained is False
        return await collect(submission)

    try:
        results = asyncio.run(go())
    finally:
        released.set()
        engine.shutdown()
    assert [r["finish"] for r in results] == ["abort"] * 4
    assert all(0 < r["completion_tokens"] < 120 for r in results[:2]) and all(r["completion_tokens"] == 0 for r in results[2:])
    assert engine.idle


class BookkeepingRunner:
    """A stand-in for ModelRunner that remembers which tokens each cache row holds and checks
    every call against that, with logits that depend on a row's whole history. A sequence only
    gets its reference tokens if the engine never mixes up, overwrites or skips a row."""

    vocab_size = 50257

    def __init__(self, rows: int, max_len: int = 128):
        self.rows = [[] for _ in range(rows)]
        self.max_rows = rows
        self.max_len = max_len
        self.moves = 0

    @staticmethod
    def next_token(history: list[int]) -> int:
        return (sum(history) * 31 + len(history) * 7) % 50000

    # A small ramp under the one-hot logit: distinct values keep top-k selection (prompt
    # logprobs) fast, where 50,256 equal ones are argpartition's slowest case.
    RAMP = np.linspace(0.0, 1e-3, vocab_size, dtype=np.float32)

    def _logits(self, history: list[int]) -> np.ndarray:
        logits = self.RAMP.copy()
        logits[self.next_token(history)] = 1.0
        return logits

    def prefill(self, row, tokens, start, all_logits=False):
        assert start == 0 or start == len(self.rows[row]), (row, start, len(self.rows[row]))
        self.rows[row] = self.rows[row][:start] + list(tokens)
        assert len(self.rows[row]) <= self.max_len
        if all_logits:
            return np.stack([self._logits(self.rows[row][: start + i + 1]) for i in range(len(tokens))])
        return self._logits(self.rows[row])

    def prefill_many(self, chunks):
        rows = [c.row for c in chunks]
        assert len(set(rows)) == len(rows), f"two chunks for one row in one call: {rows}"
        return [self.prefill(c.row, c.tokens, c.start, c.all_logits) for c in chunks]

    def decode(self, tokens, positions):
        out = []
        for b, (token, position) in enumerate(zip(tokens, positions)):
            assert position == len(self.rows[b]), (b, position, len(self.rows[b]))
            self.rows[b].append(int(token))
            out.append(self._logits(self.rows[b]))
        return np.stack(out)

    def move_row(self, src, dst):
        self.rows[dst] = list(self.rows[src])
        self.moves += 1

    def warm_up(self, rows, prefill_tokens):
        pass  # no compiled shapes or memory to warm; rows stay empty

    def copy_prefix(self, src, dst, length):
        assert src != dst and 0 < length <= len(self.rows[src]), (src, dst, length, len(self.rows[src]))  # only written positions
        self.rows[dst] = list(self.rows[src][:length])
        self.copies = getattr(self, "copies", 0) + 1

    def close(self):
        pass


def test_rows_stay_consistent_under_random_arrivals_cancellations_and_long_prompts():
    rng = np.random.default_rng(3)
    runners = []

    def factory(rows):
        runners.append(BookkeepingRunner(rows))
        return runners[-1]

    engine = Engine(factory, get_tokenizer(), max_batch=4, max_queue=200, max_len=128, prefill_chunk=6)
    engine.start()
    while not engine.ready:
        time.sleep(0.01)

    def reference(prompt, max_tokens):
        history, out = list(prompt), []
        for _ in range(max_tokens):
            out.append(BookkeepingRunner.next_token(history))
            history.append(out[-1])
        return out

    jobs = [
        ([int(t) for t in rng.integers(0, 50000, size=int(rng.integers(1, 25)))], int(rng.integers(1, 30)), rng.random() < 0.15)
        for _ in range(80)
    ]

    async def one(prompt, max_tokens, cancel):
        submission = engine.submit([greedy(prompt, max_tokens, ignore_eos=True)])
        if cancel:
            await asyncio.sleep(float(rng.random()) * 0.01)
            submission.cancel()
        return (await collect(submission))[0]

    async def go():
        tasks = []
        for job in jobs:
            tasks.append(asyncio.ensure_future(one(*job)))
            await asyncio.sleep(float(rng.random()) * 0.002)
        return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(go())
    finally:
        engine.shutdown()
    for (prompt, max_tokens, cancelled), result in zip(jobs, results):
        want = reference(prompt, max_tokens)
        if result["finish"] == "abort":
            assert cancelled and result["tokens"] == want[: len(result["tokens"])]
        else:
            assert result["tokens"] == want and result["finish"] == "length"
    assert runners[0].moves > 0
    assert engine.active_count == 0


def test_slot_bookkeeping_under_scripted_schedules():
    """Drive the engine step by step (no thread) through random schedules of arrivals and
    cancellations with 2-4 slots, prefill chunks of 2-7 tokens in forwards of 1-7, so holes, moves,
    multi-step prefills, several prefill forwards a step and immediate finishes interleave in every
    order; the slot table's own checks (rows 0..B-1 running, no prefill below B) run at every step."""
    tokenizer = get_tokenizer()

    async def schedule(seed: int) -> int:
        rng = np.random.default_rng(seed)
        max_batch = int(rng.integers(2, 5))
        chunk = int(rng.integers(2, 8))
        engine = Engine(BookkeepingRunner, tokenizer, max_batch=max_batch, max_queue=1000, max_len=128, prefill_chunk=chunk,
                        prefill_forward=int(rng.integers(1, chunk + 1)))
        engine.load()  # driven by hand on this thread: no engine thread
        jobs = []
        for _ in range(60):
            for _ in range(int(rng.poisson(0.8))):
                prompt = [int(t) for t in rng.integers(0, 50000, size=int(rng.integers(1, 20)))]
                max_tokens = int(rng.integers(1, 12))
                submission = engine.submit([greedy(prompt, max_tokens, ignore_eos=True)])
                jobs.append((prompt, max_tokens, submission, asyncio.ensure_future(collect(submission))))
            if jobs and rng.random() < 0.1:
                jobs[int(rng.integers(len(jobs)))][2].cancel()
            engine.step()
            await asyncio.sleep(0)
        await steps_until_idle(engine)
        for prompt, max_tokens, _, task in jobs:
            result = (await task)[0]
            want = bookkeeping_reference(prompt, max_tokens)
            if result["finish"] == "abort":
                assert result["tokens"] == want[: len(result["tokens"])]
            else:
                assert (result["tokens"], result["finish"]) == (want, "length"), seed
        return engine.runner.moves

    moves = sum(asyncio.run(schedule(seed)) for seed in range(80))
    assert moves > 0


def test_prefix_cache_bookkeeping_under_scripted_schedules():
    """The same scripted schedules with prefix caching (1-4 cache rows): prompts built from a few
    shared bases (repeats, extensions of earlier prompts and of their outputs), n > 1, and echo
    requests. The bookkeeping runner's logits depend on a row's whole history, so every token and
    every prompt logprob's alternatives equal the reference only if each copied prefix is exactly
    the tokens the sequence's prompt starts with; copies must read written positions only."""
    tokenizer = get_tokenizer()

    async def schedule(seed: int) -> tuple[int, int]:
        rng = np.random.default_rng(seed)
        max_batch = int(rng.integers(2, 5))
        chunk = int(rng.integers(2, 40))
        engine = Engine(BookkeepingRunner, tokenizer, max_batch=max_batch, max_queue=1000, max_len=128, prefill_chunk=chunk,
                        prefill_forward=int(rng.integers(1, chunk + 1)), prefix_cache_rows=int(rng.integers(1, 5)))
        engine.load()
        bases = [[int(t) for t in rng.integers(0, 50000, size=int(rng.integers(16, 40)))] for _ in range(3)]
        jobs = []

        def more(low: int, high: int) -> list[int]:
            return [int(t) for t in rng.integers(0, 50000, size=int(rng.integers(low, high)))]

        for _ in range(60):
            for _ in range(int(rng.poisson(0.8))):
                done = [(job[0], (await job[4])[0]["tokens"]) for job in jobs if job[4].done()]
                if rng.random() < 0.3 and done:  # an earlier prompt, its output and more: a next turn
                    earlier, output = done[int(rng.integers(len(done)))]
                    prompt = earlier + output + more(1, 5)
                else:
                    base = bases[int(rng.integers(len(bases)))]
                    prompt = base[: int(rng.integers(1, len(base) + 1))] + more(0, 8)
                prompt = prompt[:80]
                max_tokens = int(rng.integers(1, 12))
                n = 3 if rng.random() < 0.15 else 1
                echo = 2 if rng.random() < 0.2 else None
                requests = [greedy(prompt, max_tokens, ignore_eos=True, prompt_logprobs=echo, choice=i) for i in range(n)]
                submission = engine.submit(requests)
                jobs.append((prompt, max_tokens, echo, submission, asyncio.ensure_future(collect(submission))))
            if jobs and rng.random() < 0.05:
                jobs[int(rng.integers(len(jobs)))][3].cancel()
            engine.step()
            await asyncio.sleep(0)
        await steps_until_idle(engine)
        for prompt, max_tokens, echo, _, task in jobs:
            want = bookkeeping_reference(prompt, max_tokens)
            for result in await task:
                if result["finish"] == "abort":
                    assert result["tokens"] == want[: len(result["tokens"])], seed
                    continue
                assert (result["tokens"], result["finish"]) == (want, "length"), seed
                if echo is not None:
                    # position i's top alternative is the runner's next token after tokens 0..i-1
                    tops = [e.top[0][0] for e in result["prompt_logprobs"][1:]]
                    assert tops == [BookkeepingRunner.next_token(prompt[:i]) for i in range(1, len(prompt))], seed
        hits = sum(s.output.cached_tokens or 0 for _, _, _, sub, _ in jobs for s in sub.sequences)
        return hits, getattr(engine.runner, "copies", 0)

    totals = [asyncio.run(schedule(seed)) for seed in range(40)]
    assert sum(h for h, _ in totals) > 0 and sum(c for _, c in totals) > 0


# --- an engine driven by hand (no thread), on the bookkeeping runner ---------------------------------------
def bookkeeping_reference(prompt, max_tokens) -> list[int]:
    history, out = list(prompt), []
    for _ in range(max_tokens):
        out.append(BookkeepingRunner.next_token(history))
        history.append(out[-1])
    return out


async def steps_until_idle(engine: Engine) -> None:
    """Step an engine loaded by hand until nothing waits or runs, letting its outputs be collected."""
    while not engine.idle:
        engine.step()
        await asyncio.sleep(0)


def by_hand(engine: Engine, submit) -> list[list[dict]]:
    """Step `engine` on this thread until it is idle; `submit(engine)` makes the submissions."""

    async def go():
        submissions = submit(engine)
        tasks = [asyncio.ensure_future(collect(s)) for s in submissions]
        await steps_until_idle(engine)
        return [await t for t in tasks]

    return asyncio.run(go())


def test_stats_records_account_for_every_step_token_and_sequence():
    """10 sequences on 3 slots and one cancelled while waiting: the per-step records add up to what
    was generated, each first token is reported no later than its sequence's finish, and the last
    record shows an empty engine."""
    rng = np.random.default_rng(11)
    jobs = [([int(t) for t in rng.integers(0, 50000, size=int(rng.integers(1, 20)))], int(rng.integers(1, 9))) for _ in range(10)]
    records: list[StepStats] = []
    engine = Engine(BookkeepingRunner, get_tokenizer(), max_batch=3, max_queue=100, max_len=128, prefill_chunk=8, prefill_forward=4,
                    stats_callback=records.append)
    engine.load()
    steps = 0
    original_step = engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        original_step()

    engine.step = counted_step

    def submit(engine):
        submissions = [engine.submit([greedy(p, n, ignore_eos=True)]) for p, n in jobs]
        cancelled = engine.submit([greedy([1, 2, 3], 5)])
        cancelled.cancel()  # taken before admission at the first step: it never gets a slot
        return [*submissions, cancelled]

    results = by_hand(engine, submit)
    assert [r[0]["tokens"] for r in results[:-1]] == [bookkeeping_reference(p, n) for p, n in jobs]
    assert results[-1][0]["finish"] == "abort"

    assert len(records) == steps
    total = lambda field: sum(getattr(r, field) for r in records)  # noqa: E731
    every = lambda field: [x for r in records for x in getattr(r, field)]  # noqa: E731
    assert total("generation_tokens") == sum(n for _, n in jobs)
    assert total("prompt_tokens") == total("prefill_tokens") == sum(len(p) for p, _ in jobs)
    assert len(every("queue_times")) == len(every("time_to_first_tokens")) == len(every("prefill_times")) == len(jobs)
    assert len(every("inter_token_latencies")) == sum(n - 1 for _, n in jobs)
    assert all(x >= 0 for f in ("queue_times", "time_to_first_tokens", "prefill_times", "inter_token_latencies") for x in every(f))
    assert max(r.decode_batch_size for r in records) == 3 and total("decode_time") > 0 and total("prefill_time") > 0
    assert all(r.kv_rows_used <= r.running <= 3 and r.step_time >= r.prefill_time + r.decode_time for r in records)
    assert (records[-1].running, records[-1].waiting, records[-1].kv_rows_used) == (0, 0, 0)

    finished = every("finished")
    assert sorted(f.finish_reason for f in finished) == ["abort"] + ["length"] * len(jobs)
    aborted = next(f for f in finished if f.finish_reason == "abort")
    assert (aborted.queue_time, aborted.time_to_first_token, aborted.decode_time, aborted.completion_tokens) == (None, None, None, 0)
    done = [f for f in finished if f.finish_reason == "length"]
    assert sorted((f.prompt_tokens, f.completion_tokens) for f in done) == sorted((len(p), n) for p, n in jobs)
    for f in done:
        assert 0 <= f.queue_time <= f.time_to_first_token <= f.e2e_latency
        assert f.prefill_time == pytest.approx(f.time_to_first_token - f.queue_time) and f.decode_time >= 0
        first_step = next(i for i, r in enumerate(records) if f.time_to_first_token in r.time_to_first_tokens)
        finish_step = next(i for i, r in enumerate(records) if f in r.finished)
        assert first_step <= finish_step


def test_one_sequences_output_failure_ends_it_alone(monkeypatch):
    """A sequence whose sampling fails at its first token (a logit_bias id past the vocabulary) and
    one whose output fails at its fourth token end with finish_reason "error" and the exception in
    `error`; the other sequences of the same batches are untouched and no slot is lost."""
    doomed = greedy([5, 6, 7], 10, ignore_eos=True)
    original = OutputProcessor.accept

    def accept(self, logits, at_context_end):
        if self.request is doomed and self.generated == 3:
            raise ValueError("a broken detokenizer")
        return original(self, logits, at_context_end)

    monkeypatch.setattr(OutputProcessor, "accept", accept)
    bad_bias = SequenceRequest(prompt=[1, 2], max_tokens=5, params=SamplingParams(temperature=0.0, logit_bias={10**6: 1.0}))
    others = [greedy([11 + i, 12, 13 + i], 8, ignore_eos=True) for i in range(4)]
    records: list[StepStats] = []
    engine = Engine(BookkeepingRunner, get_tokenizer(), max_batch=4, max_queue=100, max_len=128, prefill_chunk=16,
                    stats_callback=records.append)
    engine.load()
    results = by_hand(engine, lambda e: [e.submit([others[0], doomed, others[1]]), e.submit([bad_bias, others[2], others[3]])])
    flat = results[0] + results[1]
    for r, req in zip([flat[0], flat[2], flat[4], flat[5]], others):
        assert (r["tokens"], r["finish"]) == (bookkeeping_reference(req.prompt, 8), "length")
    assert flat[1]["finish"] == "error" and flat[1]["tokens"] == bookkeeping_reference(doomed.prompt, 3)
    assert flat[1]["error"] == "ValueError: a broken detokenizer"
    assert flat[3]["finish"] == "error" and flat[3]["tokens"] == [] and flat[3]["error"].startswith("IndexError")
    reasons = sorted(f.finish_reason for r in records for f in r.finished)
    assert reasons == ["error"] * 2 + ["length"] * 4
    assert engine.idle and engine.active_count == 0 and records[-1].kv_rows_used == 0
    again = by_hand(engine, lambda e: [e.submit([greedy([9, 9], 4, ignore_eos=True)])])
    assert again[0][0]["tokens"] == bookkeeping_reference([9, 9], 4)


def test_a_failing_stats_callback_does_not_stop_the_engine():
    def broken(stats):
        raise RuntimeError("a subscriber bug")

    engine = Engine(BookkeepingRunner, get_tokenizer(), max_batch=2, max_queue=10, max_len=128, stats_callback=broken)
    engine.load()
    results = by_hand(engine, lambda e: [e.submit([greedy([3, 4], 6, ignore_eos=True)])])
    assert results[0][0]["tokens"] == bookkeeping_reference([3, 4], 6) and results[0][0]["finish"] == "length"
