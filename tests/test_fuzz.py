"""Property-based fuzzing from the server's own OpenAPI schema, a bounded count in CI: tests/fuzz.py
(schemathesis; see its docstring for every check) against a real `nanogpt-mlx serve` on 127.0.0.1.

The fuzzer runs in a process of its own: the test process has imported nanogpt_mlx, whose CPU
runtime sets FTZ/DAZ, under which Hypothesis refuses to generate floats.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import cli_command, cli_env
from server_support import ServeProcess

pytest.importorskip("schemathesis")

FUZZ = Path(__file__).with_name("fuzz.py")
EXAMPLES = 40  # per operation and mode: 4 operations x (valid, invalid) bodies
OPERATIONS = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


@pytest.mark.timeout(900)
def test_schema_fuzzing_finds_no_5xx_and_only_openai_shaped_errors(tiny_checkpoint, tmp_path):
    args = ["--model", str(tiny_checkpoint), "--max-batch", "8", "--max-n", "4", "--access-log", "off"]
    with ServeProcess(cli_command(), args, env=cli_env(), log_path=tmp_path / "serve.log") as server:
        report_path = tmp_path / "fuzz.json"
        proc = subprocess.run([sys.executable, str(FUZZ), "--url", server.base_url, "--max-examples", str(EXAMPLES), "--seed", "16",
                               "--out", str(report_path), "--quiet"], capture_output=True, text=True, timeout=840, stdin=subprocess.DEVNULL)
        assert report_path.is_file(), proc.stdout + proc.stderr
        report = json.loads(report_path.read_text())
        assert report["problems"] == [], "\n".join(report["problems"][:10])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        for path in OPERATIONS:  # every operation was fuzzed with valid and invalid bodies, and some succeeded
            assert report["cases"][f"POST {path} positive"] >= EXAMPLES // 2, report["cases"]
            assert report["cases"][f"POST {path} negative"] >= EXAMPLES // 2, report["cases"]
            assert any(k.startswith(f"POST {path} positive 200") for k in report["statuses"]), report["statuses"]
        assert report["healthy_after"]
        health = httpx.get(server.base_url + "/health", timeout=30)
        assert health.status_code == 200 and health.json()["slots_free"] == 8
    log = server.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
