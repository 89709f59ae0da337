"""The HTTP API on a real uvicorn (127.0.0.1, a free port), driven by real clients: the `openai`
SDK, `curl -N`, and httpx for every bad input. A tiny random model keeps it fast."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import httpx
import mlx.core as mx
import numpy as np
import pytest

from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.model.sampling import log_softmax
from nanogpt_mlx.model.tokenizer import get_tokenizer

from server_support import ThreadedServer, metric_value, sse_payloads, stream_chunks

pytestmark = pytest.mark.timeout(600)

MODEL = "nanogpt-mlx"
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, max_batch=16, max_queue=64, max_body_bytes=BODY_LIMIT, prefill_chunk=64) as s:
        yield s


def complete(http: httpx.Client, **body) -> dict:
    body.setdefault("model", MODEL)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# --- the openai SDK ----------------------------------------------------------------------------------
def test_sdk_plain_completion_counts_usage_exactly(sdk, server):
    tokenizer = get_tokenizer(server.settings.model)
    resp = sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    choice = resp.choices[0]
    assert choice.index == 0 and choice.finish_reason in ("length", "stop")
    assert resp.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))
    assert 1 <= resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_sdk_batched_prompts_and_n(sdk, server):
    tokenizer = get_tokenizer(server.settings.model)
    words = ["The cat", "A dog", "Birds"]
    for prompts, prompt_tokens in [(words, sum(len(tokenizer.encode(w)) for w in words)), ([[464, 3797], [32, 3290, 318]], 2 + 3)]:
        resp = sdk.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
        assert [c.index for c in resp.choices] == list(range(len(prompts)))
        for i, p in enumerate(prompts):
            alone = sdk.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
            assert resp.choices[i].text == alone.choices[0].text
        assert resp.usage.prompt_tokens == prompt_tokens

    two = sdk.completions.create(model=MODEL, prompt=["x", "y"], n=2, max_tokens=8, temperature=1.0, seed=5)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text != two.choices[1].text  # n samples are distinct draws


def test_sdk_streaming_equals_non_streaming(sdk):
    args = dict(model=MODEL, prompt="In the beginning", max_tokens=30, temperature=0)
    whole = sdk.completions.create(**args)
    chunks = list(sdk.completions.create(**args, stream=True))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_sdk_streaming_include_usage(sdk):
    chunks = list(
        sdk.completions.create(
            model=MODEL, prompt="Hello", max_tokens=7, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == 1
    assert usage_chunk.usage.completion_tokens == 7 or chunks[-2].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_with_stop_logprobs_and_echo_equals_non_streaming(http):
    base = dict(prompt="To be or not", max_tokens=40, temperature=0, ignore_eos=True)
    free = complete(http, **base)["choices"][0]["text"]
    stop = free[8:11]
    body = dict(base, stop=[stop, "zzzz"], logprobs=2, echo=True)
    whole = complete(http, **body)["choices"][0]
    chunks, done = stream_chunks(http, body)
    assert done
    assert whole["text"] == "To be or not" + free[: free.index(stop)]
    assert whole["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    streamed = {k: sum((c["choices"][0]["logprobs"][k] for c in chunks if c["choices"][0]["logprobs"]), []) for k in whole["logprobs"]}
    assert streamed == whole["logprobs"]


# --- echo and logprobs (what lm-evaluation-harness sends) ---------------------------------------------------
def test_echo_with_max_tokens_zero_returns_the_prompt_logprobs(http, server):
    checkpoint = server.settings.model
    tokenizer = get_tokenizer(checkpoint)
    text = "The capital of France is Paris"
    tokens = tokenizer.encode(text)
    body = complete(http, prompt=text, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == text
    assert lp["tokens"] == [tokenizer.decode([t]) for t in tokens]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [len(tokenizer.decode(tokens[:i])) for i in range(len(tokens))]
    want = log_softmax(np.array(load_model(checkpoint)(mx.array([tokens]))[0], dtype=np.float32))
    for i in range(1, len(tokens)):
        assert lp["token_logprobs"][i] == pytest.approx(float(want[i - 1, tokens[i]]), abs=1e-4)
        assert len(lp["top_logprobs"][i]) == 1
    n = len(tokens)
    details = body["usage"].pop("prompt_tokens_details")  # the prefix cache is on by default
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n} and 0 <= details["cached_tokens"] < n


def test_logprobs_of_generated_tokens(http):
    choice = complete(http, prompt="Numbers: 1, 2, 3,", max_tokens=5, logprobs=3, temperature=0, ignore_eos=True)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 5
    assert "".join(lp["tokens"]) == choice["text"] or any(t.startswith("bytes:") for t in lp["tokens"])
    assert lp["text_offset"][0] == 0
    for logprob, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) == 3 and logprob <= 0
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely


# --- determinism ----------------------------------------------------------------------------------------
def test_temperature_zero_and_seeds_are_deterministic(http):
    greedy = [complete(http, prompt="Determinism", max_tokens=20, temperature=0)["choices"][0]["text"] for _ in range(2)]
    assert greedy[0] == greedy[1]
    seeded = [complete(http, prompt="Determinism", max_tokens=20, temperature=1.0, seed=1234)["choices"][0]["text"] for _ in range(2)]
    assert seeded[0] == seeded[1]
    other = complete(http, prompt="Determinism", max_tokens=20, temperature=1.0, seed=1235)["choices"][0]["text"]
    assert other != seeded[0]


def test_logit_bias_and_penalties_are_applied(http, server):
    tokenizer = get_tokenizer(server.settings.model)
    forced = tokenizer.encode(" banana")[0]
    body = {"prompt": "Fruit:", "max_tokens": 4, "temperature": 0, "logit_bias": {str(forced): 100}, "frequency_penalty": 0.0}
    choice = complete(http, **body)["choices"][0]
    assert choice["text"] == " banana" * 4
    penalized = complete(
        http, prompt="Fruit:", max_tokens=4, temperature=0, logit_bias={str(forced): 5}, presence_penalty=2.0, frequency_penalty=2.0
    )
    assert penalized["choices"][0]["text"].count(" banana") < 4


# --- concurrency --------------------------------------------------------------------------------------
def test_twenty_concurrent_streams_each_equal_their_result_alone(http, server):
    prompts = [f"Story number {i}: once" for i in range(20)]
    lengths = [8 + (i * 5) % 30 for i in range(20)]
    alone = [complete(http, prompt=p, max_tokens=n, temperature=0, ignore_eos=True)["choices"][0]["text"] for p, n in zip(prompts, lengths)]

    async def one(client: httpx.AsyncClient, prompt: str, n: int) -> tuple[str, bool, int]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            payloads = sse_payloads([line async for line in r.aiter_lines()])
        chunks = [json.loads(p) for p in payloads if p != "[DONE]"]
        return "".join(c["choices"][0]["text"] for c in chunks), payloads[-1] == "[DONE]", len(chunks)

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths)))

    results = asyncio.run(all_at_once())
    assert [r[0] for r in results] == alone
    assert all(done for _, done, _ in results)
    metrics = http.get("/metrics").text
    assert metric_value(metrics, "nanogpt_mlx_decode_batch_size_count") > 0
    assert server.ctx.engine.active_count == 0


# --- curl -----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_server_sent_events(http, server):
    body = {"model": MODEL, "prompt": "Hello from curl", "max_tokens": 10, "temperature": 0, "stream": True}
    proc = subprocess.run(
        [
            "curl",
            "-sN",
            "--max-time",
            "300",
            server.base_url + "/v1/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=330,  # bounds a hang only
    )
    assert proc.returncode == 0, proc.stderr
    payloads = sse_payloads(proc.stdout.splitlines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == complete(http, **{k: v for k, v in body.items() if k != "stream"})["choices"][0]["text"]


# --- bad input: every one answered in OpenAI's error shape -----------------------------------------------
@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"prompt": "x", "temperature": "hot"}, "temperature", "invalid_value"),
        ({"prompt": "x", "temperature": -1}, "temperature", "invalid_value"),
        ({"prompt": "x", "top_p": 1.5}, "top_p", "invalid_value"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "invalid_value"),
        ({"prompt": "x", "n": 0}, "n", "invalid_value"),
        ({"prompt": "x", "n": 1000}, "n", "invalid_value"),
        ({"prompt": "x", "max_tokens": -5}, "max_tokens", "invalid_value"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({"prompt": "x", "logit_bias": {"not-a-token": 1}}, "logit_bias", "invalid_value"),
        ({"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias", "invalid_value"),
        ({"prompt": []}, "prompt", "invalid_value"),
        ({"prompt": [50257]}, "prompt", "invalid_value"),
        ({"prompt": [[1, 2], [-1]]}, "prompt", "invalid_value"),
        ({"prompt": {"text": "x"}}, "prompt", "invalid_value"),
        ({"max_tokens": 3}, "prompt", "missing_required_parameter"),
        ({"prompt": "x", "frobnicate": True}, "frobnicate", "unknown_parameter"),
        ({"prompt": "x", "suffix": "the end"}, "suffix", "unsupported_parameter"),
        ({"prompt": "x", "best_of": 1, "n": 2}, "best_of", "invalid_value"),
        ({"prompt": "x", "use_beam_search": True}, "use_beam_search", "unsupported_parameter"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "unsupported_parameter"),
        ({"prompt": "x", "stream_options": {"include_usage": True, "extra": 1}, "stream": True}, "stream_options", "unknown_parameter"),
        ({"prompt": "word " * 120, "max_tokens": 16}, "max_tokens", "context_length_exceeded"),
        ({"prompt": "word " * 200}, "prompt", "context_length_exceeded"),
        ({"prompt": "x", "max_tokens": 500}, "max_tokens", "context_length_exceeded"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(http, body, param, code):
    error = assert_openai_error(http.post("/v1/completions", json=body), 400, param, code)
    assert error["type"] == "invalid_request_error"


def test_context_length_message_gives_the_counts(http):
    error = assert_openai_error(
        http.post("/v1/completions", json={"prompt": [1] * 100, "max_tokens": 50}), 400, code="context_length_exceeded"
    )
    assert "128" in error["message"] and "150" in error["message"] and "100 in your prompt" in error["message"]


def test_unknown_model_is_404_model_not_found(http):
    assert_openai_error(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model", "model_not_found")
    assert_openai_error(http.get("/v1/models/gpt-4"), 404, "model", "model_not_found")


@pytest.mark.parametrize(
    "content, headers, code",
    [
        (b'{"prompt": "x",', {"Content-Type": "application/json"}, "invalid_json"),
        (b'{"prompt": "x", "temperature": NaN}', {"Content-Type": "application/json"}, "invalid_value"),
        (b"[1, 2, 3]", {"Content-Type": "application/json"}, "invalid_request"),
        (b'{"prompt": "\xff\xfe"}', {"Content-Type": "application/json"}, "invalid_encoding"),
        (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, "invalid_content_type"),
        (b'{"prompt": "x"}', {}, "invalid_content_type"),
        (b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}, "invalid_content_type"),
    ],
)
def test_malformed_bodies_are_400(http, content, headers, code):
    assert_openai_error(http.post("/v1/completions", content=content, headers=headers), 400, code=code)


def test_oversized_bodies_are_413_with_or_without_content_length(http):
    big = json.dumps({"prompt": "x" * (BODY_LIMIT + 10)}).encode()
    assert_openai_error(
        http.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413, code="request_too_large"
    )

    def chunked():
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    assert_openai_error(
        http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"}), 413, code="request_too_large"
    )


def test_unknown_routes_and_methods_answer_in_openai_shape(http):
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)


def test_errors_are_counted_by_status_and_code(http):
    before = metric_value(http.get("/metrics").text, "nanogpt_mlx_http_errors_total", 'code="model_not_found",status="404"')
    http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    after = metric_value(http.get("/metrics").text, "nanogpt_mlx_http_errors_total", 'code="model_not_found",status="404"')
    assert after == before + 1


# --- the other routes ---------------------------------------------------------------------------------
def test_models_health_tokenize_detokenize(http, sdk):
    models = sdk.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert http.get(f"/v1/models/{MODEL}").json()["max_model_len"] == 128

    health = http.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["slots_free"] == 16

    tok = http.post("/tokenize", json={"prompt": "Hello world<|endoftext|>"}).json()
    assert tok == {"tokens": [15496, 995, 50256], "count": 3, "max_model_len": 128, "token_strs": None}
    assert http.post("/detokenize", json={"tokens": [15496, 995]}).json() == {"prompt": "Hello world"}
    assert_openai_error(http.post("/detokenize", json={"tokens": [99999]}), 400, "tokens")
    assert_openai_error(http.post("/tokenize", json={"text": "x"}), 400)


def test_metrics_expose_every_family(http):
    complete(http, prompt="metrics", max_tokens=3)
    text = http.get("/metrics").text
    for family in [
        "nanogpt_mlx_time_to_first_token_seconds_bucket",
        "nanogpt_mlx_inter_token_latency_seconds_bucket",
        "nanogpt_mlx_request_duration_seconds_bucket",
        "nanogpt_mlx_queue_time_seconds_bucket",
        "nanogpt_mlx_prefill_time_seconds_bucket",
        "nanogpt_mlx_decode_time_seconds_bucket",
        "nanogpt_mlx_decode_batch_size_bucket",
        "nanogpt_mlx_prompt_tokens_total",
        "nanogpt_mlx_generation_tokens_total",
        'nanogpt_mlx_requests_finished_total{finish_reason="length"}',
        "nanogpt_mlx_requests_running",
        "nanogpt_mlx_requests_waiting",
        "nanogpt_mlx_kv_cache_slots_used",
        "nanogpt_mlx_kv_cache_slots_total 16.0",
        "process_resident_memory_bytes",
    ]:
        assert family in text, family
    assert metric_value(text, "nanogpt_mlx_generation_tokens_total") >= 3
