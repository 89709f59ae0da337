"""Observability end to end: the real `prometheus` binary scrapes a real `nanogpt-mlx serve`, and every
PromQL expression of the shipped Grafana dashboard is evaluated through Prometheus's HTTP API after
real traffic (openai SDK and httpx, good and bad requests). Also: `promtool check config` on the
shipped config, the /metrics exposition parsed by prometheus_client, X-Request-ID and the access log
through real HTTP, a 500 from an unexpected exception, and --no-metrics.

Everything listens on 127.0.0.1 only. The Prometheus tests skip themselves when the `prometheus`
binary is absent (CI installs Debian's package: .ci/run).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import shutil
import subprocess
import threading
import time

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from nanogpt_mlx.server.metrics import _FAMILIES, DISCARD, ServerMetrics

from conftest import REPO_ROOT, cli_command, cli_env
from server_support import HOST, RawRequest, ServeProcess, ThreadedServer, free_port, metric_value, sse_payloads

pytestmark = pytest.mark.timeout(600)

DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "nanogpt-mlx.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install prometheus)")

KEY = "observability-secret"
MODEL = "nanogpt-mlx"
BODY_LIMIT = 4096
# What Grafana puts in place of its built-in interval variables; 1m spans many 1 s scrapes.
GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1m"}
# A prompt we can look for in the logs: it must never appear there unless --log-prompts is given.
SECRET_PROMPT = "The password of the vault is swordfish"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a /metrics exposition (parsed, so label order does not matter); 0 if absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] if p["type"] != "row" for t in p["targets"]]


# --- files that need no running server -------------------------------------------------------------------
def test_promtool_accepts_the_shipped_config():
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    result = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_dashboard_is_an_importable_grafana_model_with_a_datasource_variable():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"] and target["expr"]
    titles = {p["title"] for p in board["panels"]}
    for wanted in [
        "Request rate", "Tokens per second", "Time to first token", "Inter-token latency", "End-to-end latency",
        "Queue time", "Running and waiting", "Decode batch size", "KV-cache usage", "Errors by code", "Prefix cache hit rate",
    ]:  # fmt: skip
        assert wanted in titles
    exprs = " ".join(expr for _, expr in dashboard_targets())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(nanogpt_mlx_time_to_first_token_seconds_bucket" in exprs


def test_disabled_metrics_replace_every_family():
    """--no-metrics swaps every family for DISCARD; a family missing from _FAMILIES would crash the engine."""
    enabled = ServerMetrics(4)
    families = {name for name, value in vars(enabled).items() if name not in ("registry", "enabled")}
    assert families == set(_FAMILIES)
    disabled = ServerMetrics(4, enabled=False)
    assert all(getattr(disabled, name) is DISCARD for name in _FAMILIES)
    disabled.finished.labels(finish_reason="stop").inc()
    disabled.count_error(400, "invalid_value")
    with pytest.raises(RuntimeError):
        disabled.render()


# --- a real server scraped by a real Prometheus -------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    """The CLI server on a tiny model: 2 slots and 2 waiting places (so a burst gets 503s), an API key,
    a small body limit, JSON access lines."""
    env = cli_env(NANOGPT_MLX_API_KEY=KEY, NANOGPT_MLX_ACCESS_LOG="json")
    log = tmp_path_factory.mktemp("observed") / "serve.log"
    args = ["--model", str(tiny_checkpoint), "--max-batch", "2", "--max-queue", "2", "--max-body-bytes", str(BODY_LIMIT)]
    with ServeProcess(cli_command(), args, env=env, log_path=log) as proc:
        yield proc


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    """Prometheus scraping `served` every second, with the shipped config's job (only the target and
    the intervals changed), its own temporary storage, listening on 127.0.0.1."""
    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")
    work = tmp_path_factory.mktemp("prometheus")
    shipped = PROMETHEUS_CONFIG.read_text()
    assert '"127.0.0.1:8000"' in shipped and "scrape_interval: 5s" in shipped and "scrape_timeout: 4s" in shipped
    config = (
        shipped.replace('"127.0.0.1:8000"', f'"{HOST}:{served.port}"')
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("scrape_timeout: 4s", "scrape_timeout: 1s")
        .replace("evaluation_interval: 5s", "evaluation_interval: 1s")
    )
    (work / "prometheus.yml").write_text(config)
    port = free_port()
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address={HOST}:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    base_url = f"http://{HOST}:{port}"
    try:
        wait_until(lambda: httpx.get(base_url + "/-/ready", timeout=2).status_code == 200, 120, "Prometheus ready", proc)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def wait_until(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited (code {proc.returncode}) while waiting for {what}")
        try:
            result = condition()
            if result:
                return result
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not happen within {timeout} s ({last!r})")


def promql(base_url: str, expr: str) -> dict:
    r = httpx.get(base_url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert "status" in body, r.text
    return body


def scraped_value(base_url: str, expr: str) -> float | None:
    result = promql(base_url, expr)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


ERROR_REQUESTS = {
    # (status, code): how to provoke it
    (400, "invalid_value"): lambda c: c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "temperature": "hot"}),
    (400, "unknown_parameter"): lambda c: c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "bogus": 1}),
    (400, "invalid_json"): lambda c: c.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
    (400, "context_length_exceeded"): lambda c: c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 100000}),
    (401, "invalid_api_key"): lambda c: c.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"}),
    (404, "model_not_found"): lambda c: c.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"}),
    (404, "not_found"): lambda c: c.get("/v1/no-such-route"),
    (405, "method_not_allowed"): lambda c: c.get("/v1/completions"),
    (413, "request_too_large"): lambda c: c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * (2 * BODY_LIMIT)}),
}


def provoke_queue_full(base_url: str) -> int:
    """A burst of long completions on 2 slots + 2 waiting places: the rest must get 503 queue_full."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as client:
            body = {"model": MODEL, "prompt": "burst", "max_tokens": 100, "ignore_eos": True}
            responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(10)))
            for r in responses:
                assert r.status_code in (200, 503), r.text
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
            return [r.status_code for r in responses]

    for _ in range(5):
        rejected = asyncio.run(burst()).count(503)
        if rejected:
            return rejected
    raise AssertionError("10 simultaneous requests on 4 places were never refused")


