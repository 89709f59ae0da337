"""`nanogpt-mlx serve` end to end, as a real subprocess with the full-size random model: settings
from the environment, API keys, disconnects freeing slots, a full queue, graceful SIGTERM."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.model.generate import generate_tokens
from nanogpt_mlx.model.sampling import SamplingParams
from nanogpt_mlx.model.tokenizer import EOT_ID, get_tokenizer

from conftest import cli_command, cli_env
from server_support import RawRequest, ServeProcess, metric_value, wait_for

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


def wait_for_free_slots(http: httpx.Client, want: int) -> None:
    wait_for(lambda: http.get("/health").json()["slots_free"] == want, f"{want} free slots")


def aborted(http: httpx.Client) -> float:
    return metric_value(http.get("/metrics").text, "nanogpt_mlx_requests_finished_total", 'finish_reason="abort"')


@pytest.mark.timeout(600)
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


@pytest.mark.timeout(600)
def test_full_size_greedy_stream_equals_the_reference_loop(served, full_checkpoint):
    tokenizer = get_tokenizer(full_checkpoint)
    prompt = "The history of the world"
    expected = list(
        generate_tokens(load_model(full_checkpoint), tokenizer.encode(prompt), 24, SamplingParams(temperature=0.0), frozenset({EOT_ID}))
    )
    expected_text = tokenizer.decode([t for t in expected if t != EOT_ID])
    client = OpenAI(base_url=served.base_url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text
    assert chunks[-1].usage.completion_tokens == len(expected)


@pytest.mark.timeout(600)
def test_a_disconnected_stream_frees_its_slot(http):
    body = {"model": MODEL, "prompt": "Tell me everything", "max_tokens": 450, "ignore_eos": True, "stream": True}
    # A client starved of CPU (both cores busy decoding) may read its third event only after the
    # whole stream is done; that attempt shows nothing, and the next one tries again.
    for _ in range(5):
        before = aborted(http)
        with http.stream("POST", "/v1/completions", json=body) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data:")
                if got == 3:
                    break
            decoding = http.get("/health").json()["slots_free"] == 1
            if not decoding:
                wait_for_free_slots(http, 2)
                continue
        # Leaving the block closed the connection mid-stream.
        wait_for_free_slots(http, 2)
        assert aborted(http) == before + 1
        return
    pytest.fail("every stream had finished before its client read three events")


@pytest.mark.timeout(600)
def test_a_disconnected_non_streaming_request_frees_its_slot(http, served):
    before = aborted(http)
    request = RawRequest(
        served.base_url,
        "/v1/completions",
        {"model": MODEL, "prompt": "Go on", "max_tokens": 450, "ignore_eos": True},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    wait_for(lambda: http.get("/health").json()["running"] == 1, "the request to be generating")
    request.hang_up()
    wait_for_free_slots(http, 2)
    assert aborted(http) == before + 1


@pytest.mark.timeout(600)
def test_a_full_queue_is_503_with_retry_after_at_once(http, served):
    """With both slots and the one waiting place taken, one more request is refused without
    waiting for a place: the queue is exactly as full when the answer arrives."""
    body = {"model": MODEL, "prompt": "Busy", "max_tokens": 450, "ignore_eos": True, "stream": True}
    opened, stop = [], threading.Event()

    def hold_stream():
        with httpx.Client(base_url=served.base_url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            with c.stream("POST", "/v1/completions", json=body) as r:
                opened.append(r.status_code)
                for _ in r.iter_lines():
                    if stop.is_set():
                        return

    holders = [threading.Thread(target=hold_stream) for _ in range(3)]  # 2 slots + 1 waiting place
    try:
        for t in holders:
            t.start()
        wait_for(lambda: (h := http.get("/health").json())["running"] == 2 and h["waiting"] == 1, "2 running and 1 waiting")
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "one more", "max_tokens": 2})
        after = http.get("/health").json()
        assert r.status_code == 503
        retry_after = int(r.headers["retry-after"])  # the engine's estimate (tests/test_overload.py checks it)
        assert 1 <= retry_after <= 60 and f"retry in {retry_after} s" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "queue_full"
        assert (after["running"], after["waiting"]) == (2, 1)  # nothing moved: it did not wait for a place
    finally:
        stop.set()
        for t in holders:
            t.join(120)
    assert opened == [200, 200, 200]
    wait_for_free_slots(http, 2)


def _stream(base_url: str, name: str, max_tokens: int, results: dict, first: threading.Event) -> None:
    body = {"prompt": f"{name} story", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    payloads = []
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                payloads.append(line[len("data:") :].strip())
                first.set()
    results[name] = payloads


def _sigterm_while_streaming(full_checkpoint, tmp_path, shutdown_timeout: str, streams: dict[str, int], probe: bool = True):
    """Start the streams (name -> max_tokens), send SIGTERM once each has sent a chunk and, with
    `probe`, wait until /health says the server is draining. Returns (payloads by stream, the
    answer to a request sent while draining, exit code, log)."""
    with ServeProcess(
        cli_command(),
        ["--model", str(full_checkpoint), "--shutdown-timeout", shutdown_timeout],
        env=cli_env(),
        log_path=tmp_path / "serve.log",
    ) as proc:
        results: dict[str, list[str]] = {}
        threads = []
        for name, max_tokens in streams.items():
            first = threading.Event()
            threads.append(threading.Thread(target=_stream, args=(proc.base_url, name, max_tokens, results, first)))
            threads[-1].start()
            assert first.wait(120), f"no first chunk from {name}"
        proc.terminate()
        refused = None
        if probe:
            wait_for(lambda: httpx.get(proc.base_url + "/health", timeout=10).json()["status"] == "draining", "draining")
            refused = httpx.post(proc.base_url + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10)
        for t in threads:
            t.join(300)
        code = proc.wait(300)
    log = proc.log()
    assert "Traceback" not in log and "terminate called" not in log
    return results, refused, code, log


def finish_reason(payloads: list[str]) -> str:
    assert payloads[-1] == "[DONE]"
    return json.loads(payloads[-2])["choices"][0]["finish_reason"]


@pytest.mark.timeout(600)
def test_sigterm_refuses_new_work_lets_streams_finish_then_exits_0(full_checkpoint, tmp_path):
    # A deadline far longer than these streams take anywhere: both end by themselves. The long
    # one keeps the server draining while the late request is refused.
    results, refused, code, log = _sigterm_while_streaming(full_checkpoint, tmp_path, "600", {"short": 24, "long": 480})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "server_error"
    assert finish_reason(results["short"]) == "length" and finish_reason(results["long"]) == "length"
    assert code == 0, log


@pytest.mark.timeout(600)
def test_sigterm_at_the_deadline_ends_streams_with_a_final_chunk_and_exits_0(full_checkpoint, tmp_path):
    # A zero deadline: the stream, far from its 480 tokens, is ended at once with "abort" (the
    # server may be gone before a probe could see it draining: the test above covers that).
    results, _, code, log = _sigterm_while_streaming(full_checkpoint, tmp_path, "0", {"long": 480}, probe=False)
    assert finish_reason(results["long"]) == "abort"
    assert code == 0, log


@pytest.mark.timeout(600)
def test_serve_with_a_bad_model_directory_exits_2_with_a_message(run_cli, tmp_path):
    proc = run_cli("serve", "--model", str(tmp_path / "missing"), "--port", "0")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    proc = run_cli("serve", "--model", str(tmp_path), "--max-batch", "0")
    assert proc.returncode == 2 and "--max-batch" in proc.stderr
