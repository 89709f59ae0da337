"""Bad input, listed, over real HTTP (uvicorn on 127.0.0.1): each answered with a 4xx in OpenAI's
shape naming the parameter, and the server serving normally afterwards.

The list grows with the API by itself: for every field of the completions and chat request
models (OpenAI's and vLLM's), values of the wrong type and values out of the published range
(the bounds of /openapi.json, the server's own limits included) are derived from the schema
the server publishes, and each must be refused with a 400 naming that field. Then the cases the
schema cannot express: chat messages of wrong shapes and roles, a --chat-template that fails to
render, token ids out of the vocabulary in stop_token_ids / allowed_token_ids / logit_bias, huge
logprobs, best_of < n.
"""

from __future__ import annotations

import copy
import json

import httpx
import pytest

from nanogpt_mlx.server.protocol import ChatCompletionRequest, CompletionRequest

from server_support import ThreadedServer

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.timeout(600)

MAX_N, MAX_LOGPROBS, VOCAB, CONTEXT = 4, 5, 50257, 128
MESSAGES = [{"role": "user", "content": "Hello"}]
BASE = {"/v1/completions": {"prompt": "x", "max_tokens": 1}, "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 1}}
# Values of every JSON type, for the wrong-type cases: those the field's schema refuses are sent.
CODES = ("invalid_value", "context_length_exceeded", "missing_required_parameter", "unknown_parameter", "unsupported_parameter")
CANDIDATES = ["x", "", "1", 1, -1, 0.5, True, False, [], [1], ["x"], [[1]], {}, {"a": 1}, {"type": "x"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, max_batch=8, max_n=MAX_N, max_logprobs=MAX_LOGPROBS) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def spec(http):
    return http.get("/openapi.json").json()


def openai_error(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"] and body["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    return body["error"]


def field_schema(spec: dict, model: str, field: str) -> dict:
    return {**spec["components"]["schemas"][model]["properties"][field], "components": spec["components"]}


def out_of_range(schema: dict) -> list:
    """Values just outside each bound the schema gives the field (numbers, list items and lengths, strings)."""
    values = []
    for branch in schema.get("anyOf", [schema]):
        kind = branch.get("type")
        if kind in ("integer", "number"):
            step = 1 if kind == "integer" else 0.5
            if "minimum" in branch:
                values.append(branch["minimum"] - step)
            if "maximum" in branch:
                values.append(branch["maximum"] + step)
            if "exclusiveMinimum" in branch:
                values.append(branch["exclusiveMinimum"])
            if "exclusiveMaximum" in branch:
                values.append(branch["exclusiveMaximum"])
        elif kind == "array":
            if branch.get("minItems"):
                values.append([])
            items = branch.get("items", {})
            if "maximum" in items:
                values.append([items["maximum"] + 1])
            if "minimum" in items:
                values.append([items["minimum"] - 1])
            if "maxItems" in branch and items.get("type") == "string":
                values.append(["s"] * (branch["maxItems"] + 1))
        elif kind == "string" and branch.get("minLength"):
            values.append("")
        elif kind == "string" and "maxLength" in branch:
            values.append("s" * (branch["maxLength"] + 1))
    return values


def schema_cases(model) -> list[tuple[str, str]]:
    path = "/v1/completions" if model is CompletionRequest else "/v1/chat/completions"
    return [(path, field) for field in model.model_fields]


CASES = schema_cases(CompletionRequest) + schema_cases(ChatCompletionRequest)
listed = {"schema-derived": 0, "explicit": 0}


@pytest.mark.parametrize("path, field", CASES, ids=[f"{p.split('/')[-1]}.{f}" for p, f in CASES])
def test_wrong_types_and_out_of_range_values_of_every_field_are_400_naming_it(http, spec, path, field):
    model = "CompletionRequest" if path == "/v1/completions" else "ChatCompletionRequest"
    schema = field_schema(spec, model, field)
    validator = jsonschema.Draft202012Validator(schema)
    bad = [v for v in CANDIDATES + out_of_range(schema) if not validator.is_valid(v)]
    assert bad, f"no wrong value found for {field}"
    for value in bad:
        body = {**copy.deepcopy(BASE[path]), field: value}
        error = openai_error(http.post(path, json=body))
        assert error["param"] == field, (value, error)
        assert error["code"] in CODES, (value, error)
    listed["schema-derived"] += len(bad)


# --- what the schema cannot say ------------------------------------------------------------------------------
EXPLICIT = [
    # chat messages of wrong shapes
    ("/v1/chat/completions", {"messages": "Hello"}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": {"role": "user", "content": "Hello"}}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": ["Hello"]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [[{"role": "user", "content": "x"}]]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"text": "x"}}]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["x"]}]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "messages", "invalid_value"),
    # ... and of wrong roles
    ("/v1/chat/completions", {"messages": [{"role": 5, "content": "x"}]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "", "content": "x"}]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": ["user"], "content": "x"}]}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": None, "content": "x"}]}, "messages", "invalid_value"),
    # token ids out of the vocabulary
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [VOCAB]}, "stop_token_ids", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [5, 2**63]}, "stop_token_ids", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [1, VOCAB]}, "allowed_token_ids", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "allowed_token_ids": [10**30]}, "allowed_token_ids", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(VOCAB): 1}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 1}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": [[1, 2], [VOCAB + 7]]}, "prompt", "invalid_value"),
    ("/v1/chat/completions", {"messages": MESSAGES, "stop_token_ids": [VOCAB]}, "stop_token_ids", "invalid_value"),
    ("/v1/chat/completions", {"messages": MESSAGES, "allowed_token_ids": [VOCAB * 2]}, "allowed_token_ids", "invalid_value"),
    ("/detokenize", {"tokens": [1, VOCAB]}, "tokens", "invalid_value"),
    ("/detokenize", {"tokens": [2**64]}, "tokens", "invalid_value"),
    # huge logprobs
    ("/v1/completions", {"prompt": "x", "logprobs": 10**6}, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2**63}, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logprobs": 10**40}, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "echo": True, "max_tokens": 0, "logprobs": VOCAB}, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 10**9}, "prompt_logprobs", "invalid_value"),
    ("/v1/chat/completions", {"messages": MESSAGES, "logprobs": True, "top_logprobs": 10**9}, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {"messages": MESSAGES, "prompt_logprobs": VOCAB}, "prompt_logprobs", "invalid_value"),
    # best_of
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, "best_of", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "best_of": MAX_N + 1}, "best_of", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "best_of": 0}, "best_of", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "n": 1, "stream": True}, "best_of", "unsupported_parameter"),
    # numbers JSON allows but no field does
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64}, "seed", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "temperature": 1e400}, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "truncate_prompt_tokens": CONTEXT + 1}, "truncate_prompt_tokens", "invalid_value"),
    # a request's own template is not trusted by default
    ("/v1/chat/completions", {"messages": MESSAGES, "chat_template": "{{ messages }}"}, "chat_template", "unsupported_parameter"),
    ("/tokenize", {"messages": MESSAGES, "chat_template": "{{ messages }}"}, "chat_template", "unsupported_parameter"),
]


