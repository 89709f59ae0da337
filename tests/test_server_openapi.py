"""/openapi.json and /docs: a valid OpenAPI document whose request schemas admit what the server
accepts and reject what it refuses (checked body by body against the live server)."""

from __future__ import annotations

import copy

import pytest

from nanogpt_mlx.server.protocol import ChatCompletionRequest, CompletionRequest

from server_support import VLLM_COMPLETION_FIELDS, ThreadedServer

pytestmark = pytest.mark.timeout(600)

MAX_N, MAX_LOGPROBS = 6, 7


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, max_n=MAX_N, max_logprobs=MAX_LOGPROBS) as s:
        yield s


@pytest.fixture(scope="module")
def spec(http):
    r = http.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def body_validator(spec: dict, path: str):
    jsonschema = pytest.importorskip("jsonschema")
    schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": spec["components"]})


def test_the_document_is_valid_openapi(spec):
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(spec)
    routes = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info", "/health"}
    assert routes <= set(spec["paths"])


def test_docs_page_is_served(http):
    r = http.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()


@pytest.mark.parametrize("model, name", [(CompletionRequest, "CompletionRequest"), (ChatCompletionRequest, "ChatCompletionRequest")])
def test_request_schemas_list_exactly_the_accepted_fields(spec, model, name):
    schema = spec["components"]["schemas"][name]
    assert set(schema["properties"]) == set(model.model_fields)
    assert schema["additionalProperties"] is False
    integer = [b for b in schema["properties"]["n"]["anyOf"] if b.get("type") == "integer"][0]
    assert integer["maximum"] == MAX_N


CASES = [
    ({"prompt": "x"}, 200),
    (dict(copy.deepcopy(VLLM_COMPLETION_FIELDS), request_id=None), 200),
    ({"prompt": [1, 2, 3], "stop": None, "logprobs": MAX_LOGPROBS, "n": MAX_N, "max_tokens": 2}, 200),
    ({"prompt": "x", "logprobs": MAX_LOGPROBS + 1}, 400),
    ({"prompt": "x", "n": MAX_N + 1}, 400),
    ({"prompt": "x", "temperature": 3}, 400),
    ({"prompt": "x", "temperature": "1"}, 400),
    ({"prompt": "x", "max_tokens": -1}, 400),
    ({"prompt": []}, 400),
    ({"prompt": [-1]}, 400),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"prompt": "x", "frobnicate": 1}, 400),
    ({"max_tokens": 1}, 400),
]


@pytest.mark.parametrize("body, status", CASES)
def test_completion_schema_agrees_with_the_server(spec, http, body, status):
    valid = body_validator(spec, "/v1/completions").is_valid(body)
    r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert valid == (status == 200)


CHAT_CASES = [
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, 200),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_completion_tokens": 2, "top_logprobs": None}, 200),
    ({"messages": [{"role": "user", "content": "hi", "name": "a"}], "max_tokens": 2, "logprobs": True, "top_logprobs": MAX_LOGPROBS}, 200),
    ({"messages": []}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400),
]


@pytest.mark.parametrize("body, status", CHAT_CASES)
def test_chat_schema_agrees_with_the_server(spec, http, body, status):
    valid = body_validator(spec, "/v1/chat/completions").is_valid(body)
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    assert valid == (status == 200)


def test_tokenize_schema_takes_either_form(spec, http):
    validator = body_validator(spec, "/tokenize")
    for body in ({"prompt": "x", "add_special_tokens": False}, {"messages": [{"role": "user", "content": "x"}], "return_token_strs": True}):
        assert validator.is_valid(body)
        assert http.post("/tokenize", json=body).status_code == 200
    assert not validator.is_valid({"text": "x"})
