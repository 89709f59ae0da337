"""Per-request observability at the HTTP edge: request ids, the access log, HTTP counters.

`RequestLogMiddleware` wraps the whole ASGI application, outside Starlette's own error
middleware, so that every response passes through it, the 500s of unexpected exceptions
included. For each HTTP request it

- takes the client's `X-Request-ID` when it is sane (1-128 characters of `[A-Za-z0-9._:+/=-]`,
  so that nothing odd reaches log lines), else generates one, and returns it on the response;
- counts the response in `nanogpt_mlx_http_requests_total{route,method,status}` and, for every
  4xx/5xx, in `nanogpt_mlx_http_errors_total{status,code}` (code: the OpenAI error code the
  error handlers noted, or `client_disconnected` for a 499, else `none`);
- writes one line on the logger `nanogpt_mlx.access` once the response has ended (for a stream:
  after its last event), as key=value text or as one JSON object:

      request_id method path status prompt_tokens completion_tokens latency_s client [prompts]

Token counts appear for completions only: the prompt tokens once per prompt, as in `usage`, and
the tokens generated so far (all of them unless the client left early). Prompt text is logged only
with `--log-prompts`. The route handlers hand their facts over through the `RequestRecord` kept
in the ASGI scope (`note_completion`, `note_submission`, `note_error_code`).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nanogpt_mlx.server.completions import Plan
    from nanogpt_mlx.server.engine import Submission
    from nanogpt_mlx.server.metrics import ServerMetrics

access_log = logging.getLogger("nanogpt_mlx.access")

REQUEST_ID_HEADER = "x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
_RECORD_KEY = "nanogpt_mlx.request"  # where the RequestRecord lives in the ASGI scope
# Methods get their own label value; anything else is "OTHER", so clients cannot grow the label set.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CLIENT_CLOSED_REQUEST = 499


@dataclass
class RequestRecord:
    """What is known about one HTTP request, filled in as it is answered."""

    request_id: str
    method: str
    path: str
    client: str | None
    status: int | None = None
    error_code: str | None = None
    prompt_tokens: int | None = None
    prompts: list[str] | None = None  # only when prompts are to be logged
    submission: Submission | None = None
    log_prompts: bool = False

    @property
    def completion_tokens(self) -> int | None:
        if self.submission is None:
            return None
        return self.submission.completion_tokens


# --- hooks for the route handlers ----------------------------------------------------------------
def request_record(scope: dict) -> RequestRecord | None:
    return scope.get(_RECORD_KEY)


def note_error_code(scope: dict, code: str | None) -> None:
    """The OpenAI error code of the error response being rendered (labels the error counter)."""
    record = request_record(scope)
    if record is not None:
        record.error_code = code


def note_completion(scope: dict, plan: Plan) -> None:
    record = request_record(scope)
    if record is None:
        return
    record.prompt_tokens = plan.prompt_tokens
    if record.log_prompts:
        record.prompts = list(plan.prompt_texts)


def note_submission(scope: dict, submission: Submission) -> None:
    record = request_record(scope)
    if record is not None:
        record.submission = submission


# --- the middleware ---------------------------------------------------------------------------------
class RequestLogMiddleware:
    """ASGI middleware: X-Request-ID, HTTP counters and the access log line (see the module doc)."""

    def __init__(self, app, metrics: ServerMetrics, access_log_format: str = "text", log_prompts: bool = False):
        if access_log_format not in ("text", "json", "off"):
            raise ValueError(f"access_log_format must be text, json or off, not {access_log_format!r}")
        self.app = app
        self.metrics = metrics
        self.format = access_log_format
        self.log_prompts = log_prompts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        client = scope.get("client")
        record = RequestRecord(
            request_id=_request_id(scope.get("headers", ())),
            method=scope["method"],
            path=scope["path"],
            client=f"{client[0]}:{client[1]}" if client else None,
            log_prompts=self.log_prompts,
        )
        scope[_RECORD_KEY] = record
        id_header = (REQUEST_ID_HEADER.encode(), record.request_id.encode())

        async def send_with_request_id(message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        except BaseException:
            if record.status is None:  # nothing was sent: the server answers 500 or drops the connection
                record.status = 500
                record.error_code = record.error_code or "internal_error"
            raise
        finally:
            self._finish(scope, record, time.perf_counter() - started)

    def _finish(self, scope: dict, record: RequestRecord, latency: float) -> None:
        status = record.status if record.status is not None else 500
        if status >= 400 and record.error_code is None:
            record.error_code = "client_disconnected" if status == CLIENT_CLOSED_REQUEST else None
        if self.metrics.enabled:
            route = scope.get("route")
            route_label = getattr(route, "path", None) or "unmatched"
            method = record.method if record.method in _KNOWN_METHODS else "OTHER"
            self.metrics.http_requests.labels(route=route_label, method=method, status=str(status)).inc()
            if status >= 400:
                self.metrics.count_error(status, record.error_code)
        if self.format != "off" and access_log.isEnabledFor(logging.INFO):
            access_log.info(self._line(record, status, latency))

    def _line(self, record: RequestRecord, status: int, latency: float) -> str:
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "method": record.method,
            "path": record.path,
            "status": status,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "latency_s": round(latency, 6),
            "client": record.client,
        }
        if status >= 400:
            fields["error_code"] = record.error_code
        if record.prompts is not None:
            fields["prompts"] = record.prompts
        if self.format == "json":
            fields = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **fields}
            return json.dumps(fields, ensure_ascii=False)
        # key=value pairs; values that are absent are left out, strings with spaces or quotes are JSON-quoted.
        return " ".join(f"{key}={_text_value(value)}" for key, value in fields.items() if value is not None)


def _request_id(headers) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER.encode():
            given = value.decode("latin-1")
            if _SANE_REQUEST_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, str) and re.fullmatch(r"[^\s\"=]+", value):
        return value
    return json.dumps(value, ensure_ascii=False)


# --- wiring -------------------------------------------------------------------------------------------
def install(app, metrics: ServerMetrics, access_log_format: str, log_prompts: bool) -> None:
    """Wrap `app`'s complete middleware stack (Starlette's ServerErrorMiddleware included).

    `app.add_middleware` would place us inside ServerErrorMiddleware, whose 500 responses would
    then bypass us (no request id, no log line, no count); wrapping what `build_middleware_stack`
    returns puts us outermost while `app` stays a FastAPI application.
    """
    build = app.build_middleware_stack

    def build_observed_stack():
        return RequestLogMiddleware(build(), metrics, access_log_format, log_prompts)

    app.build_middleware_stack = build_observed_stack


def configure_logging(access_log_format: str) -> None:
    """For `serve`: JSON access lines go to stderr bare (one JSON object a line, nothing around it);
    text lines go through the root logger's format like every other log line."""
    if access_log_format != "json":
        return
    if any(getattr(h, "_nanogpt_mlx_access", False) for h in access_log.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._nanogpt_mlx_access = True  # type: ignore[attr-defined]
    access_log.addHandler(handler)
    access_log.propagate = False
