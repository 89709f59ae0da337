"""Automatic prefix caching (server/engine/prefix_cache.py, the engine's lookup and keep in loop.py).

The cache table alone (longest prefix, LRU, a longer sequence replacing its prefix), then over real
uvicorn sockets: a server with the cache and one without it (`--no-prefix-cache`) answer the same
requests (concurrent mixes of shared contexts, extensions of earlier conversations, unique prompts,
n > 1, structured output, echo with logprobs) with the same greedy tokens and logprobs within
1e-5, streaming and not; `usage.prompt_tokens_details.cached_tokens` (httpx and the openai SDK),
the Prometheus counters, and LRU eviction under a one- and a two-row bound.

Prompts are token ids, so their lengths (and the prefixes they share) are exact. The model is the
tiny random checkpoint (128-token context).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import numpy as np
import pytest
from openai import OpenAI

from nanogpt_mlx.server.engine.prefix_cache import PrefixCache, ScoredPrefixes, common_prefix

from server_support import ThreadedServer, metric_value, stream_chunks

pytestmark = pytest.mark.timeout(600)

RNG = np.random.default_rng(18)
CONTEXT = [int(t) for t in RNG.integers(100, 50000, size=60)]  # a shared context (few-shot, a document)
OTHER = [int(t) for t in RNG.integers(100, 50000, size=45)]
LOGPROB_TOL = 1e-5


def ids(n: int) -> list[int]:
    return [int(t) for t in RNG.integers(100, 50000, size=n)]


# --- the table, without a model -------------------------------------------------------------------
def test_common_prefix():
    a = np.array([1, 2, 3, 4])
    assert common_prefix(a, np.array([1, 2, 3, 4])) == 4
    assert common_prefix(a, np.array([1, 2, 9])) == 2
    assert common_prefix(a, np.array([1, 2])) == 2
    assert common_prefix(a, np.array([7])) == 0
    assert common_prefix(a, np.array([], dtype=np.int64)) == 0


def test_longest_prefix_and_lru_eviction():
    cache = PrefixCache(rows=[10, 11])
    assert cache.match([1, 2, 3]) == (-1, 0)
    a = cache.store([1, 2, 3, 4, 5])
    b = cache.store([1, 2, 8, 9])
    assert {a, b} == {10, 11} and len(cache) == 2
    assert cache.match([1, 2, 3, 4, 7]) == (a, 4)  # the longest of the two
    assert cache.match([1, 2, 8, 9, 9]) == (b, 4)  # b is now the most recently used
    assert cache.match([5, 5]) == (-1, 0)
    c = cache.store([6, 6, 6])  # evicts the least recently used: a
    assert c == a and cache.match([1, 2, 3, 4]) == (b, 2)
    assert cache.tokens(a).tolist() == [6, 6, 6]


def test_store_covered_or_extending():
    cache = PrefixCache(rows=[3, 4])
    row = cache.store([1, 2, 3])
    assert cache.store([1, 2]) is None  # inside a cached sequence: nothing to copy
    assert cache.store([1, 2, 3]) is None
    assert cache.store([1, 2, 3, 4, 5]) == row  # extends it: replaces it in its row
    assert len(cache) == 1 and cache.tokens(row).tolist() == [1, 2, 3, 4, 5]
    assert cache.store([]) is None
    other = cache.store([9, 9])
    cache.discard(other)
    assert cache.match([9, 9]) == (-1, 0) and len(cache) == 1
    cache.clear()
    assert len(cache) == 0 and cache.match([1, 2]) == (-1, 0)
    with pytest.raises(ValueError):
        PrefixCache(rows=[])


def test_lru_order_follows_use_not_insertion():
    cache = PrefixCache(rows=[0, 1])
    a = cache.store([1, 1])
    b = cache.store([2, 2])
    cache.match([1, 1, 1])  # a used after b
    assert cache.store([3, 3]) == b
    assert cache.match([1, 1]) == (a, 2)


def test_scored_prefixes_need_enough_alternatives_and_evict_lru():
    scored = ScoredPrefixes(size=2)
    assert scored.match([1, 2], 1) == (0, [])
    scored.store([1, 2, 3], 2, ["a", "b", "c"])
    assert scored.match([1, 2, 9], 1) == (2, ["a", "b"])
    assert scored.match([1, 2, 3, 4], 2) == (3, ["a", "b", "c"])
    assert scored.match([1, 2, 3], 3) == (0, [])  # computed with fewer alternatives than asked
    scored.store([1, 2, 3], 1, ["x", "y", "z"])  # fewer alternatives: the entry with more is kept
    assert scored.match([1, 2, 3], 2) == (3, ["a", "b", "c"])
    scored.store([5, 5], 1, ["p", "q"])
    scored.match([1, 2], 1)  # [1, 2, 3] used after [5, 5]
    scored.store([6, 6], 1, ["r", "s"])  # evicts [5, 5]
    assert len(scored) == 2 and scored.match([5, 5], 1) == (0, []) and scored.match([6, 6], 1) == (2, ["r", "s"])
    with pytest.raises(ValueError):
        scored.store([1, 2], 1, ["only one"])
    scored.clear()
    assert len(scored) == 0


# --- over HTTP: the same answers with and without the cache ---------------------------------------
@pytest.fixture(scope="module")
def cached(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, max_batch=8, max_queue=64, prefix_cache_rows=16) as s:
        yield s


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, max_batch=8, max_queue=64, prefix_cache=False) as s:
        yield s


def post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.base_url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def complete(server, prompt: list[int], stream: bool = False, **extra) -> dict:
    """A greedy completion with logprobs, as one comparable record (streamed chunks joined)."""
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2, "return_tokens_as_token_ids": True, **extra}
    if not stream:
        r = post(server, "/v1/completions", body)
        choices = [(c["index"], c["logprobs"]["tokens"], c["logprobs"]["token_logprobs"]) for c in r["choices"]]
        return {"choices": sorted(choices), "usage": r["usage"]}
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        chunks, done = stream_chunks(client, {**body, "stream_options": {"include_usage": True}})
    assert done
    tokens: dict[int, list] = {}
    logprobs: dict[int, list] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            if c.get("logprobs"):
                tokens.setdefault(c["index"], []).extend(c["logprobs"]["tokens"])
                logprobs.setdefault(c["index"], []).extend(c["logprobs"]["token_logprobs"])
    return {"choices": sorted((i, tokens[i], logprobs[i]) for i in tokens), "usage": chunks[-1]["usage"]}


def assert_same(with_cache: dict, without: dict) -> None:
    assert len(with_cache["choices"]) == len(without["choices"])
    for (i, tokens, lps), (j, want_tokens, want_lps) in zip(with_cache["choices"], without["choices"]):
        assert i == j and tokens == want_tokens
        np.testing.assert_allclose(lps, want_lps, rtol=0, atol=LOGPROB_TOL)
    usage, want = with_cache["usage"], without["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (want["prompt_tokens"], want["completion_tokens"])
    assert "prompt_tokens_details" not in want  # off: today's usage, exactly


def mixed_prompts() -> list[list[int]]:
    """Shared contexts with continuations of different lengths, a repeat, unique prompts, an
    extension of a shared one (a next chat turn), a prompt shorter than the reuse threshold."""
    return [
        CONTEXT + ids(3),
        CONTEXT + ids(9),
        CONTEXT[:30] + ids(20),
        CONTEXT + [7, 8, 9],
        CONTEXT + [7, 8, 9],  # the same prompt twice in one batch
        OTHER + ids(2),
        ids(40),  # unique
        ids(5),  # short and unique
        OTHER + ids(2) + ids(30),
    ]


def run_concurrently(server, prompts: list[list[int]], stream: bool) -> list[dict]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: complete(server, p, stream=stream), prompts))


@pytest.mark.parametrize("stream", [False, True])
def test_mixed_concurrent_batches_match_no_cache(cached, plain, stream):
    prompts = mixed_prompts()
    want = run_concurrently(plain, prompts, stream)
    first = run_concurrently(cached, prompts, stream)  # shares within the batch (and whatever earlier tests left)
    again = run_concurrently(cached, prompts, stream)  # every prompt now has a cached prefix
    for got_first, got_again, expected in zip(first, again, want):
        assert_same(got_first, expected)
        assert_same(got_again, expected)
    for prompt, got in zip(prompts, again):
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt) - 1  # all but the last token
    # Next turns: an earlier prompt + its completion + new tokens reuse the generated tokens' keys too.
    generated = [[int(t.removeprefix("token_id:")) for t in got["choices"][0][1]] for got in first[:3]]
    turns = [prompt + tokens + ids(4) for prompt, tokens in zip(prompts, generated)]
    want_turns = run_concurrently(plain, turns, stream)
    got_turns = run_concurrently(cached, turns, stream)
    for got, expected, prompt in zip(got_turns, want_turns, prompts):
        assert_same(got, expected)
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(prompt) + 7  # the prompt and 7 fed-back tokens


def test_n_prefills_its_prompt_once(cached, plain):
    prompt = ids(50)
    before = httpx.get(cached.base_url + "/metrics").text
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 4, "logprobs": 1}
    got, want = post(cached, "/v1/completions", body), post(plain, "/v1/completions", body)
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
    for c, w in zip(got["choices"], want["choices"]):
        np.testing.assert_allclose(c["logprobs"]["token_logprobs"], w["logprobs"]["token_logprobs"], rtol=0, atol=LOGPROB_TOL)
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # a new prompt: choice 0 prefilled it
    after = httpx.get(cached.base_url + "/metrics").text
    hits = metric_value(after, "nanogpt_mlx_prefix_cache_hits_total") - metric_value(before, "nanogpt_mlx_prefix_cache_hits_total")
    queries = metric_value(after, "nanogpt_mlx_prefix_cache_queries_total") - metric_value(before, "nanogpt_mlx_prefix_cache_queries_total")
    assert queries == 4 * len(prompt)
    assert hits == 3 * (len(prompt) - 1)  # the other three choices copied all but the last token


def echo(server, prompt: list[int], k: int, max_tokens: int = 0) -> dict:
    """lm-eval's loglikelihood request: the prompt's logprobs (echo), k alternatives each."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "echo": True, "logprobs": k, "temperature": 0, "return_tokens_as_token_ids": True}
    return post(server, "/v1/completions", body)


