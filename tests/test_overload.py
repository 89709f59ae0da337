"""Overload: 4 x (max batch + max queue) concurrent requests against a real uvicorn (127.0.0.1).

The model is held in its first decode step (as a slow model would be) until every refusal has been
answered, so exactly max batch + max queue requests are admitted whatever the machine's speed:
the excess gets 503 `queue_full` at once with a Retry-After estimated from the queue and the
recent rate of finished sequences (server/engine/types.py, `retry_after_seconds`), and every
admitted request, once the model runs again, completes with exactly its greedy output.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from nanogpt_mlx.server.engine.types import MAX_RETRY_AFTER, RATE_WINDOW, retry_after_seconds

from server_support import ThreadedServer, wait_for

pytestmark = pytest.mark.timeout(600)

MAX_BATCH, MAX_QUEUE = 2, 6
ADMITTED = MAX_BATCH + MAX_QUEUE
REQUESTS = 4 * ADMITTED


def body(i: int) -> dict:
    return {"prompt": f"Request number {i} says", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def test_retry_after_is_the_waiting_queue_over_the_recent_finish_rate():
    now = 1000.0
    # 10 finishes in the last 60 s: 1 every 6 s; 6 waiting -> 36 s
    assert retry_after_seconds(6, [now - 59 + i for i in range(10)], ready_for=3600, now=now) == 36
    # the same finishes, the engine ready for 30 s only: the rate is over 30 s -> 18 s
    assert retry_after_seconds(6, [now - 29 + i for i in range(10)], ready_for=30, now=now) == 18
    assert retry_after_seconds(1, [now - 1] * 100, ready_for=3600, now=now) == 1  # at least 1 s
    assert retry_after_seconds(500, [now - 1], ready_for=3600, now=now) == MAX_RETRY_AFTER  # at most 60 s
    assert retry_after_seconds(6, [now - RATE_WINDOW - 1], ready_for=3600, now=now) == 1  # no recent finish: nothing to go by


def test_four_times_the_capacity_at_once_the_excess_gets_503_and_the_admitted_complete_exactly(tiny_checkpoint):
    expected = {}  # each request alone, on a server of its own
    with ThreadedServer(tiny_checkpoint) as reference, httpx.Client(base_url=reference.base_url, timeout=120) as http:
        for i in range(REQUESTS):
            r = http.post("/v1/completions", json=body(i))
            assert r.status_code == 200, r.text
            expected[i] = r.json()["choices"][0]["text"]

    with ThreadedServer(tiny_checkpoint, max_batch=MAX_BATCH, max_queue=MAX_QUEUE) as server:
        engine = server.ctx.engine
        for i in range(2):  # a few finished sequences: the rate the Retry-After goes by
            assert httpx.post(server.base_url + "/v1/completions", json=body(i), timeout=120).status_code == 200

        runner = engine.runner
        decode = runner.decode
        decoding, released = threading.Event(), threading.Event()

        def held_decode(tokens, positions):  # a model that stalls until the refusals are answered
            decoding.set()
            released.wait(300)
            return decode(tokens, positions)

        runner.decode = held_decode
        finished_at = list(engine._finished_at)
        ready_for = lambda now: now - engine._ready_at  # noqa: E731

        async def overload() -> dict[int, httpx.Response]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
                tasks = {i: asyncio.ensure_future(client.post("/v1/completions", json=body(i))) for i in range(REQUESTS)}
                refused = REQUESTS - ADMITTED
                while sum(t.done() for t in tasks.values()) < refused:  # the refusals come back while the model is held
                    await asyncio.sleep(0.01)
                assert await asyncio.to_thread(decoding.wait, 120), "no decode step"  # the first two are admitted
                health = (await client.get("/health")).json()
                # The first arrival may hold the (stalled) engine alone: then one more waits in its place.
                assert health["running"] >= 1 and health["running"] + health["waiting"] == ADMITTED, health
                assert sum(t.done() for t in tasks.values()) == refused  # nothing admitted has finished
                released.set()
                return {i: await t for i, t in tasks.items()}

        started = time.monotonic()
        answers = asyncio.run(overload())
        ended = time.monotonic()
        runner.decode = decode

        ok = {i: r for i, r in answers.items() if r.status_code == 200}
        refused = {i: r for i, r in answers.items() if r.status_code != 200}
        assert len(ok) == ADMITTED and len(refused) == REQUESTS - ADMITTED
        for i, r in ok.items():
            assert r.json()["choices"][0]["text"] == expected[i], i
            assert r.json()["usage"]["completion_tokens"] == 8
        lowest = retry_after_seconds(MAX_QUEUE, finished_at, ready_for(started), started)
        highest = retry_after_seconds(ADMITTED, finished_at, ready_for(ended), ended)
        for r in refused.values():
            assert r.status_code == 503
            error = r.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "queue_full")
            retry_after = int(r.headers["retry-after"])
            assert 1 <= retry_after <= MAX_RETRY_AFTER
            assert f"retry in {retry_after} s" in error["message"]
            if ended - max(finished_at) < RATE_WINDOW:  # the reference finishes are still the rate's
                assert lowest <= retry_after <= highest, (lowest, retry_after, highest)
        wait_for(lambda: httpx.get(server.base_url + "/health", timeout=30).json()["slots_free"] == MAX_BATCH, "every slot free")
        assert engine.waiting_count == 0
