"""/v1/chat/completions on a real uvicorn (127.0.0.1), driven by the `openai` SDK's chat client and
httpx: the default transcript template and its stop at the next role label, --chat-template, a
checkpoint's own template (rendered as transformers renders it), streaming chunks, n, stop,
seed, logprobs, usage, the vLLM extensions, and clear 400s for tools and images."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from openai import BadRequestError

from nanogpt_mlx.model.tokenizer import get_tokenizer
from nanogpt_mlx.server.chat import DEFAULT_CHAT_STOP

from server_support import VLLM_CHAT_FIELDS, ThreadedServer, metric_value, sse_payloads

pytestmark = pytest.mark.timeout(600)

MODEL = "nanogpt-mlx"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, max_batch=16, max_queue=64) as s:
        yield s


def chat(http: httpx.Client, **body) -> dict:
    body.setdefault("model", MODEL)
    body.setdefault("messages", MESSAGES)
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def chat_chunks(http: httpx.Client, **body) -> list[dict]:
    body = {"model": MODEL, "messages": MESSAGES, **body, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        payloads = sse_payloads(r.iter_lines())
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


# --- the default template -------------------------------------------------------------------------
def test_default_template_is_a_transcript_with_role_labels(http, server):
    tokenizer = get_tokenizer(server.settings.model)
    body = chat(http, max_tokens=3, return_prompt_text=True, return_token_ids=True)
    expected = "System: You are terse.\n\nUser: Name a colour.\n\nAssistant:"
    assert body["prompt_text"] == expected
    assert body["prompt_token_ids"] == tokenizer.encode(expected)
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(expected))
    tokenized = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert tokenized["tokens"] == tokenizer.encode(expected)
    info = http.get("/tokenizer_info").json()
    assert "Assistant:" in info["chat_template"]


def test_generation_stops_at_the_next_role_label(http):
    # Only "\n", "User" and ":" may be generated: the transcript soon names the next speaker.
    body = chat(http, max_tokens=100, temperature=1.0, seed=7, n=8, allowed_token_ids=[198, 12982, 25])
    stopped = [c for c in body["choices"] if c["finish_reason"] == "stop"]
    assert stopped, body
    for choice in body["choices"]:
        assert "\nUser:" not in choice["message"]["content"]
    assert {c["stop_reason"] for c in stopped} <= set(DEFAULT_CHAT_STOP)


def test_every_vllm_chat_field_at_its_default_is_accepted_and_changes_nothing(http):
    plain = chat(http, messages=VLLM_CHAT_FIELDS["messages"], max_tokens=4, temperature=0)
    full = chat(http, **VLLM_CHAT_FIELDS)
    assert full["choices"][0]["message"] == plain["choices"][0]["message"]
    assert full["id"] == "chatcmpl-chat-1"
    # the same prompt again: all of it but its last token comes from the prefix cache (on by default)
    assert full["usage"].pop("prompt_tokens_details") == {"cached_tokens": plain["usage"]["prompt_tokens"] - 1}
    plain["usage"].pop("prompt_tokens_details")
    assert full["usage"] == plain["usage"]


# --- the openai SDK's chat client --------------------------------------------------------------------
def test_sdk_chat_completion(sdk):
    resp = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert 1 <= resp.usage.completion_tokens <= 8


def test_sdk_streaming_equals_non_streaming_with_usage(sdk):
    args = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=12, temperature=0)
    whole = sdk.chat.completions.create(**args)
    chunks = list(sdk.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_sdk_n_seed_stop_and_logprobs(sdk):
    a = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=3, n=3)
    b = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=1.0, seed=3, n=3)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1

    free = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0).choices[0].message.content
    stop = free[6:9]
    cut = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0, stop=[stop]).choices[0]
    assert cut.message.content == free[: free.index(stop)] and cut.finish_reason == "stop"

    lp = sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    assert "".join(t.token for t in content) == lp.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert bytes(t.bytes).decode("utf-8") == t.token


def test_max_completion_tokens_beats_max_tokens_and_the_default_is_the_context(http):
    assert chat(http, max_tokens=9, max_completion_tokens=3, ignore_eos=True)["usage"]["completion_tokens"] == 3
    body = chat(http, ignore_eos=True, temperature=0)
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] == 128
    assert body["choices"][0]["finish_reason"] == "length"


def test_chat_streaming_n_and_continuous_usage(http):
    chunks = chat_chunks(http, n=2, max_tokens=5, ignore_eos=True, temperature=0,
                         stream_options={"include_usage": True, "continuous_usage_stats": True})
    firsts = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(c["choices"][0]["index"] for c in firsts) == [0, 1]
    finals = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(f["index"] for f in finals) == [0, 1] and {f["finish_reason"] for f in finals} == {"length"}
    assert all("usage" in c for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] == 10


def test_vllm_extensions_apply_to_chat(http):
    body = chat(http, max_tokens=12, temperature=1.0, seed=2, min_tokens=4, allowed_token_ids=[257, 262, 290, 50256],
                logit_bias={"50256": 100}, return_token_ids=True, repetition_penalty=1.3, min_p=0.05, top_k=3)
    ids = body["choices"][0]["token_ids"]
    assert set(ids) <= {257, 262, 290, 50256} and len(ids) == 5 and ids[-1] == 50256
    assert chat(http, max_tokens=2, request_id="chat-7")["id"] == "chatcmpl-chat-7"


def test_continue_final_message_and_echo(http):
    messages = [*MESSAGES, {"role": "assistant", "content": "My answer is"}]
    body = chat(http, messages=messages, max_tokens=3, add_generation_prompt=False, continue_final_message=True, echo=True,
                return_prompt_text=True, temperature=0)
    assert body["prompt_text"].endswith("Assistant: My answer is")
    assert body["choices"][0]["message"]["content"].startswith("My answer is")


def test_a_request_may_bring_its_own_template_when_the_server_trusts_it(http, tiny_checkpoint):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    refused = http.post("/v1/chat/completions", json={"messages": MESSAGES, "chat_template": template})  # not trusted by default
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "chat_template"
    assert "--trust-request-chat-template" in refused.json()["error"]["message"]
    with ThreadedServer(tiny_checkpoint, trust_request_chat_template=True) as s, httpx.Client(base_url=s.base_url, timeout=60) as client:
        tokenizer = get_tokenizer(s.settings.model)
        body = chat(client, max_tokens=2, chat_template=template, return_prompt_text=True)
        assert body["prompt_text"] == "[system] You are terse.\n[user] Name a colour.\n[assistant]"
        assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(body["prompt_text"]))
        r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "chat_template": "{% for %}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"


# --- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, param, code",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
        ({"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
        ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages", "invalid_value"),
        ({"messages": []}, "messages", "invalid_value"),
        ({"messages": [{"content": "no role"}]}, "messages", "missing_required_parameter"),
        ({"top_logprobs": 2}, "top_logprobs", "invalid_value"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        ({"max_tokens": 500}, "max_tokens", "context_length_exceeded"),
        ({"messages": [{"role": "user", "content": "word " * 200}]}, "messages", "context_length_exceeded"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "missing_required_parameter"),
        ({"response_format": {"type": "structural_tag", "format": {}}}, "response_format", "unsupported_parameter"),
        ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ],
)
def test_bad_chat_requests_are_400_naming_the_parameter(http, extra, param, code):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == (param, code)


def test_sdk_sees_tools_refused(sdk):
    with pytest.raises(BadRequestError) as info:
        tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, tools=tools)
    assert "tools" in str(info.value)


def test_chat_shares_the_engine_metrics_and_model_check(http):
    before = http.get("/metrics").text
    chat(http, max_tokens=4, ignore_eos=True)
    after = http.get("/metrics").text
    name = "nanogpt_mlx_generation_tokens_total"
    assert metric_value(after, name) == metric_value(before, name) + 4
    labels = 'method="POST",route="/v1/chat/completions",status="200"'
    assert metric_value(after, "nanogpt_mlx_http_requests_total", labels) >= 1
    r = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# --- the server's template: --chat-template, then the checkpoint's own ---------------------------------
def test_chat_template_flag_takes_a_file(tiny_checkpoint, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    with ThreadedServer(tiny_checkpoint, chat_template=str(template)) as s, httpx.Client(base_url=s.base_url, timeout=60) as client:
        body = chat(client, max_tokens=2, return_prompt_text=True)
        assert body["prompt_text"] == "<system>You are terse.<user>Name a colour.<assistant>"
        assert client.get("/tokenizer_info").json()["chat_template"] == template.read_text()


def test_a_checkpoints_own_template_renders_as_transformers_renders_it(tiny_checkpoint, tmp_path):
    transformers = pytest.importorskip("transformers")
    checkpoint = tmp_path / "chatty"
    shutil.copytree(tiny_checkpoint, checkpoint)
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}### System\n{{ message['content'] }}\n"
        "{% else %}### {{ message['role'] | title }}\n{{ message['content'] | trim }}{{ eos_token if message['role'] == 'assistant' }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}### Assistant\n{% endif %}"
    )
    config_file.write_text(json.dumps(config))
    messages = [*MESSAGES, {"role": "assistant", "content": "Red."}, {"role": "user", "content": "  Another? "}]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with ThreadedServer(checkpoint) as s, httpx.Client(base_url=s.base_url, timeout=60) as client:
        body = chat(client, messages=messages, max_tokens=2, return_prompt_text=True)
        assert body["prompt_text"] == expected
        assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_bad_chat_template_flag_stops_serve(run_cli, tiny_checkpoint, tmp_path):
    proc = run_cli("serve", "--model", tiny_checkpoint, "--port", "0", "--chat-template", str(tmp_path / "missing.jinja"), timeout=120)
    assert proc.returncode == 2
    assert "--chat-template" in proc.stderr and "Traceback" not in proc.stderr
