"""vLLM's request surface on /v1/completions, through HTTP on a real uvicorn (127.0.0.1): every field
vLLM 0.34.0 accepts is accepted, the ones with a meaning here change the output as they do in
vLLM, the meaningless ones warn once, and explicit nulls mean the defaults."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import threading

import httpx
import pytest

from nanogpt_mlx.model.tokenizer import EOT_ID, get_tokenizer

from server_support import VLLM_COMPLETION_FIELDS, ThreadedServer, stream_chunks, wait_for

pytestmark = pytest.mark.timeout(600)

MODEL = "nanogpt-mlx"


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, max_batch=16, max_queue=64, prefill_chunk=64) as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer(server):
    return get_tokenizer(server.settings.model)


def complete(http: httpx.Client, **body) -> dict:
    body.setdefault("model", MODEL)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


# --- the whole surface ------------------------------------------------------------------------------
def test_every_vllm_field_at_its_default_is_accepted_and_changes_nothing(http):
    plain = complete(http, prompt="Hello", max_tokens=4, temperature=0)
    full = complete(http, **copy.deepcopy(VLLM_COMPLETION_FIELDS))
    assert full["choices"][0]["text"] == plain["choices"][0]["text"]
    assert full["usage"] == plain["usage"]
    assert full["id"] == "cmpl-abc-1"  # request_id names the response


def test_explicit_nulls_mean_the_defaults(http):
    nulls = {k: None for k in VLLM_COMPLETION_FIELDS if k not in ("prompt", "model")}
    body = complete(http, prompt="Hello", **nulls)
    default = complete(http, prompt="Hello", seed=None)
    assert body["usage"]["completion_tokens"] <= 16  # max_tokens null = 16
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    greedy_nulls = complete(http, prompt="Hello", **{**nulls, "temperature": 0})
    greedy = complete(http, prompt="Hello", temperature=0)
    assert greedy_nulls["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert default["usage"]["prompt_tokens"] == body["usage"]["prompt_tokens"]
    # guidellm's body: "stop": null with ignore_eos
    guided = complete(http, prompt="Hello", max_tokens=9, stop=None, ignore_eos=True, stream_options=None)
    assert guided["usage"]["completion_tokens"] == 9


def test_a_field_neither_openai_nor_vllm_knows_is_a_400_naming_it(http):
    error = error_of(http.post("/v1/completions", json={"prompt": "x", "json_schema": {"type": "object"}}))
    assert (error["param"], error["code"]) == ("json_schema", "unknown_parameter")


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_beam_search", True),
        ("bad_words", ["x"]),
        ("logprob_token_ids", [1]),
        ("structured_outputs", {"structural_tag": "{}"}),
        ("response_format", {"type": "structural_tag", "format": {}}),
        ("prompt_embeds", "AAAA"),
        ("suffix", "end"),
        ("watermarking", True),
    ],
)
def test_fields_this_server_cannot_honour_are_refused_when_set(http, field, value):
    error = error_of(http.post("/v1/completions", json={"prompt": "x", field: value}))
    assert (error["param"], error["code"]) == (field, "unsupported_parameter")


def test_ignored_fields_warn_once_per_field_name(http, caplog):
    from nanogpt_mlx.server import protocol

    protocol._warned.discard("kv_transfer_params")
    protocol._warned.discard("session_id")
    with caplog.at_level(logging.WARNING, logger="nanogpt_mlx.server"):
        for _ in range(3):
            complete(http, prompt="x", max_tokens=1, kv_transfer_params={"a": 1}, session_id="s")
    lines = [r.getMessage() for r in caplog.records if "accepted and ignored" in r.getMessage()]
    assert len([line for line in lines if "'kv_transfer_params'" in line]) == 1
    assert len([line for line in lines if "'session_id'" in line]) == 1


# --- sampling ---------------------------------------------------------------------------------------
def test_repetition_penalty_matches_transformers_generate(http, server):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(server.settings.model).eval()
    prompt = [464, 3290, 3290, 318, 257]
    outputs = set()
    for penalty in (1.0, 1.8, 0.7):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=penalty,
                                 pad_token_id=EOT_ID)
        expected = out[0, len(prompt) :].tolist()
        got = complete(http, prompt=prompt, max_tokens=12, temperature=0, repetition_penalty=penalty, ignore_eos=True,
                       return_token_ids=True)
        assert got["choices"][0]["token_ids"] == expected, penalty
        outputs.add(tuple(expected))
    assert len(outputs) == 3  # each penalty changed the output


def test_min_p_keeps_only_tokens_near_the_most_likely(http):
    body = complete(http, prompt="Once upon a", max_tokens=24, temperature=1.0, seed=3, min_p=0.6, logprobs=20, ignore_eos=True)
    lp = body["choices"][0]["logprobs"]
    for chosen, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert chosen >= max(top.values()) + math.log(0.6) - 1e-5
    unrestricted = complete(http, prompt="Once upon a", max_tokens=24, temperature=1.0, seed=3, logprobs=20, ignore_eos=True)
    ulp = unrestricted["choices"][0]["logprobs"]
    assert any(c < max(t.values()) + math.log(0.6) for c, t in zip(ulp["token_logprobs"], ulp["top_logprobs"]))


def test_allowed_token_ids_restrict_every_token(http):
    allowed = [11, 13, 262, 290]
    body = complete(http, prompt="x", max_tokens=20, temperature=1.0, seed=1, allowed_token_ids=allowed, return_token_ids=True)
    assert set(body["choices"][0]["token_ids"]) <= set(allowed)
    assert len(body["choices"][0]["token_ids"]) == 20


def test_logprobs_up_to_the_configured_maximum(http):
    body = complete(http, prompt="Hi", max_tokens=2, logprobs=20, temperature=0)
    assert all(len(top) == 20 for top in body["choices"][0]["logprobs"]["top_logprobs"])
    assert error_of(http.post("/v1/completions", json={"prompt": "Hi", "logprobs": 21}))["param"] == "logprobs"


def test_best_of_returns_the_n_samples_with_the_highest_cumulative_logprob(http):
    args = dict(prompt="The", max_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    samples = complete(http, **args, n=5, logprobs=0)["choices"]  # the same five draws best_of makes
    ranked = sorted(samples, key=lambda c: sum(c["logprobs"]["token_logprobs"]), reverse=True)
    best = complete(http, **args, n=2, best_of=5)
    assert [c["text"] for c in best["choices"]] == [c["text"] for c in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert best["choices"][0]["logprobs"] is None  # not asked for
    assert best["usage"]["completion_tokens"] == 5 * 6  # every sample generated counts


# --- stopping ---------------------------------------------------------------------------------------
def free_tokens(http, prompt="Tell me", n=24) -> list[int]:
    return complete(http, prompt=prompt, max_tokens=n, temperature=0, ignore_eos=True, return_token_ids=True)["choices"][0]["token_ids"]


def test_stop_token_ids_end_generation_without_their_text(http, tokenizer):
    tokens = free_tokens(http)
    stop_at = next(i for i in range(3, len(tokens)) if tokens[i] not in tokens[:i])
    base = dict(prompt="Tell me", max_tokens=24, temperature=0, ignore_eos=True, stop_token_ids=[tokens[stop_at]])
    choice = complete(http, **base, return_token_ids=True)["choices"][0]
    assert choice["token_ids"] == tokens[: stop_at + 1]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", tokens[stop_at])
    assert choice["text"] == tokenizer.decode(tokens[:stop_at])
    kept = complete(http, **base, include_stop_str_in_output=True)
    assert kept["choices"][0]["text"] == tokenizer.decode(tokens[: stop_at + 1])


def test_include_stop_str_in_output_and_stop_reason(http, tokenizer):
    text = tokenizer.decode(free_tokens(http))
    stop = text[10:14]
    start = text.index(stop)
    for include, expected in ((False, text[:start]), (True, text[: start + len(stop)])):
        body = dict(prompt="Tell me", max_tokens=24, temperature=0, ignore_eos=True, stop=stop, include_stop_str_in_output=include)
        choice = complete(http, **body)["choices"][0]
        assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (expected, "stop", stop)
        chunks, done = stream_chunks(http, {"model": MODEL, **body})
        assert done and "".join(c["choices"][0]["text"] for c in chunks) == expected


def test_min_tokens_holds_back_eos_and_stop_strings(http, tokenizer):
    forced_eos = {str(EOT_ID): 100}
    assert complete(http, prompt="x", max_tokens=10, temperature=0, logit_bias=forced_eos)["usage"]["completion_tokens"] == 1
    choice = complete(http, prompt="x", max_tokens=10, temperature=0, logit_bias=forced_eos, min_tokens=5, return_token_ids=True)
    choice = choice["choices"][0]
    assert len(choice["token_ids"]) == 6 and choice["token_ids"][-1] == EOT_ID and EOT_ID not in choice["token_ids"][:5]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None  # EOS

    tokens = free_tokens(http)
    text = tokenizer.decode(tokens)
    stop = tokenizer.decode(tokens[1:2])  # a stop string inside the second token: too early with min_tokens 8
    early = complete(http, prompt="Tell me", max_tokens=24, temperature=0, ignore_eos=True, stop=stop)["choices"][0]
    assert early["text"] == text[: text.index(stop)]
    late = complete(http, prompt="Tell me", max_tokens=24, temperature=0, ignore_eos=True, stop=stop, min_tokens=8, return_token_ids=True)
    late = late["choices"][0]
    assert len(late["token_ids"]) > 8 or late["finish_reason"] == "length"
    assert late["text"].startswith(tokenizer.decode(tokens[:8]))
    assert error_of(http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "min_tokens": 3}))["param"] == "min_tokens"


def test_skip_special_tokens_false_shows_a_generated_eos(http):
    body = dict(prompt="x", max_tokens=3, temperature=0, ignore_eos=True, logit_bias={str(EOT_ID): 100})
    assert complete(http, **body)["choices"][0]["text"] == ""
    assert complete(http, **body, skip_special_tokens=False)["choices"][0]["text"] == "<|endoftext|>" * 3


# --- prompts ----------------------------------------------------------------------------------------
def test_truncate_prompt_tokens_keeps_the_end_or_the_start(http):
    prompt = list(range(1000, 1020))
    left = complete(http, prompt=prompt, max_tokens=5, temperature=0, truncate_prompt_tokens=6)
    assert left["usage"]["prompt_tokens"] == 6
    assert left["choices"][0]["text"] == complete(http, prompt=prompt[-6:], max_tokens=5, temperature=0)["choices"][0]["text"]
    right = complete(http, prompt=prompt, max_tokens=5, temperature=0, truncate_prompt_tokens=6, truncation_side="right",
                     return_token_ids=True)
    assert right["choices"][0]["prompt_token_ids"] == prompt[:6]
    whole = complete(http, prompt=[7] * 200, max_tokens=0, truncate_prompt_tokens=-1)  # -1: the context (128)
    assert whole["usage"]["prompt_tokens"] == 128


def test_prompt_logprobs_in_vllm_shape_agree_with_echo(http, tokenizer):
    text = "The cat sat on the mat"
    tokens = tokenizer.encode(text)
    body = complete(http, prompt=text, max_tokens=0, echo=True, logprobs=2, prompt_logprobs=3)
    choice = body["choices"][0]
    echo = choice["logprobs"]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(tokens) and plp[0] is None
    for i in range(1, len(tokens)):
        entry = plp[i][str(tokens[i])]
        assert entry["logprob"] == pytest.approx(echo["token_logprobs"][i])
        assert entry["decoded_token"] == tokenizer.decode([tokens[i]])
        ranked = sorted(plp[i].values(), key=lambda e: -e["logprob"])
        assert [e["rank"] for e in ranked[:3]] == [1, 2, 3] and len(plp[i]) in (3, 4)
        assert (entry["rank"] == 1) == (entry["logprob"] == max(echo["top_logprobs"][i].values()))
    error = error_of(http.post("/v1/completions", json={"prompt": "x", "prompt_logprobs": 1, "stream": True}))
    assert error["param"] == "prompt_logprobs"


def test_return_token_ids_and_tokens_as_token_ids(http, tokenizer):
    choice = complete(http, prompt="Hello world", max_tokens=5, temperature=0, ignore_eos=True, logprobs=1, return_token_ids=True,
                      return_tokens_as_token_ids=True)["choices"][0]
    assert choice["prompt_token_ids"] == tokenizer.encode("Hello world")
    assert tokenizer.decode(choice["token_ids"]) == choice["text"]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(k.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"] for k in top)
    chunks, _ = stream_chunks(http, {"model": MODEL, "prompt": "Hello world", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                     "return_token_ids": True})
    assert chunks[0]["choices"][0]["prompt_token_ids"] == tokenizer.encode("Hello world")
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == choice["token_ids"]
    plain = complete(http, prompt="Hello world", max_tokens=1)["choices"][0]
    assert "token_ids" not in plain and "prompt_token_ids" not in plain  # vLLM-only fields only when asked


def test_request_id_from_the_body_or_the_x_request_id_header(http):
    assert complete(http, prompt="x", max_tokens=1, request_id="mine")["id"] == "cmpl-mine"
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "request_id": "mine"}, headers={"X-Request-ID": "bench-1"})
    assert r.json()["id"] == "cmpl-bench-1" and r.headers["x-request-id"] == "bench-1"


# --- streaming usage ------------------------------------------------------------------------------
def test_continuous_usage_stats_put_usage_on_every_chunk(http):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks, done = stream_chunks(http, body)
    assert done
    counts = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 8 and counts[0] >= 1
    assert all(c["usage"]["prompt_tokens"] == 1 for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    # as in vLLM, continuous usage needs include_usage
    plain, _ = stream_chunks(http, {**body, "stream_options": {"continuous_usage_stats": True}})
    assert all("usage" not in c for c in plain)


# --- priority ---------------------------------------------------------------------------------------
def test_priority_orders_admission_lower_first(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, max_batch=1, max_queue=8) as s:
        # The holder's decode waits until both others are queued, so it cannot finish first.
        runner = s.ctx.engine.runner
        decode, queued = runner.decode, threading.Event()
        runner.decode = lambda tokens, positions: (queued.wait(120), decode(tokens, positions))[1]

        async def run() -> list[str]:
            order: list[str] = []

            async def one(client, name: str, priority: int, tokens: int, started: asyncio.Event | None = None):
                body = {"model": MODEL, "prompt": name, "max_tokens": tokens, "ignore_eos": True, "stream": True, "priority": priority}
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data:") and "[DONE]" not in line and json.loads(line[5:])["choices"]:
                            if name not in order:
                                order.append(name)
                            if started is not None:
                                started.set()

            async def waiting(count: int):
                await asyncio.to_thread(wait_for, lambda: s.ctx.engine.waiting_count >= count, f"{count} waiting")

            async with httpx.AsyncClient(base_url=s.base_url, timeout=60) as client:
                started = asyncio.Event()
                holder = asyncio.create_task(one(client, "holder", 0, 60, started))
                await started.wait()  # the one slot is taken
                late = asyncio.create_task(one(client, "low", 10, 4))
                await waiting(1)
                early = asyncio.create_task(one(client, "high", -5, 4))
                await waiting(2)
                queued.set()
                await asyncio.gather(holder, late, early)
            return order

        assert asyncio.run(run()) == ["holder", "high", "low"]
