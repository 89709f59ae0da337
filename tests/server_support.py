"""Helpers for the server tests: real uvicorn servers on 127.0.0.1, in a thread or a subprocess.

Both kinds bind a free port, wait until /health says ok, and stop by themselves (bounded
waits everywhere), so a failing test never leaves a server behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from nanogpt_mlx.server.app import create_app
from nanogpt_mlx.server.settings import ServerSettings

HOST = "127.0.0.1"

# Every field of vLLM 0.34.0's CompletionRequest (vllm/entrypoints/openai/completion/protocol.py),
# each with its default (or a value that changes nothing), plus OpenAI's best_of.
VLLM_COMPLETION_FIELDS = {
    "model": "nanogpt-mlx", "prompt": "Hello", "echo": False, "frequency_penalty": 0.0, "logit_bias": None, "logprobs": None,
    "max_tokens": 4, "n": 1, "presence_penalty": 0.0, "seed": None, "stop": [], "stream": False, "stream_options": None,
    "suffix": None, "temperature": 0.0, "top_p": 1.0, "user": "someone", "use_beam_search": False, "top_k": 0, "min_p": 0.0,
    "repetition_penalty": 1.0, "watermarking": None, "length_penalty": 1.0, "stop_token_ids": [], "include_stop_str_in_output": False,
    "ignore_eos": False, "min_tokens": 0, "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": None, "truncation_side": None, "allowed_token_ids": None, "prompt_logprobs": None,
    "logprob_token_ids": None, "bad_words": [], "prompt_embeds": None, "add_special_tokens": True, "response_format": {"type": "text"},
    "structured_outputs": None, "priority": 0, "request_id": "abc-1", "session_id": "s-1", "return_tokens_as_token_ids": None,
    "return_token_ids": None, "return_weight_versions": False, "routed_experts_prompt_start": 0, "return_token_offsets": False,
    "mm_payload": "tensors", "return_mm_kwargs": None, "cache_salt": "salt", "kv_transfer_params": None, "ec_transfer_params": None,
    "vllm_xargs": None, "repetition_detection": None, "thinking_token_budget": None, "stream_interval": None, "best_of": 1,
}

# Every field of vLLM 0.34.0's ChatCompletionRequest (vllm/entrypoints/openai/chat_completion/protocol.py),
# each with its default (or a value that changes nothing).
VLLM_CHAT_FIELDS = {
    "messages": [{"role": "user", "content": "Hello"}], "model": "nanogpt-mlx", "frequency_penalty": 0.0, "logit_bias": None,
    "logprobs": False, "top_logprobs": 0, "max_tokens": None, "max_completion_tokens": 4, "n": 1, "presence_penalty": 0.0,
    "response_format": None, "seed": None, "stop": [], "stream": False, "stream_options": None, "temperature": 0.0, "top_p": 1.0,
    "tools": None, "tool_choice": "none", "reasoning_effort": None, "thinking_token_budget": None, "include_reasoning": True,
    "parallel_tool_calls": True, "user": None, "use_beam_search": False, "top_k": None, "min_p": None, "repetition_penalty": None,
    "watermarking": None, "length_penalty": 1.0, "stop_token_ids": [], "include_stop_str_in_output": False, "ignore_eos": False,
    "min_tokens": 0, "skip_special_tokens": None, "spaces_between_special_tokens": True, "truncate_prompt_tokens": None,
    "truncation_side": None, "prompt_logprobs": None, "logprob_token_ids": None, "allowed_token_ids": None, "bad_words": [],
    "echo": False, "add_generation_prompt": True, "continue_final_message": False, "add_special_tokens": False, "documents": None,
    "chat_template": None, "chat_template_kwargs": None, "media_io_kwargs": None, "mm_processor_kwargs": None,
    "structured_outputs": None, "priority": 0, "request_id": "chat-1", "session_id": None, "return_tokens_as_token_ids": None,
    "return_token_ids": None, "return_weight_versions": False, "routed_experts_prompt_start": 0, "return_token_offsets": False,
    "return_prompt_text": None, "mm_payload": "tensors", "return_mm_kwargs": None, "cache_salt": None, "kv_transfer_params": None,
    "ec_transfer_params": None, "vllm_xargs": None, "repetition_detection": None, "stream_interval": None,
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_healthy(base_url: str, timeout: float = 300.0, alive=lambda: True) -> None:
    """Poll /health until it answers 200; the timeout only bounds a hang (a loaded machine loads slowly)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server process exited before becoming healthy")
        try:
            r = httpx.get(base_url + "/health", timeout=2.0)
            if r.status_code == 200:
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} not healthy after {timeout} s: {last}")


