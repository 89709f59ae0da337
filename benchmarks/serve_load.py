"""Streaming load on `nanogpt-mlx serve`: output tok/s, TTFT and inter-token latency under concurrency.

Starts the server itself on 127.0.0.1 (a free port), then for each concurrency level C runs C
clients that each send streaming completions back to back (64 new tokens each, `ignore_eos` so
every completion has exactly that length; every prompt unique, so no server's prompt cache
helps), and reports:

    output tok/s   completion tokens of the level / its wall time (first send to last byte)
    TTFT           send -> first streamed token, p50 / p95 over requests
    ITL            gaps between consecutive streamed chunks of a request, p50 / p95
    TPOT           per request (last token - first token) / (tokens - 1), mean

Without --model it measures a random-weight model of the full default shape (written to a
temporary directory), as the peer figures in ../shared/README.md were measured. With --url it
loads an OpenAI-compatible server that is already running instead (e.g. llama.cpp's
`llama-server` on a GGUF of the same model, for a side-by-side figure on the same machine).

    python -m nanogpt_mlx.benchmarks.serve_load                      # c = 1, 8, 32
    python -m nanogpt_mlx.benchmarks.serve_load --concurrency 32 --requests-per-client 4 --out load.json
    python -m nanogpt_mlx.benchmarks.serve_load --url http://127.0.0.1:8080        # a running peer
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from nanogpt_mlx.benchmarks.stats import percentile

PASSAGE = (
    "The library stood at the end of a long street, its windows bright against the evening. "
    "Inside, readers bent over old books while the clock above the door counted the hours"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_full_size_checkpoint(directory: Path) -> Path:
    import nanogpt_mlx  # noqa: F401  (prepares the runtime before mlx.core)
    # isort: split
    from nanogpt_mlx.model.checkpoint import save_checkpoint
    from nanogpt_mlx.model.config import ModelConfig
    from nanogpt_mlx.model.gpt import GPT

    return save_checkpoint(GPT(ModelConfig()), directory / "random-full")


def start_server(model_dir: Path, port: int, max_batch: int, extra: list[str], log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "nanogpt_mlx", "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--max-batch", str(max_batch), "--log-level", "warning", *extra]
    log = open(log_path, "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not become healthy")


async def one_request(
    client: httpx.AsyncClient, prompt: str | list[int], max_tokens: int, temperature: float, extra: dict | None = None
) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    sent = time.perf_counter()
    arrivals: list[float] = []
    texts: list[str] = []
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    return {"error": chunk["error"]["message"] if isinstance(chunk["error"], dict) else str(chunk["error"])}
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    arrivals.append(time.perf_counter())
                    texts.append(chunk["choices"][0]["text"])
                if chunk.get("usage"):  # a usage-only chunk (OpenAI), or usage on the last chunk (llama-server)
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return {"error": repr(exc)}
    if not arrivals:
        return {"error": "no tokens"}
    # A server that reports no usage: one streamed chunk per token (the servers measured here stream token by token).
    return {"sent": sent, "arrivals": arrivals, "tokens": tokens or len(arrivals), "done": time.perf_counter(), "text": "".join(texts)}


async def run_level(
    base_url: str, concurrency: int, per_client: int, max_tokens: int, temperature: float, keep_samples: bool = False
) -> dict:
    """`concurrency` clients, each sending `per_client` streaming completions back to back (closed loop).

    With `keep_samples` the result also holds every TTFT, inter-token gap and end-to-end time
    (seconds) under "samples", for distributions.
    """
    # Every prompt is new and differs from the others from its second token on: a server with a
    # prompt cache (llama-server reuses a slot's KV for a repeated prompt or prefix, then
    # evaluates 1 token instead of ~40) must not be measured on prompts it has already seen.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        await one_request(client, f"warm up {secrets.token_hex(4)} " + PASSAGE, 8, temperature)

        async def worker(w: int) -> list[dict]:
            prompts = [f"Request {secrets.token_hex(4)}-{w}-{i}. {PASSAGE}" for i in range(per_client)]
            return [await one_request(client, prompt, max_tokens, temperature) for prompt in prompts]

        started = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(concurrency))) for r in rs]
        wall = time.perf_counter() - started
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    ttft = [r["arrivals"][0] - r["sent"] for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    e2e = [r["done"] - r["sent"] for r in ok]
    tpot = [(r["arrivals"][-1] - r["arrivals"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    tokens = sum(r["tokens"] for r in ok)
    level = {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(errors),
        "error_examples": errors[:3],
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p95_s": percentile(gaps, 95),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p95_s": percentile(e2e, 95),
        "tpot_mean_s": statistics.fmean(tpot) if tpot else float("nan"),
    }
    if keep_samples:
        level["samples"] = {"ttft_s": ttft, "itl_s": gaps, "e2e_s": e2e}
    return level


def print_table(levels: list[dict]) -> None:
    print(f"{'conc':>4} {'reqs':>5} {'err':>4} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8} {'TPOT':>7}")
    for r in levels:
        print(
            f"{r['concurrency']:>4} {r['requests']:>5} {r['errors']:>4} {r['output_tok_s']:>10.1f} "
            f"{r['ttft_p50_s'] * 1e3:>7.0f}ms {r['ttft_p95_s'] * 1e3:>7.0f}ms {r['itl_p50_s'] * 1e3:>6.1f}ms "
            f"{r['itl_p95_s'] * 1e3:>6.1f}ms {r['tpot_mean_s'] * 1e3:>5.1f}ms"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: a random-weight model of the full default shape)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=3, help="sequential requests each client sends per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra `serve` flag (repeatable), e.g. --server-arg=--prefill-chunk=128")
    p.add_argument("--out", default="serve_load.json", help="where to write the JSON results")
    p.add_argument("--url", help="load this already-running OpenAI-compatible server instead of starting `serve`")
    args = p.parse_args(argv)

    if args.url:
        levels = run_levels(args.url.rstrip("/"), args)
        return report(args, levels, server_log="")

    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        tmp_path = Path(tmp)
        model_dir = Path(args.model) if args.model else random_full_size_checkpoint(tmp_path)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        log_path = tmp_path / "serve.log"
        proc = start_server(model_dir, port, args.max_batch, args.server_arg, log_path)
        try:
            wait_healthy(base_url, proc)
            levels = run_levels(base_url, args)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
            server_log = log_path.read_text()
    return report(args, levels, server_log)


def run_levels(base_url: str, args) -> list[dict]:
    levels = []
    for c in args.concurrency:
        level = asyncio.run(run_level(base_url, c, args.requests_per_client, args.max_tokens, args.temperature))
        levels.append(level)
        print(f"concurrency {c}: {level['output_tok_s']:.1f} output tok/s, TTFT p95 {level['ttft_p95_s'] * 1e3:.0f} ms, "
              f"{level['errors']} errors", flush=True)
    return levels


def report(args, levels: list[dict], server_log: str) -> int:
    print()
    print_table(levels)
    result = {
        "benchmark": "serve_load",
        "server": args.url or "nanogpt-mlx serve",
        "model": str(args.model or "random full-size (8 x 384, 52,990,464 parameters)"),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "max_batch": args.max_batch,
        "server_args": args.server_arg,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "levels": levels,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    if any(level["errors"] for level in levels):
        if server_log:
            print(server_log[-3000:], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