@pytest.fixture(scope="module")
def traffic(served, prometheus):
    """Real traffic after Prometheus's first scrape (so every rate() sees an increase), and what it sent."""
    wait_until(lambda: scraped_value(prometheus, f'up{{instance="{HOST}:{served.port}"}}') == 1, 30, "the first scrape")
    sdk = OpenAI(base_url=served.base_url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    plain = sdk.completions.create(model=MODEL, prompt=SECRET_PROMPT, max_tokens=8, n=2, temperature=0.7, seed=1)
    streamed = list(
        sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, stream=True, stream_options={"include_usage": True})
    )
    with httpx.Client(base_url=served.base_url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as client:
        with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 6, "stream": True}) as r:
            assert r.status_code == 200
            assert sse_payloads(r.iter_lines())[-1] == "[DONE]"
        before = client.get("/metrics").text
        errors = {}
        for (status, code), send in ERROR_REQUESTS.items():
            r = send(client)
            assert r.status_code == status, (status, code, r.text)
            assert r.json()["error"]["code"] == code
            errors[(status, code)] = r
        rejected = provoke_queue_full(served.base_url)
        after = client.get("/metrics").text
    return {"plain": plain, "streamed": streamed, "errors": errors, "rejected": rejected, "before": before, "after": after}


@needs_prometheus
def test_metrics_exposition_parses_with_every_family(traffic):
    families = {f.name: f for f in text_string_to_metric_families(traffic["after"])}
    expected = {
        "nanogpt_mlx_time_to_first_token_seconds": "histogram",
        "nanogpt_mlx_inter_token_latency_seconds": "histogram",
        "nanogpt_mlx_request_duration_seconds": "histogram",
        "nanogpt_mlx_queue_time_seconds": "histogram",
        "nanogpt_mlx_prefill_time_seconds": "histogram",
        "nanogpt_mlx_decode_time_seconds": "histogram",
        "nanogpt_mlx_decode_batch_size": "histogram",
        "nanogpt_mlx_prompt_tokens": "counter",
        "nanogpt_mlx_generation_tokens": "counter",
        "nanogpt_mlx_prefix_cache_queries": "counter",
        "nanogpt_mlx_prefix_cache_hits": "counter",
        "nanogpt_mlx_requests_finished": "counter",
        "nanogpt_mlx_http_errors": "counter",
        "nanogpt_mlx_http_requests": "counter",
        "nanogpt_mlx_requests_running": "gauge",
        "nanogpt_mlx_requests_waiting": "gauge",
        "nanogpt_mlx_kv_cache_slots_used": "gauge",
        "nanogpt_mlx_kv_cache_slots_total": "gauge",
        "process_cpu_seconds": "counter",
        "process_resident_memory_bytes": "gauge",
    }
    for name, kind in expected.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
    # (prometheus-client also exposes each counter's and histogram's start time as a *_created gauge)
    ours = [name for name in families if name.startswith("nanogpt_mlx_") and not name.endswith("_created")]
    for name in ours:  # Prometheus conventions: base units in the name, counters end in _total
        kind = families[name].type
        if kind == "counter":
            assert any(s.name == name + "_total" for s in families[name].samples), name
        if "time" in name or "duration" in name or "latency" in name:
            assert name.endswith("_seconds"), name
    text = traffic["after"]
    assert metric_value(text, "nanogpt_mlx_kv_cache_slots_total") == 2
    assert metric_value(text, "nanogpt_mlx_generation_tokens_total") >= 8 * 2 + 12 + 6
    assert metric_value(text, "nanogpt_mlx_time_to_first_token_seconds_count") >= 4
    # n = 2: the second choice copies the first one's prompt (all but its last token) from the prefix cache
    prompt_tokens = traffic["plain"].usage.prompt_tokens
    assert metric_value(text, "nanogpt_mlx_prefix_cache_hits_total") >= prompt_tokens - 1 > 0


