"""A fault-injecting HTTP proxy, to prove that a distillation run survives a flaky teacher.

It sits on 127.0.0.1 in front of a real server and, for a chosen fraction of requests (decided
by a seeded generator from the request's arrival number), answers 500, answers 429 with
`Retry-After`, never answers (the client's timeout fires; the proxy waits for it to hang up),
or reads the request and drops the connection without a word. Everything else is forwarded and
answered as the server answered. `counts` says what it did.

    python -m nanogpt_mlx.training.distill.faults --upstream http://127.0.0.1:8000 --port 8100 --fraction 0.3

It speaks just enough HTTP/1.1 for JSON API calls (Content-Length bodies, keep-alive).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import threading
from collections import Counter

import httpx

FAULTS = ("500", "429", "timeout", "drop")
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


class FaultProxy:
    def __init__(self, upstream: str, fraction: float = 0.3, seed: int = 0, faults: tuple[str, ...] = FAULTS,
                 retry_after: str = "1", host: str = "127.0.0.1", port: int = 0):
        unknown = set(faults) - set(FAULTS)
        if unknown or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"faults must be among {FAULTS} and fraction in [0, 1]")
        self.upstream = upstream.rstrip("/")
        self.fraction, self.seed, self.faults, self.retry_after = fraction, seed, tuple(faults), retry_after
        self.host, self.port = host, port
        self.counts: Counter = Counter()  # "requests", "forwarded", and one key per fault injected
        self.answered: Counter = Counter()  # SHA-256 of a forwarded POST body -> times the server answered it 200
        self._arrivals = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def decide(self, arrival: int) -> str | None:
        rng = random.Random(self.seed * 1_000_003 + arrival)
        if rng.random() < self.fraction:
            return self.faults[rng.randrange(len(self.faults))]
        return None

    # --- serving ------------------------------------------------------------------------------
    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        self._client = httpx.AsyncClient(timeout=None)
        server = await asyncio.start_server(self._connection, self.host, self.port)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopped.wait()
        await self._client.aclose()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, path, headers, body = request
                with self._lock:
                    arrival = self._arrivals
                    self._arrivals += 1
                    fault = self.decide(arrival)
                    self.counts["requests"] += 1
                    self.counts[fault or "forwarded"] += 1
                if fault == "drop":
                    writer.transport.abort()  # no status line, a reset connection
                    return
                if fault == "timeout":
                    await reader.read()  # say nothing until the client gives up and hangs up
                    return
                if fault == "500":
                    status, out_headers, data = 500, {"content-type": "application/json"}, \
                        b'{"error": {"message": "injected fault", "type": "server_error", "code": "injected"}}'
                elif fault == "429":
                    status, out_headers, data = 429, {"content-type": "application/json", "retry-after": self.retry_after}, \
                        b'{"error": {"message": "injected: too many requests", "type": "rate_limit_error"}}'
                else:
                    forward = {k: v for k, v in headers.items() if k not in _HOP_HEADERS}
                    answer = await self._client.request(method, self.upstream + path, headers=forward, content=body)
                    status, data = answer.status_code, answer.content
                    if status == 200 and method == "POST":
                        with self._lock:
                            self.answered[hashlib.sha256(body).hexdigest()] += 1
                    out_headers = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
                lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"content-length: {len(data)}"]
                lines += [f"{k}: {v}" for k, v in out_headers.items()]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            if not writer.transport.is_closing():
                writer.close()

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True,
                                        name="fault-proxy")
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
            503: "Service Unavailable"}


async def _read_request(reader: asyncio.StreamReader):
    """(method, path, lower-cased headers, body) of the next request; None at a clean end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
    return method, path, headers, body


def main(argv: list[str] | None = None) -> int:
    import time

    parser = argparse.ArgumentParser(description="A fault-injecting proxy in front of an HTTP server (127.0.0.1).")
    parser.add_argument("--upstream", required=True, help="the server's base URL")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--fraction", type=float, default=0.3, help="share of requests that get a fault")
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, among {','.join(FAULTS)}")
    parser.add_argument("--retry-after", default="1", help="Retry-After sent with 429s (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    proxy = FaultProxy(args.upstream, args.fraction, args.seed, tuple(args.faults.split(",")), args.retry_after,
                       port=args.port).start()
    print(f"fault proxy on {proxy.base_url} -> {proxy.upstream}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.stop()
        print(dict(proxy.counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
