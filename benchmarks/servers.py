"""The servers the suite loads side by side: `nanogpt-mlx serve`, llama.cpp's `llama-server`, `mlx_lm.server`.

Each is a `ServerSpec` (a command line and a health path); `running(spec)` starts it on a free
127.0.0.1 port, waits until it answers, and stops it (SIGTERM, then SIGKILL) on the way out,
keeping its log for the report when something fails. All get the same number of concurrent
sequences (slots), and all are idle while another is under load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from nanogpt_mlx.benchmarks.serve_load import free_port

# mlx_lm.server, started after nanogpt-mlx has prepared the process (optimized BLAS, FTZ/DAZ,
# malloc), as the in-process mlx-lm figures are: otherwise MLX's reference BLAS would decide.
MLX_LM_LAUNCHER = "import sys, nanogpt_mlx; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()"


@dataclass
class ServerSpec:
    name: str
    command: list[str]  # "{port}" is replaced by the port
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout: float = 300.0


@dataclass
class RunningServer:
    spec: ServerSpec
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def ours(model_dir: Path, slots: int, device: str) -> ServerSpec:
    return ServerSpec(
        "nanogpt-mlx",
        [
            sys.executable,
            "-m",
            "nanogpt_mlx",
            "serve",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--max-batch",
            str(slots),
            "--max-queue",
            str(max(256, 4 * slots)),
            "--device",
            device,
            "--log-level",
            "warning",
            "--access-log",
            "off",
        ],
    )


def llama_server(binary: Path, gguf: Path, slots: int, context_per_slot: int, device: str) -> ServerSpec:
    # -c is the whole KV cache, shared by the -np slots; -t the threads (all cores, as ours uses).
    return ServerSpec(
        "llama-server",
        [
            str(binary),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "-c",
            str(slots * context_per_slot),
            "-np",
            str(slots),
            "-t",
            str(os.cpu_count() or 1),
            "-ngl",
            "999" if device == "gpu" else "0",
        ],
    )


def mlx_lm_server(model_dir: Path, slots: int) -> ServerSpec:
    return ServerSpec(
        "mlx_lm.server",
        [
            sys.executable,
            "-c",
            MLX_LM_LAUNCHER,
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--decode-concurrency",
            str(slots),
            "--prompt-concurrency",
            str(slots),
            "--log-level",
            "WARNING",
        ],
    )


def _wait_healthy(base_url: str, spec: ServerSpec, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + spec.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{spec.name} exited with code {proc.returncode} while starting")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + spec.health_path, timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"{spec.name} did not answer {spec.health_path} within {spec.startup_timeout:.0f} s")


def stop(server: RunningServer) -> None:
    proc = server.process
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path) -> Iterator[RunningServer]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = log_dir / f"{spec.name}-{port}.log"
    command = [part.replace("{port}", str(port)) for part in spec.command]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **spec.env})
    server = RunningServer(spec, base_url, proc, log_path)
    try:
        try:
            _wait_healthy(base_url, spec, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; its log ends:\n{server.log_tail()}") from exc
        yield server
    finally:
        stop(server)


def complete(base_url: str, prompt: str | list[int], max_tokens: int) -> str:
    """One greedy, non-streaming completion's text (temperature 0)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": False}
    r = httpx.post(base_url + "/v1/completions", json=body, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]