@needs_prometheus
def test_every_error_response_is_counted_by_status_and_code(traffic):
    before, after = traffic["before"], traffic["after"]

    def count(text: str, status: int, code: str) -> float:
        return sample(text, "nanogpt_mlx_http_errors_total", status=str(status), code=code)

    for status, code in ERROR_REQUESTS:
        assert count(after, status, code) - count(before, status, code) == 1, (status, code)
    assert count(after, 503, "queue_full") - count(before, 503, "queue_full") == traffic["rejected"]
    requests = sample(after, "nanogpt_mlx_http_requests_total", route="/v1/completions", method="POST", status="200")
    assert requests >= 3


@needs_prometheus
def test_every_dashboard_query_returns_data_in_a_real_prometheus(served, prometheus, traffic):
    instance = f"{HOST}:{served.port}"
    # The dashboard's $instance variable: label_values(nanogpt_mlx_kv_cache_slots_total, instance) lists us.
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "instance")
    metric, label = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]).groups()
    values = httpx.get(prometheus + f"/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10).json()
    assert instance in values["data"], values
    # Grafana's "All" of a multi-value variable: an alternation of its values, each regex-escaped with
    # the backslashes doubled for PromQL's double-quoted strings (as Grafana's Prometheus data source does).
    substitutions = {**GRAFANA_INTERVALS, "instance": "(" + re.escape(instance).replace("\\", "\\\\") + ")"}

    def substitute(expr: str) -> str:
        def one(match: re.Match) -> str:
            name = match.group(1) or match.group(2)
            assert name in substitutions, f"unknown variable ${name} in {expr}"
            return substitutions[name]

        return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)

    # Wait until Prometheus has scraped the traffic (the counter it saw reaches what /metrics said).
    sent_tokens = metric_value(traffic["after"], "nanogpt_mlx_generation_tokens_total")
    wait_until(
        lambda: (scraped_value(prometheus, f'nanogpt_mlx_generation_tokens_total{{instance="{instance}"}}') or 0) >= sent_tokens,
        30,
        "a scrape after the traffic",
    )

    def problems() -> list[str]:
        found = []
        for title, expr in dashboard_targets():
            body = promql(prometheus, substitute(expr))
            if body["status"] != "success":
                found.append(f"{title}: {expr} -> {body.get('errorType')}: {body.get('error')}")
                continue
            result = body["data"]["result"]
            values = [float(series["value"][1]) for series in result]
            if not values:
                found.append(f"{title}: {expr} -> no data")
            elif ("histogram_quantile" in expr or "tokens_total" in expr) and not any(math.isfinite(v) and v > 0 for v in values):
                found.append(f"{title}: {expr} -> {values} (expected a positive value after the traffic)")
        return found

    # Series born during the traffic (an error code's first count) need two scrapes for rate();
    # the deadline only bounds a hang.
    deadline = time.monotonic() + 180
    while (remaining := problems()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not remaining, "\n".join(remaining)


# --- request ids and the access log -----------------------------------------------------------------------
def access_lines(served: ServeProcess) -> list[dict]:
    lines = []
    for line in served.log().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_request_ids_are_echoed_or_generated(served):
    with httpx.Client(base_url=served.base_url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as client:
        mine = client.post(
            "/v1/completions", json={"model": MODEL, "prompt": "id", "max_tokens": 2}, headers={"X-Request-ID": "client-id-42"}
        )
        assert mine.status_code == 200 and mine.headers["x-request-id"] == "client-id-42"
        insane = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces"})
        generated = [insane.headers["x-request-id"], client.get("/health").headers["x-request-id"]]
        too_long = client.get("/health", headers={"X-Request-ID": "x" * 129}).headers["x-request-id"]
        for rid in [*generated, too_long]:
            assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
        assert len({*generated, too_long}) == 3
        error = client.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"X-Request-ID": "err-1"})
        assert error.status_code == 404 and error.headers["x-request-id"] == "err-1"
        with client.stream(
            "POST",
            "/v1/completions",
            json={"model": MODEL, "prompt": "s", "max_tokens": 2, "stream": True},
            headers={"X-Request-ID": "stream-1"},
        ) as r:
            assert r.headers["x-request-id"] == "stream-1"
            r.read()