class ThreadedServer:
    """`create_app` under uvicorn in a background thread of the test process."""

    def __init__(self, model_dir: Path, **settings):
        settings.setdefault("log_level", "warning")
        self.settings = ServerSettings(model=str(model_dir), **settings)
        self.app = create_app(self.settings, Path(model_dir))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://{HOST}:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", backlog=2048, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def ctx(self):
        return self.app.state.ctx

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        wait_healthy(self.base_url, alive=self.thread.is_alive)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class ServeProcess:
    """`nanogpt-mlx serve` as a real subprocess (the installed console script)."""

    def __init__(self, command: list[str], args: list[str], env: dict[str, str] | None = None, log_path: Path | None = None):
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        full_env = dict(os.environ if env is None else env)
        self.proc = subprocess.Popen(
            [*command, "serve", "--host", HOST, "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
        )

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def __enter__(self) -> ServeProcess:
        try:
            wait_healthy(self.base_url, alive=lambda: self.proc.poll() is None)
        except BaseException as exc:
            self.stop()
            raise RuntimeError(f"server did not start:\n{self.log()}") from exc
        return self

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __exit__(self, *exc) -> None:
        self.stop()


class RawRequest:
    """An HTTP/1.1 POST written on a plain socket, so a test can hang up at a moment it chooses
    (after an event it has seen), instead of relying on a client-side timeout."""

    def __init__(self, base_url: str, path: str, body: dict, headers: dict[str, str] | None = None):
        host, port = base_url.removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
                 f"Content-Length: {len(payload)}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)

    def hang_up(self) -> None:
        self.sock.close()


class HeldRequest:
    """An HTTP/1.1 POST whose body the test sends when it chooses.

    The headers go out with `Expect: 100-continue`; uvicorn answers `100 Continue` when the
    route starts reading the body, so `wait_until_reading()` returns once the request is provably
    being answered by the application. `finish()` sends the body and returns (status, JSON body).
    """

    def __init__(self, base_url: str, path: str, body: dict):
        host, port = base_url.removeprefix("http://").split(":")
        self.payload = json.dumps(body).encode()
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
                f"Content-Length: {len(self.payload)}", "Expect: 100-continue", "Connection: close"]
        self.sock = socket.create_connection((host, int(port)), timeout=120)  # bounds a hang only
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

    def wait_until_reading(self) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = self.sock.recv(4096)
            assert chunk, f"the server closed the connection: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 100 "), received

    def finish(self) -> tuple[int, dict]:
        self.sock.sendall(self.payload)
        received = b""
        while chunk := self.sock.recv(65536):
            received += chunk
        self.sock.close()
        head, _, body = received.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)


def wait_for(condition, what: str, timeout: float = 120.0, interval: float = 0.02):
    """Poll until `condition()` is truthy and return it. The timeout only bounds a hang: it is
    far longer than the event needs on any machine, and no test asserts on elapsed time."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout} s")
        time.sleep(interval)


def sse_payloads(lines) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order ([DONE] included)."""
    return [line[len("data:") :].strip() for line in lines if line.startswith("data:")]


def stream_chunks(client: httpx.Client, body: dict) -> tuple[list[dict], bool]:
    """POST a streaming completion; return (the JSON chunks, whether [DONE] ended the stream)."""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r.iter_lines())
    done = bool(payloads) and payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads if p != "[DONE]"], done


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition (0 if absent)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0
