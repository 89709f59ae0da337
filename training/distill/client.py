"""HTTP to a teacher: an OpenAI-compatible server, asked patiently.

`TeacherClient` wraps one `httpx.Client` (connection pool sized to the concurrency) and retries
what a busy or flaky server answers: 429 and 5xx (waiting the `Retry-After` the server names, or
an exponential backoff with jitter when it names none), timeouts and dropped connections. A 4xx
other than 408/429 is the request's fault and comes back at once as `TeacherRejected`, so the
caller can adapt (fewer logprobs, a shorter window) or stop with a clear error. Every outcome is
counted in `RequestStats` (what the progress bar and the proof report).
"""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from nanogpt_mlx.training.recipe import TrainingError

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class TeacherRejected(Exception):
    """The teacher answered 4xx: the request itself is wrong (retrying will not help)."""

    def __init__(self, status: int, body: dict | None, text: str):
        self.status, self.body, self.text = status, body or {}, text
        error = self.body.get("error") if isinstance(self.body.get("error"), dict) else {}
        self.message = str(error.get("message") or self.body.get("message") or self.body.get("detail") or text)[:500]
        self.param = error.get("param")
        self.code = error.get("code")
        super().__init__(f"HTTP {status}: {self.message}")


@dataclass
class RequestStats:
    """What one client did: attempts, answers, retries by cause, waits, tokens received."""

    attempts: int = 0
    answered: int = 0  # 2xx answers
    rejected: int = 0  # 4xx handed back to the caller
    retries: Counter = field(default_factory=Counter)  # cause -> count ("429", "500", "timeout", "connection")
    waited_seconds: float = 0.0
    tokens_received: int = 0

    @property
    def retried(self) -> int:
        return sum(self.retries.values())

    def as_dict(self) -> dict:
        return {"attempts": self.attempts, "answered": self.answered, "rejected": self.rejected,
                "retries": dict(sorted(self.retries.items())), "retried": self.retried,
                "waited_seconds": round(self.waited_seconds, 3), "tokens_received": self.tokens_received}


def retry_after_seconds(value: str | None) -> float | None:
    """A `Retry-After` header as seconds: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def endpoint_url(base_url: str, path: str) -> str:
    """`base` may or may not end in /v1 (both are common in OpenAI clients' configuration)."""
    base = base_url.rstrip("/")
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return f"{base}/v1/{path.lstrip('/')}"


class TeacherClient:
    def __init__(self, base_url: str, *, api_key: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, max_retries: int = 8, backoff: float = 0.5, max_backoff: float = 30.0,
                 max_retry_after: float = 300.0, concurrency: int = 4):
        if concurrency < 1:
            raise TrainingError(f"teacher concurrency must be >= 1, got {concurrency}")
        if max_retries < 0 or timeout <= 0:
            raise TrainingError("teacher retries must be >= 0 and its timeout > 0")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env) or None
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff, self.max_retry_after = backoff, max_backoff, max_retry_after
        self.concurrency = concurrency
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )
        self.stats = RequestStats()
        self._lock = threading.Lock()
        self._random = random.Random(0)  # jitter only: it never changes what is asked or answered

    def close(self) -> None:
        self._http.close()

    def url(self, path: str) -> str:
        return endpoint_url(self.base_url, path)

    def get(self, path: str) -> dict:
        return self._request("GET", path, None)

    def post(self, path: str, body: dict) -> dict:
        return self._request("POST", path, body)

    def _count(self, **changes) -> None:
        with self._lock:
            for name, value in changes.items():
                if name == "retry":
                    self.stats.retries[value] += 1
                else:
                    setattr(self.stats, name, getattr(self.stats, name) + value)

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        url = self.url(path)
        last = ""
        for attempt in range(self.max_retries + 1):
            self._count(attempts=1)
            wait = None
            try:
                response = self._http.request(method, url, json=body)
            except httpx.TimeoutException as exc:
                cause, last = "timeout", f"no answer within {self.timeout:g} s ({type(exc).__name__})"
            except httpx.TransportError as exc:  # refused, reset, closed mid-answer, ...
                cause, last = "connection", f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    try:
                        answer = response.json()
                    except ValueError:
                        cause, last = "bad-json", f"HTTP {response.status_code} with a body that is not JSON"
                    else:
                        self._count(answered=1)
                        return answer
                elif response.status_code in RETRYABLE_STATUS:
                    cause, last = str(response.status_code), f"HTTP {response.status_code}: {response.text[:200]}"
                    wait = retry_after_seconds(response.headers.get("retry-after"))
                    if wait is not None and wait > self.max_retry_after:
                        raise TrainingError(f"teacher {url} asks to retry after {wait:.0f} s (more than the "
                                            f"{self.max_retry_after:.0f} s this run waits): {last}")
                else:
                    self._count(rejected=1)
                    try:
                        parsed = response.json()
                    except ValueError:
                        parsed = None
                    if response.status_code in (401, 403):
                        raise TrainingError(f"teacher {url} refused the credentials (HTTP {response.status_code}): "
                                            "set the API key's environment variable (distill.api_key_env)")
                    raise TeacherRejected(response.status_code, parsed if isinstance(parsed, dict) else None, response.text[:500])
            if attempt == self.max_retries:
                break
            self._count(retry=cause)
            if wait is None:  # exponential backoff with full jitter (many clients do not retry in step)
                wait = self._random.uniform(0, min(self.backoff * 2**attempt, self.max_backoff))
            self._count(waited_seconds=wait)
            time.sleep(wait)
        raise TrainingError(f"teacher {url} is unreachable or failing after {self.max_retries + 1} attempts: {last}")
