"""Fuzz `nanogpt-mlx serve` from its own OpenAPI schema with schemathesis.

    python tests/fuzz.py --model checkpoints/default --max-examples 1000 --out fuzz.json
    python tests/fuzz.py --url http://127.0.0.1:8000 --max-examples 1000

For each of POST /v1/completions, /v1/chat/completions, /tokenize and /detokenize, schemathesis
generates `--max-examples` bodies that fit the schema the server publishes at /openapi.json
(positive) and as many that break it (negative: wrong types, missing fields, bytes that are not
JSON...), and every answer is checked:

- no 5xx;
- every error has OpenAI's shape, exactly `{"error": {"message", "type", "param", "code"}}`;
- a 200 is a JSON object, or for a stream server-sent events of JSON chunks ending with
  `[DONE]` and no error event;
- a body the schema admits is never refused for its form (`unknown_parameter`,
  `missing_required_parameter`, `invalid_json`, ...; refusals for what the values mean, such as
  a prompt longer than the context, are fine), and a body the schema forbids is never answered 200
  (the schema describes exactly what the server accepts);

and afterwards the server must be healthy with every slot free. Exit code 0 when nothing was
found, else 1. tests/test_fuzz.py runs a bounded count in CI.

This process never imports nanogpt_mlx: its runtime sets FTZ/DAZ, under which Hypothesis
refuses to generate floats.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode

OPERATIONS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
# Refusals that say the body's form is wrong: a body the schema admits must never get one.
FORM_ERRORS = frozenset({"unknown_parameter", "missing_required_parameter", "invalid_json", "invalid_encoding",
                         "invalid_content_type", "invalid_request"})
ERROR_KEYS = {"message", "type", "param", "code"}
REQUEST_TIMEOUT = 600.0  # bounds a hang only


@dataclass
class FuzzReport:
    cases: Counter = field(default_factory=Counter)  # "POST /path positive" -> bodies sent
    statuses: Counter = field(default_factory=Counter)  # "POST /path positive 400 invalid_value" -> count
    examples: dict[str, str] = field(default_factory=dict)  # the first error message of each status label
    problems: list[str] = field(default_factory=list)
    healthy_after: bool = False
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    def as_dict(self) -> dict:
        return {"total": self.total, "cases": dict(self.cases), "statuses": dict(sorted(self.statuses.items())),
                "examples": dict(sorted(self.examples.items())), "problems": self.problems[:100],
                "problem_count": len(self.problems), "healthy_after": self.healthy_after, "seconds": round(self.seconds, 1)}


def error_shape_problem(body) -> str | None:
    """Why `body` is not OpenAI's error object, or None."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return f"not {{'error': ...}}: {str(body)[:200]}"
    error = body["error"]
    if not isinstance(error, dict) or set(error) != ERROR_KEYS:
        return f"error keys {sorted(error) if isinstance(error, dict) else type(error).__name__} != {sorted(ERROR_KEYS)}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return f"bad message or type: {error}"
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return f"param and code must be strings or null: {error}"
    return None


def stream_problem(text: str) -> str | None:
    """Why `text` is not a well-formed stream of JSON chunks ending in [DONE], or None."""
    payloads = [line[len("data:") :].strip() for line in text.splitlines() if line.startswith("data:")]
    if not payloads or payloads[-1] != "[DONE]":
        return f"the stream does not end with [DONE]: {payloads[-3:]}"
    for payload in payloads[:-1]:
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            return f"a stream event is not JSON: {payload[:200]}"
        if not isinstance(chunk, dict) or "error" in chunk:
            return f"an error event in a stream: {payload[:300]}"
    return None


def check(mode: GenerationMode, status: int, content_type: str, content: bytes) -> tuple[str, str | None]:
    """(a label for the statistics, the problem found or None)."""
    if status >= 500:
        return str(status), f"{status}: {content[:300]!r}"
    if status >= 400:
        try:
            body = json.loads(content)
        except ValueError:
            return str(status), f"{status} with a body that is not JSON: {content[:200]!r}"
        problem = error_shape_problem(body)
        if problem:
            return str(status), f"{status}: {problem}"
        code = body["error"]["code"]
        if mode == GenerationMode.POSITIVE and code in FORM_ERRORS:
            return f"{status} {code}", f"a body the schema admits was refused for its form: {body['error']['message']}"
        return f"{status} {code}", None
    if status != 200:
        return str(status), f"unexpected status {status}"
    if mode == GenerationMode.NEGATIVE:
        return "200", "a body the schema forbids was answered 200"
    if content_type.startswith("text/event-stream"):
        return "200 stream", stream_problem(content.decode("utf-8", "replace"))
    try:
        body = json.loads(content)
    except ValueError:
        return "200", f"200 with a body that is not JSON: {content[:200]!r}"
    return "200", None if isinstance(body, dict) else f"200 with a body that is not an object: {str(body)[:200]}"


