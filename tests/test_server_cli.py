"""`nanogpt-mlx serve` end to end, as a real subprocess with the full-size random model: settings
from the environment, API keys, disconnects freeing slots, a full queue, graceful SIGTERM."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from conftest import cli_command, cli_env
from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.model.generate import generate_tokens
from nanogpt_mlx.model.sampling import SamplingParams
from nanogpt_mlx.model.tokenizer import EOT_ID, get_tokenizer
from server_support import ServeProcess, metric_value, sse_payloads

KEY = "test-secret"
MODEL = "nano-full"


@pytest.fixture(scope="module")
def served(full_checkpoint, tmp_path_factory):
    """The full-size model behind the real CLI: 2 slots, 1 waiting place; key and name from env."""
    env = cli_env(NANOGPT_MLX_API_KEY=KEY, NANOGPT_MLX_SERVED_MODEL_NAME=MODEL, NANOGPT_MLX_MAX_QUEUE="1")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with ServeProcess(cli_command(), ["--model", str(full_checkpoint), "--max-batch", "2"], env=env, log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.base_url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def wait_for_free_slots(http: httpx.Client, want: int, timeout: float = 5.0) -> float:
    """Seconds until /health reports `want` free slots."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if http.get("/health").json()["slots_free"] == want:
            return time.monotonic() - start
        time.sleep(0.01)
    raise AssertionError(f"slots not freed within {timeout} s: {http.get('/health').json()}")


def aborted(http: httpx.Client) -> float:
    return metric_value(http.get("/metrics").text, "nanogpt_mlx_requests_finished_total", 'finish_reason="abort"')


@pytest.mark.timeout(120)
def test_api_key_from_the_environment_is_required(served):
    r = httpx.post(served.base_url + "/v1/completions", json={"prompt": "x"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(served.base_url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=served.base_url + "/v1", api_key="wrong", max_retries=0).completions.create(model=MODEL, prompt="x")
    assert httpx.get(served.base_url + "/health", timeout=10).status_code == 200  # probes need no key
    assert httpx.get(served.base_url + "/metrics", timeout=10).status_code == 200


@pytest.mark.timeout(120)
def test_full_size_greedy_stream_equals_the_reference_loop(served, full_checkpoint):
    tokenizer = get_tokenizer(full_checkpoint)
    prompt = "The history of the world"
    expected = list(generate_tokens(load_model(full_checkpoint), tokenizer.encode(prompt), 24, SamplingParams(temperature=0.0), frozenset({EOT_ID})))
    expected_text = tokenizer.decode([t for t in expected if t != EOT_ID])
    client = OpenAI(base_url=served.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text
    assert chunks[-1].usage.completion_tokens == len(expected)


@pytest.mark.timeout(120)
def test_a_disconnected_stream_frees_its_slot(http):
    before = aborted(http)
    body = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 450, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data:")
            if got == 3:
                break
        assert http.get("/health").json()["slots_free"] == 1  # it is decoding
    # Leaving the block closes the connection mid-stream.
    wait_for_free_slots(http, 2)
    assert aborted(http) == before + 1


@pytest.mark.timeout(120)
def test_a_disconnected_non_streaming_request_frees_its_slot(http, served):
    before = aborted(http)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            served.base_url + "/v1/completions",
            json={"model": MODEL, "prompt": "Go on", "max_tokens": 450, "ignore_eos": True},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=httpx.Timeout(10, read=0.8),
        )
    wait_for_free_slots(http, 2)
    assert aborted(http) == before + 1


@pytest.mark.timeout(120)
def test_a_full_queue_is_503_with_retry_after_at_once(http, served):
    body = {"model": MODEL, "prompt": "Busy", "max_tokens": 450, "ignore_eos": True, "stream": True}
    opened, stop = [], threading.Event()

    def hold_stream():
        with httpx.Client(base_url=served.base_url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                opened.append(r.status_code)
                for _ in r.iter_lines():
                    if stop.is_set():
                        return

    holders = [threading.Thread(target=hold_stream) for _ in range(3)]  # 2 slots + 1 waiting place
    for t in holders:
        t.start()
        time.sleep(0.3)
    try:
        deadline = time.monotonic() + 10
        while http.get("/health").json()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "one more", "max_tokens": 2})
        assert time.monotonic() - started < 1.0
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        stop.set()
        for t in holders:
            t.join(30)
    assert opened == [200, 200, 200]
    wait_for_free_slots(http, 2)


@pytest.mark.timeout(120)
def test_sigterm_drains_then_ends_streams_with_a_final_chunk_and_exits_0(full_checkpoint, tmp_path):
    log = tmp_path / "serve.log"
    with ServeProcess(cli_command(), ["--model", str(full_checkpoint), "--shutdown-timeout", "2"], env=cli_env(), log_path=log) as proc:
        results: dict[str, list[str]] = {}

        def stream(name: str, max_tokens: int):
            body = {"prompt": f"{name} story", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", proc.base_url + "/v1/completions", json=body, timeout=60) as r:
                results[name] = sse_payloads(r.iter_lines())

        long = threading.Thread(target=stream, args=("long", 480))
        long.start()
        deadline = time.monotonic() + 10
        while httpx.get(proc.base_url + "/health", timeout=5).json()["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        short = threading.Thread(target=stream, args=("short", 20))
        short.start()
        time.sleep(0.2)
        proc.terminate()
        time.sleep(0.3)
        refused = httpx.post(proc.base_url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10)
        health = httpx.get(proc.base_url + "/health", timeout=10)
        long.join(30)
        short.join(30)
        code = proc.wait(30)

    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "server_error"
    assert health.status_code == 503 and health.json()["status"] == "draining"
    for name, finish in (("short", "length"), ("long", "abort")):
        payloads = results[name]
        assert payloads[-1] == "[DONE]", name
        assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == finish, name
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log() and "terminate called" not in proc.log()


@pytest.mark.timeout(60)
def test_serve_with_a_bad_model_directory_exits_2_with_a_message(run_cli, tmp_path):
    proc = run_cli("serve", "--model", str(tmp_path / "missing"), "--port", "0")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    proc = run_cli("serve", "--model", str(tmp_path), "--max-batch", "0")
    assert proc.returncode == 2 and "--max-batch" in proc.stderr