def assert_same_echo(got: dict, want: dict) -> None:
    for c, w in zip(got["choices"], want["choices"], strict=True):
        lp, wlp = c["logprobs"], w["logprobs"]
        assert lp["tokens"] == wlp["tokens"] and lp["token_logprobs"][0] is None
        np.testing.assert_allclose(lp["token_logprobs"][1:], wlp["token_logprobs"][1:], rtol=0, atol=LOGPROB_TOL)
        for top, wtop in zip(lp["top_logprobs"][1:], wlp["top_logprobs"][1:]):
            assert list(top) == list(wtop)  # the same alternatives, in the same order
            np.testing.assert_allclose(list(top.values()), list(wtop.values()), rtol=0, atol=LOGPROB_TOL)


def test_echo_reuses_a_prefix_only_with_its_logprobs(cached, plain):
    context = ids(50)
    complete(cached, context + ids(2))  # the context's keys and values are cached, its logprobs are not
    prompt = context + ids(6)
    got = echo(cached, prompt, 2)
    assert_same_echo(got, echo(plain, prompt, 2))
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # no logprobs known for the context
    again = context + ids(4)
    got = echo(cached, again, 2)  # now they are: keys, values and logprobs of the context reused
    assert_same_echo(got, echo(plain, again, 2))
    # positions 0..48 reused; position 49's logits score the first token after the context
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == len(context) - 1
    got = echo(cached, again, 1, max_tokens=3)  # fewer alternatives, and a completion after the echo
    assert_same_echo(got, echo(plain, again, 1, max_tokens=3))
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == len(again) - 1
    got = echo(cached, again, 4)  # more alternatives than were kept: prefilled in full
    assert_same_echo(got, echo(plain, again, 4))
    assert got["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_lm_eval_multiple_choice_shares_the_context(cached, plain):
    """Four loglikelihood requests on one context, sent together: the context is prefilled once."""
    context = ids(60)
    prompts = [context + ids(3 + i) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: echo(cached, p, 1), prompts))
        want = list(pool.map(lambda p: echo(plain, p, 1), prompts))
    for g, w in zip(got, want):
        assert_same_echo(g, w)
    hits = sorted(g["usage"]["prompt_tokens_details"]["cached_tokens"] for g in got)
    assert hits == [0] + [len(context) - 1] * 3, hits  # the first one prefilled the context, the others waited and copied it