def fuzz(base_url: str, max_examples: int, seed_value: int = 0, operations=OPERATIONS, modes=MODES, progress: bool = True) -> FuzzReport:
    """Send `max_examples` generated bodies per operation and mode; check every answer and the
    server's health afterwards."""
    report = FuzzReport()
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
        for path in operations:
            for mode in modes:
                label = f"POST {path} {mode.value}"
                fuzz_operation(client, base_url, schema[path]["POST"], mode, label, report, max_examples, seed_value)
                if progress:
                    print(f"{label}: {report.cases[label]} cases", file=sys.stderr, flush=True)
    report.healthy_after = wait_until_idle(base_url)
    if not report.healthy_after:
        report.problems.append(f"the server is not healthy and idle afterwards: {health(base_url)}")
    report.seconds = time.monotonic() - started
    return report


def fuzz_operation(client: httpx.Client, base_url: str, operation, mode: GenerationMode, label: str, report: FuzzReport,
                   max_examples: int, seed_value: int) -> None:
    @settings(max_examples=max_examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(seed_value)
    @given(operation.as_strategy(generation_mode=mode))
    def send(case) -> None:
        # Sent by httpx rather than `case.call`: schemathesis reads only the first events of a
        # stream, and a stream must be read to its end to be checked.
        request = case.as_transport_kwargs(base_url=base_url)
        if "json" in request:
            content = json.dumps(request["json"]).encode()  # NaN and lone surrogates as Python writes them
        else:
            content = request.get("data") or b""
            content = content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content
        response = client.request(request["method"], request["url"], params=request.get("params"), headers=request["headers"],
                                  content=content)
        kind, problem = check(mode, response.status_code, response.headers.get("content-type", ""), response.content)
        report.cases[label] += 1
        report.statuses[f"{label} {kind}"] += 1
        if response.status_code >= 400 and f"{label} {kind}" not in report.examples:
            report.examples[f"{label} {kind}"] = response.text[:300]
        if problem:
            report.problems.append(f"{label}: {problem}\n    body: {content[:2000]!r}")

    send()


def health(base_url: str) -> tuple[int, dict | str]:
    try:
        r = httpx.get(base_url + "/health", timeout=30)
        return r.status_code, r.json()
    except (httpx.HTTPError, ValueError) as exc:
        return 0, repr(exc)


def wait_until_idle(base_url: str, timeout: float = 120.0) -> bool:
    """/health answers 200 with every slot free (cancelled sequences free theirs at the next step)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = health(base_url)
        if status == 200 and body["slots_free"] == body["slots_total"] and body["running"] == 0 and body["waiting"] == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def start_server(model: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "nanogpt_mlx", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--access-log", "off", *extra]
    server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while health(base_url)[0] != 200:
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("the server did not start")
        time.sleep(0.2)
    return server, base_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", help="start `nanogpt-mlx serve --model DIR` and fuzz it")
    where.add_argument("--url", help="fuzz a running server")
    p.add_argument("--max-examples", type=int, default=200, help="bodies per operation and mode (positive, negative)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--operation", action="append", choices=OPERATIONS, help="only these (default: all four)")
    p.add_argument("--out", type=Path, help="write the report as JSON here")
    p.add_argument("--quiet", action="store_true")
    args, serve_args = p.parse_known_args(argv)  # anything else goes to `serve` (with --model)

    server = None
    if args.model:
        server, base_url = start_server(args.model, serve_args)
    else:
        if serve_args:
            p.error(f"unrecognized arguments: {' '.join(serve_args)}")
        base_url = args.url.rstrip("/")
    try:
        report = fuzz(base_url, args.max_examples, args.seed, tuple(args.operation or OPERATIONS), progress=not args.quiet)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    result = report.as_dict()
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{report.total} cases in {report.seconds:.0f} s, {len(report.problems)} problems, "
          f"healthy afterwards: {report.healthy_after}")
    for name, count in sorted(report.statuses.items()):
        print(f"  {count:6d}  {name}")
    for problem in report.problems[:20]:
        print("PROBLEM " + problem)
    return 0 if not report.problems else 1


if __name__ == "__main__":
    if "nanogpt_mlx" in sys.modules:  # pragma: no cover - see the module docstring
        raise SystemExit("tests/fuzz.py must run in its own process")
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    sys.exit(main())