def test_json_access_log_has_ids_status_tokens_latency_and_no_prompt(served):
    rid = f"log-check-{time.monotonic_ns()}"
    with httpx.Client(base_url=served.base_url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as client:
        body = {"model": MODEL, "prompt": SECRET_PROMPT, "max_tokens": 5, "ignore_eos": True}
        sent = time.monotonic()
        usage = client.post("/v1/completions", json=body, headers={"X-Request-ID": rid}).json()["usage"]
        elapsed = time.monotonic() - sent  # the server's latency lies within what the client waited
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}, headers={"X-Request-ID": rid + "-s"}) as r:
            r.read()
        client.post("/v1/completions", json={**body, "model": "nope"}, headers={"X-Request-ID": rid + "-e"})

    def find(request_id: str) -> dict:
        line = lambda: next((entry for entry in access_lines(served) if entry["request_id"] == request_id), None)  # noqa: E731
        return wait_until(line, 120, f"log line {request_id}")

    line = find(rid)
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/completions", 200)
    assert (
        (line["prompt_tokens"], line["completion_tokens"])
        == (usage["prompt_tokens"], usage["completion_tokens"])
        == (usage["prompt_tokens"], 5)
    )
    assert 0 < line["latency_s"] <= elapsed and line["client"].startswith(HOST)
    assert "time" in line and "prompts" not in line
    streamed = find(rid + "-s")
    assert (streamed["status"], streamed["completion_tokens"]) == (200, 5)
    failed = find(rid + "-e")
    assert (failed["status"], failed["error_code"], failed["completion_tokens"]) == (404, "model_not_found", None)
    assert SECRET_PROMPT not in served.log()
    assert "uvicorn.access" not in served.log()  # ours replaces uvicorn's access log