@pytest.mark.parametrize("path, body, param, code", EXPLICIT, ids=[f"{i}-{c[2]}" for i, c in enumerate(EXPLICIT)])
def test_listed_bad_inputs_are_400_naming_the_parameter(http, path, body, param, code):
    payload = json.dumps(body).encode()  # 1e400 is written by hand: Python's JSON would write Infinity
    payload = payload.replace(b"Infinity", b"1e400")
    error = openai_error(http.post(path, content=payload, headers={"Content-Type": "application/json"}))
    assert (error["param"], error["code"]) == (param, code), error
    listed["explicit"] += 1


@pytest.mark.parametrize(
    "path, content",
    [
        ("/v1/completions", b"[" * 100_000 + b"]" * 100_000),  # deeper than Python's JSON parser recurses
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x", "name": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"),
        ("/tokenize", b'{"prompt": "x", "model": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"),  # more digits than Python converts
        ("/detokenize", b'{"tokens": [' + b"1" * 4301 + b"]}"),
    ],
)
def test_json_the_server_cannot_read_is_a_400(http, path, content):
    error = openai_error(http.post(path, content=content, headers={"Content-Type": "application/json"}))
    assert error["code"] == "invalid_json", error
    listed["explicit"] += 1


def test_vanishing_temperatures_are_greedy_not_nan(http):
    """A temperature the float32 logits cannot be divided by (1e-39 is subnormal there, 5e-324 in
    float64 too) samples the argmax, as temperature 0 does, instead of tokens drawn from NaN."""
    body = {"prompt": "The river", "max_tokens": 12, "ignore_eos": True}
    greedy = http.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    for temperature in (1e-6, 1e-39, 5e-324):
        r = http.post("/v1/completions", json={**body, "temperature": temperature, "seed": 1})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, temperature


def test_after_every_bad_input_the_server_serves_normally(http, server):
    r = http.post("/v1/completions", json={"prompt": "Still here", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    health = http.get("/health").json()
    assert (health["status"], health["slots_free"], health["waiting"]) == ("ok", 8, 0)
    print(f"listed bad inputs sent: {listed}")


# --- a chat template that fails to render ------------------------------------------------------------------
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] not in ('system', 'user', 'assistant') %}{{ raise_exception('Unknown role: ' ~ m['role']) }}{% endif %}"
    "{% if m['role'] == 'user' and m['content'] == 'divide' %}{{ 1 / 0 }}{% endif %}"
    "{% if m['role'] == 'user' and m['content'] == 'lookup' %}{{ m['content'].no_such_method() }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_a_chat_template_that_fails_to_render_is_a_clear_400_and_the_server_keeps_serving(tiny_checkpoint, tmp_path):
    template = tmp_path / "strict.jinja"
    template.write_text(STRICT_TEMPLATE)
    with ThreadedServer(tiny_checkpoint, chat_template=str(template)) as s, httpx.Client(base_url=s.base_url, timeout=60) as client:
        cases = [
            ([{"role": "wizard", "content": "hi"}], "Unknown role: wizard"),
            ([{"role": "tool", "content": "42", "tool_call_id": "t1"}], "Unknown role: tool"),
            ([{"role": "user", "content": "divide"}], "ZeroDivisionError"),
            ([{"role": "user", "content": "lookup"}], "no_such_method"),
        ]
        for messages, expected in cases:
            for path in ("/v1/chat/completions", "/tokenize"):
                error = openai_error(client.post(path, json={"messages": messages, "max_tokens": 2} if path != "/tokenize" else
                                                 {"messages": messages}))
                assert (error["param"], error["code"]) == ("messages", "invalid_value"), error
                assert expected in error["message"] and str(template) in error["message"], error
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "return_prompt_text": True}
        ok = client.post("/v1/chat/completions", json=body)
        assert ok.status_code == 200 and ok.json()["prompt_text"] == "<user>hi<assistant>"
        assert client.get("/health").json()["status"] == "ok"
