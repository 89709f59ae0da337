"""A fault stays where it happens: tested over HTTP against a real `nanogpt-mlx serve` (tiny model)
with the test-only fault injection of server/engine/faults.py (NANOGPT_MLX_FAULT_INJECTION).

- An exception in one sequence's output step (where its logits become a token) ends that request
  alone, with a 500 in OpenAI's shape or an error event in its stream (then `[DONE]`; completions
  and chat alike); every other request of
  the same batch (the hook's `together=N` admits them in one step) gets exactly the output it
  gets without the fault.
- When the engine loop itself dies, /health answers 503 at once, new requests get 503, the
  requests it was generating end with an error, and once the open requests have their answers
  the process exits 1.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from conftest import cli_command, cli_env
from server_support import HeldRequest, ServeProcess, metric_value, sse_payloads

pytestmark = pytest.mark.timeout(600)

OUTPUT_FAULT = "<<fail-in-the-output-step>>"
ENGINE_FAULT = "<<kill-the-engine-loop>>"
FAULT_AFTER = 2  # tokens a faulty sequence produces before its fault


def serve(checkpoint, log_path, injection: str, *args: str) -> ServeProcess:
    env = cli_env(NANOGPT_MLX_FAULT_INJECTION=injection)
    return ServeProcess(cli_command(), ["--model", str(checkpoint), "--max-batch", "8", *args], env=env, log_path=log_path)


def call(base_url: str, body: dict) -> dict:
    """POST a completion (a chat completion when the body has messages); the answer as {status, json}
    or, streamed, {status, chunks, error, done}."""
    url = base_url + ("/v1/chat/completions" if "messages" in body else "/v1/completions")
    if not body.get("stream"):
        r = httpx.post(url, json=body, timeout=300)
        return {"status": r.status_code, "json": r.json()}
    with httpx.stream("POST", url, json=body, timeout=300) as r:
        payloads = sse_payloads(r.iter_lines())
    events = [json.loads(p) for p in payloads if p != "[DONE]"]
    return {"status": r.status_code, "chunks": [e for e in events if "error" not in e],
            "error": next((e for e in events if "error" in e), None), "done": payloads[-1:] == ["[DONE]"]}


def outcome(answer: dict) -> dict:
    """What a client gets from a request that succeeded: text, token count and finish reason per choice."""
    assert answer["status"] == 200, answer
    if "json" in answer:
        body = answer["json"]
        return {"texts": [c["text"] for c in body["choices"]], "finish": [c["finish_reason"] for c in body["choices"]],
                "completion_tokens": body["usage"]["completion_tokens"]}
    assert answer["error"] is None and answer["done"], answer
    by_choice: dict[int, list] = {}
    for chunk in answer["chunks"]:
        for c in chunk["choices"]:
            by_choice.setdefault(c["index"], []).append(c)
    texts = ["".join(c["text"] for c in by_choice[i]) for i in sorted(by_choice)]
    finish = [by_choice[i][-1]["finish_reason"] for i in sorted(by_choice)]
    usage = answer["chunks"][-1]["usage"]
    return {"texts": texts, "finish": finish, "completion_tokens": usage["completion_tokens"]}


def concurrently(base_url: str, bodies: dict[str, dict]) -> dict[str, dict]:
    answers: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda k=k, b=b: answers.__setitem__(k, call(base_url, b))) for k, b in bodies.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert set(answers) == set(bodies), "a client thread did not finish"
    return answers


def assert_engine_error(error: dict) -> None:
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}, error
    assert (error["error"]["type"], error["error"]["code"]) == ("server_error", "engine_error"), error
    assert "InjectedFault" in error["error"]["message"], error


NORMAL = {
    "greedy": {"prompt": "The old lighthouse keeper", "max_tokens": 24, "temperature": 0, "ignore_eos": True},
    "greedy stream": {"prompt": "A list of rivers:", "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stream": True,
                      "stream_options": {"include_usage": True}},
    "seeded n=2": {"prompt": "Once upon a time", "max_tokens": 18, "temperature": 0.9, "seed": 7, "n": 2, "ignore_eos": True},
    "seeded stream": {"prompt": "Dear diary,", "max_tokens": 22, "temperature": 0.8, "top_p": 0.9, "seed": 3, "ignore_eos": True,
                      "stream": True, "stream_options": {"include_usage": True}},
}
FAULTY = {
    "faulty": {"prompt": f"Tell me {OUTPUT_FAULT} a story", "max_tokens": 30, "temperature": 0, "ignore_eos": True},
    "faulty stream": {"prompt": f"{OUTPUT_FAULT} and then", "max_tokens": 30, "temperature": 0, "ignore_eos": True, "stream": True},
    "faulty chat stream": {"messages": [{"role": "user", "content": f"Say {OUTPUT_FAULT}"}], "max_tokens": 30, "temperature": 0,
                           "ignore_eos": True, "stream": True},
}
SEQUENCES = 1 + 1 + 2 + 1 + 1 + 1 + 1  # NORMAL and FAULTY together, choices counted


def test_a_fault_in_one_sequences_output_step_ends_that_request_alone(tiny_checkpoint, tmp_path):
    injection = f"together={SEQUENCES},output={OUTPUT_FAULT}@{FAULT_AFTER}"
    with serve(tiny_checkpoint, tmp_path / "serve.log", injection) as server:
        batch = concurrently(server.base_url, {**NORMAL, **FAULTY})  # admitted together: one batch

        # The faulty requests end with an error, after their first tokens for the streams; a stream's
        # error event is followed by [DONE], as vLLM's is.
        assert batch["faulty"]["status"] == 500
        assert_engine_error(batch["faulty"]["json"])
        for name, first_chunks in (("faulty stream", 0), ("faulty chat stream", 1)):  # chat: the role chunk first
            streamed = batch[name]
            assert streamed["status"] == 200 and streamed["error"] is not None and streamed["done"], name
            assert_engine_error(streamed["error"])
            assert 1 <= len(streamed["chunks"]) - first_chunks <= FAULT_AFTER, name
            assert all(c["choices"][0]["finish_reason"] is None for c in streamed["chunks"]), name

        # Every other request of the batch: exactly what it gets without the fault (alone, afterwards).
        for name, body in NORMAL.items():
            alone = call(server.base_url, body)
            assert outcome(batch[name]) == outcome(alone), name
            assert all(reason == "length" for reason in outcome(alone)["finish"])

        health = httpx.get(server.base_url + "/health", timeout=30).json()
        assert (health["status"], health["running"], health["slots_free"]) == ("ok", 0, 8)
        metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
        assert metric_value(metrics, "nanogpt_mlx_requests_finished_total", 'finish_reason="error"') == 3
        assert metric_value(metrics, "nanogpt_mlx_requests_finished_total", 'finish_reason="length"') == 2 * 5
    log = server.log()
    assert log.count("failed; ending it alone") == 3 and "InjectedFault" in log


def test_when_the_engine_loop_dies_health_and_new_requests_are_503_and_serve_exits_1(tiny_checkpoint, tmp_path):
    injection = f"together=2,engine={ENGINE_FAULT}@3"
    with serve(tiny_checkpoint, tmp_path / "serve.log", injection, "--shutdown-timeout", "600") as server:
        base = server.base_url
        # A request still uploading its body when the engine dies: the server answers it before exiting.
        held = HeldRequest(base, "/v1/completions", {"prompt": "late", "max_tokens": 2})
        held.wait_until_reading()
        victim = {"prompt": "A stream in the same batch", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
        killer = {"prompt": f"{ENGINE_FAULT} now", "max_tokens": 50, "temperature": 0, "ignore_eos": True}
        answers = concurrently(base, {"victim": victim, "killer": killer})

        assert answers["killer"]["status"] == 500
        assert_engine_error(answers["killer"]["json"])
        stream = answers["victim"]
        assert stream["status"] == 200 and len(stream["chunks"]) >= 1 and stream["done"]
        assert_engine_error(stream["error"])

        health = httpx.get(base + "/health", timeout=30)
        assert health.status_code == 503 and health.headers["retry-after"] == "1"
        assert health.json()["status"] == "failed" and "InjectedFault" in health.json()["error"]
        refused = httpx.post(base + "/v1/completions", json={"prompt": "new work", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
        assert refused.json()["error"]["type"] == "server_error"

        status, body = held.finish()
        assert status == 503 and body["error"]["code"] == "service_unavailable"
        assert server.wait(300) == 1  # the timeout bounds a hang only
    log = server.log()
    assert "engine thread died" in log and "InjectedFault" in log