def test_text_access_log_and_prompts_only_when_asked(tiny_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="nanogpt_mlx.access")
    with ThreadedServer(tiny_checkpoint, access_log="text") as server:
        httpx.post(
            server.base_url + "/v1/completions",
            json={"prompt": SECRET_PROMPT, "max_tokens": 3},
            headers={"X-Request-ID": "text-1"},
            timeout=30,
        )
    with ThreadedServer(tiny_checkpoint, access_log="text", log_prompts=True) as server:
        httpx.post(
            server.base_url + "/v1/completions",
            json={"prompt": SECRET_PROMPT, "max_tokens": 3},
            headers={"X-Request-ID": "text-2"},
            timeout=30,
        )
    lines = {r.getMessage().split()[0]: r.getMessage() for r in caplog.records if r.name == "nanogpt_mlx.access"}
    plain, with_prompt = lines["request_id=text-1"], lines["request_id=text-2"]
    fields = dict(part.split("=", 1) for part in plain.split())
    assert fields["method"] == "POST" and fields["path"] == "/v1/completions" and fields["status"] == "200"
    assert int(fields["prompt_tokens"]) > 0 and fields["completion_tokens"] == "3" and float(fields["latency_s"]) > 0
    assert SECRET_PROMPT not in plain
    assert f"prompts={json.dumps([SECRET_PROMPT])}" in with_prompt


def test_unexpected_exception_is_a_500_with_request_id_log_line_and_count(tiny_checkpoint, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="nanogpt_mlx.access")
    with ThreadedServer(tiny_checkpoint) as server:

        def broken_plan(req):
            raise RuntimeError("a bug")

        monkeypatch.setattr(server.ctx.completions, "plan", broken_plan)
        r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x"}, headers={"X-Request-ID": "boom-1"}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert r.headers["x-request-id"] == "boom-1"
        text = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert sample(text, "nanogpt_mlx_http_errors_total", status="500", code="internal_error") == 1
    line = next(r.getMessage() for r in caplog.records if r.name == "nanogpt_mlx.access" and "request_id=boom-1" in r.getMessage())
    assert "status=500" in line and "error_code=internal_error" in line


def test_client_leaving_a_non_streaming_request_is_logged_and_counted_as_499(tiny_checkpoint, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="nanogpt_mlx.access")
    with ThreadedServer(tiny_checkpoint) as server:
        runner = server.ctx.engine.runner
        decode = runner.decode
        decoding, released = threading.Event(), threading.Event()

        def held_decode(tokens, positions):  # a model that waits until the client has left
            decoding.set()  # the prefill is done: the first token exists
            released.wait(120)
            return decode(tokens, positions)

        monkeypatch.setattr(runner, "decode", held_decode)

        def count() -> float:
            text = httpx.get(server.base_url + "/metrics", timeout=10).text
            return sample(text, "nanogpt_mlx_http_errors_total", status="499", code="client_disconnected")

        request = RawRequest(server.base_url, "/v1/completions", {"prompt": "x", "max_tokens": 100}, headers={"X-Request-ID": "gone-1"})
        assert decoding.wait(120), "no decode step"
        request.hang_up()
        wait_until(lambda: count() == 1, 120, "the 499 to be counted")
        released.set()
    line = next(r.getMessage() for r in caplog.records if r.name == "nanogpt_mlx.access" and "request_id=gone-1" in r.getMessage())
    assert "status=499" in line and "error_code=client_disconnected" in line
    completion_tokens = int(re.search(r"completion_tokens=(\d+)", line).group(1))
    assert 0 < completion_tokens < 100  # what was generated until the slot was freed


def test_no_metrics_setting_removes_the_endpoint_and_keeps_serving(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, metrics=False) as server:
        assert server.ctx.metrics.enabled is False
        r = httpx.post(server.base_url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert r.headers["x-request-id"]
        assert httpx.get(server.base_url + "/metrics", timeout=10).status_code == 404
