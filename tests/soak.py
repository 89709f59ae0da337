"""Soak a `nanogpt-mlx serve` with a long mix of requests and watch its memory.

    python tests/soak.py --model checkpoints/default --requests 2000 --out soak.json
    python tests/soak.py --url http://127.0.0.1:8000 --pid 1234 --requests 2000

The mix: plain and streaming completions, n > 1, logprobs with echo, chat (plain and
streaming), prompts near the context length, and streams the client drops after a few chunks.
Every answer is checked (status, shape, token counts); the server's resident memory (VmRSS of
its process) is sampled every `--sample-every` requests. After `--warmup` requests the memory
must stop growing: the report gives the curve and the growth from the end of warm-up to the end.
The malloc tuning of the CPU runtime keeps freed memory inside the process, which is why this is
measured rather than assumed. Exit code 0 when every request was answered correctly and the
growth stays under `--max-growth` (a fraction), else 1.

tests/test_reliability.py runs a short version of this in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

KINDS = ("completion", "stream", "n", "logprobs", "chat", "chat_stream", "long", "drop")


@dataclass
class SoakReport:
    requests: int = 0
    ok: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    failures: list[str] = field(default_factory=list)
    rss_curve: list[tuple[int, int]] = field(default_factory=list)  # (requests done, RSS bytes)
    warmup: int = 0
    seconds: float = 0.0

    def growth(self) -> float:
        """RSS growth from the first sample after warm-up to the last, as a fraction."""
        after = [rss for done, rss in self.rss_curve if done >= self.warmup]
        if len(after) < 2:
            return 0.0
        return (after[-1] - after[0]) / after[0]

    def as_dict(self) -> dict:
        return {"requests": self.requests, "ok": self.ok, "failures": self.failures[:50], "failure_count": len(self.failures),
                "rss_curve": self.rss_curve, "warmup": self.warmup, "growth": self.growth(), "seconds": round(self.seconds, 1)}


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _words(rng: random.Random, n: int) -> str:
    vocabulary = "the light of day came over the hills and the river ran to the sea while men sang".split()
    return " ".join(rng.choice(vocabulary) for _ in range(n))


async def _sse(client: httpx.AsyncClient, path: str, body: dict, drop_after: int | None = None) -> list[dict]:
    chunks = []
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise AssertionError(f"{path} stream: {r.status_code} {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return chunks
            chunks.append(json.loads(payload))
            if drop_after is not None and len(chunks) >= drop_after:
                return chunks  # leaving the block drops the connection mid-stream
    raise AssertionError(f"{path}: the stream ended without [DONE]")


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random, context: int, chat: bool) -> None:
    prompt = _words(rng, rng.randint(2, 12))
    max_tokens = rng.randint(4, 24)
    if kind in ("chat", "chat_stream") and not chat:
        kind = "completion"
    if kind == "completion":
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8})
        r.raise_for_status()
        body = r.json()
        assert body["usage"]["completion_tokens"] <= max_tokens and body["choices"][0]["finish_reason"] in ("stop", "length")
    elif kind == "stream":
        chunks = await _sse(client, "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "stream": True,
                                                          "stream_options": {"include_usage": True}})
        assert chunks[-1]["usage"]["completion_tokens"] <= max_tokens
    elif kind == "n":
        n = rng.randint(2, 3)
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "n": n, "seed": rng.randint(0, 9999)})
        r.raise_for_status()
        assert sorted(c["index"] for c in r.json()["choices"]) == list(range(n))
    elif kind == "logprobs":
        r = await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "logprobs": 3, "echo": True})
        r.raise_for_status()
        lp = r.json()["choices"][0]["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    elif kind == "chat":
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens})
        r.raise_for_status()
        assert r.json()["choices"][0]["message"]["role"] == "assistant"
    elif kind == "chat_stream":
        chunks = await _sse(client, "/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                                                           {"role": "user", "content": prompt}],
                                                              "max_tokens": max_tokens, "stream": True})
        assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    elif kind == "long":
        tokens = [rng.randint(0, 50000) for _ in range(context - 8 - rng.randint(0, 40))]
        r = await client.post("/v1/completions", json={"prompt": tokens, "max_tokens": 4})
        r.raise_for_status()
        assert r.json()["usage"]["prompt_tokens"] == len(tokens)
    elif kind == "drop":
        await _sse(client, "/v1/completions", {"prompt": prompt, "max_tokens": 64, "ignore_eos": True, "stream": True},
                   drop_after=rng.randint(1, 6))


async def soak(base_url: str, pid: int, requests: int, concurrency: int, warmup: int, sample_every: int, seed: int,
               progress: bool = True) -> SoakReport:
    report = SoakReport(warmup=warmup)
    rng = random.Random(seed)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(300.0)) as client:
        info = (await client.post("/tokenize", json={"prompt": "x"})).json()
        context = int(info["max_model_len"])
        chat = (await client.post("/v1/chat/completions", json={"messages": []})).status_code != 404
        plan = [rng.choice(KINDS) for _ in range(requests)]
        todo = iter(enumerate(plan))
        report.rss_curve.append((0, rss_bytes(pid)))

        async def worker(worker_id: int) -> None:
            local = random.Random(seed * 1000 + worker_id)
            for i, kind in todo:
                try:
                    await one_request(client, kind, local, context, chat)
                    report.ok[kind] += 1
                except Exception as exc:  # recorded, not raised: the soak goes on and reports every failure
                    report.failures.append(f"request {i} ({kind}): {type(exc).__name__}: {exc}"[:300])
                report.requests += 1
                if report.requests % sample_every == 0:
                    report.rss_curve.append((report.requests, rss_bytes(pid)))
                    if progress:
                        print(f"{report.requests}/{requests} requests, RSS {report.rss_curve[-1][1] / 2**20:.0f} MiB, "
                              f"{len(report.failures)} failures", file=sys.stderr)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        if report.rss_curve[-1][0] != report.requests:
            report.rss_curve.append((report.requests, rss_bytes(pid)))
        health = (await client.get("/health")).json()
        if health.get("running") or health.get("waiting"):
            report.failures.append(f"after the soak the server still holds work: {health}")
    report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="start `nanogpt-mlx serve --model DIR` for the soak")
    where.add_argument("--url", help="soak a running server (give its --pid)")
    p.add_argument("--pid", type=int, help="the server's process id (with --url)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--warmup", type=int, default=200, help="requests before memory must stop growing")
    p.add_argument("--sample-every", type=int, default=50)
    p.add_argument("--max-growth", type=float, default=0.05, help="allowed RSS growth after warm-up (fraction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    args = p.parse_args(argv)

    server = None
    if args.model:
        port = 18000 + os.getpid() % 1000
        cmd = [sys.executable, "-m", "nanogpt_mlx", "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(port)]
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        base_url, pid = f"http://127.0.0.1:{port}", server.pid
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print("error: the server did not start", file=sys.stderr)
                return 1
            time.sleep(0.2)
    else:
        if args.pid is None:
            p.error("--url needs --pid (to read the server's memory)")
        base_url, pid = args.url.rstrip("/"), args.pid
    try:
        report = asyncio.run(soak(base_url, pid, args.requests, args.concurrency, args.warmup, args.sample_every, args.seed))
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    result = report.as_dict()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    curve = ", ".join(f"{done}:{rss / 2**20:.0f}" for done, rss in report.rss_curve)
    print(f"{report.requests} requests in {report.seconds:.0f} s, {len(report.failures)} failures; "
          f"RSS growth after warm-up {report.growth():+.2%}; curve (requests:MiB) {curve}")
    for failure in report.failures[:10]:
        print("  " + failure)
    return 0 if not report.failures and report.growth() < args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())