def test_openai_sdk_reports_cached_tokens(cached):
    client = OpenAI(base_url=cached.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    prompt = ids(70)
    first = client.completions.create(model="nanogpt-mlx", prompt=prompt, max_tokens=3, temperature=0)
    second = client.completions.create(model="nanogpt-mlx", prompt=prompt, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == len(prompt) - 1
    assert second.choices[0].text == first.choices[0].text
    messages = [{"role": "system", "content": "You answer in one word. " * 8}, {"role": "user", "content": "Colour of the sky?"}]
    chat1 = client.chat.completions.create(model="nanogpt-mlx", messages=messages, max_tokens=4, temperature=0)
    stream = client.chat.completions.create(
        model="nanogpt-mlx", messages=messages, max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1 > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat1.choices[0].message.content


SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_structured_output_with_a_cached_prefix(cached, plain):
    messages = [{"role": "system", "content": "Reply with a JSON record of a person. " * 4}, {"role": "user", "content": "Ann, 31"}]
    body = {
        "messages": messages,
        "max_tokens": 60,
        "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
    }
    want = post(plain, "/v1/chat/completions", body)
    first = post(cached, "/v1/chat/completions", body)
    again = post(cached, "/v1/chat/completions", body)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    for got in (first, again):
        assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    if want["choices"][0]["finish_reason"] == "stop":
        jsonschema.validate(json.loads(again["choices"][0]["message"]["content"]), SCHEMA)
    # A different question on the same system prompt, constrained, streamed: the system prompt is reused.
    other = {**body, "messages": [messages[0], {"role": "user", "content": "Bob, 7"}], "stream": True,
             "stream_options": {"include_usage": True}}
    streams = []
    for server in (plain, cached):
        with httpx.Client(base_url=server.base_url, timeout=120) as client, client.stream("POST", "/v1/chat/completions", json=other) as r:
            payloads = [line[5:].strip() for line in r.iter_lines() if line.startswith("data:")]
        chunks = [json.loads(p) for p in payloads if p != "[DONE]"]
        streams.append(("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), chunks[-1]["usage"]))
    assert streams[1][0] == streams[0][0]
    assert streams[1][1]["prompt_tokens_details"]["cached_tokens"] >= 30


def test_counters_match_reported_usage(cached):
    before = httpx.get(cached.base_url + "/metrics").text
    prompt = ids(33)
    first = post(cached, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
    second = post(cached, "/v1/completions", {"prompt": prompt + ids(10), "max_tokens": 2, "temperature": 0})
    after = httpx.get(cached.base_url + "/metrics").text

    def delta(name):
        return metric_value(after, name) - metric_value(before, name)

    reported = first["usage"]["prompt_tokens_details"]["cached_tokens"] + second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] >= len(prompt)
    assert delta("nanogpt_mlx_prefix_cache_hits_total") == reported
    assert delta("nanogpt_mlx_prefix_cache_queries_total") == len(prompt) + len(prompt) + 10


def test_no_prefix_cache_counts_nothing(plain):
    prompt = ids(40)
    for _ in range(2):
        r = post(plain, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert "prompt_tokens_details" not in r["usage"]
    metrics = httpx.get(plain.base_url + "/metrics").text
    assert "nanogpt_mlx_prefix_cache_hits_total 0.0" in metrics
    assert metric_value(metrics, "nanogpt_mlx_prefix_cache_queries_total") == 0


# --- eviction -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [1, 2])
def test_lru_eviction_under_a_small_bound(tiny_checkpoint, plain, rows):
    a, b, c = ids(40), ids(40), ids(40)

    def cached_tokens(server, prompt):
        return complete(server, prompt)["usage"]["prompt_tokens_details"]["cached_tokens"]

    with ThreadedServer(tiny_checkpoint, max_batch=2, max_queue=8, prefix_cache_rows=rows) as server:
        assert cached_tokens(server, a) == 0
        assert cached_tokens(server, b) == 0
        if rows == 1:  # b took a's row
            assert cached_tokens(server, a) == 0
            assert cached_tokens(server, a) == len(a) - 1
        else:
            assert cached_tokens(server, a) == len(a) - 1  # a is now more recent than b
            assert cached_tokens(server, c) == 0  # evicts b
            assert cached_tokens(server, b) == 0
            assert cached_tokens(server, c) == len(c) - 1  # b took a's row, c kept its own
        for prompt in (a, b, c):
            assert_same(complete(server, prompt), complete(plain, prompt))


def test_settings_flags_and_environment(monkeypatch):
    import argparse

    from nanogpt_mlx.server.settings import ServerSettings, add_arguments, from_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = from_arguments(parser.parse_args([]))
    assert (defaults.prefix_cache, defaults.prefix_cache_rows) == (True, 32)
    off = from_arguments(parser.parse_args(["--no-prefix-cache", "--prefix-cache-rows", "4"]))
    assert (off.prefix_cache, off.prefix_cache_rows) == (False, 4)
    monkeypatch.setenv("NANOGPT_MLX_PREFIX_CACHE", "false")
    assert ServerSettings().prefix_cache is False
    with pytest.raises(ValueError, match="--prefix-cache-rows"):
        from_arguments(parser.parse_args(["--prefix-cache-rows", "0"]))
