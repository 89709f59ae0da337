"""The tools people point at an OpenAI/vLLM server, run unchanged against a real `nanogpt-mlx serve`
subprocess on 127.0.0.1 (tiny random checkpoint, offline, a few requests each): guidellm and aiperf
(completions and chat, streaming), lm-evaluation-harness's local-completions and
local-chat-completions with the server's remote tokenizer on a local task, the openai SDK's chat
client, and the exact requests of `vllm bench serve`. Every request must succeed, and each tool's
own report must show the token counts (or the outputs) the server produced.

A tool that is not installed skips its test; `.ci/run` installs them all (the `test` extra).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import REPO_ROOT, cli_command, cli_env
from server_support import ServeProcess

pytestmark = pytest.mark.timeout(900)

MODEL = "nanogpt-mlx"
TOOL_TIMEOUT = 600  # seconds for one tool run (most of it the tool's own start-up)


@pytest.fixture(scope="module")
def serve(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--model", str(tiny_checkpoint), "--max-batch", "8", "--log-level", "warning"]
    with ServeProcess(cli_command(), args, env=cli_env(), log_path=log) as s:
        yield s
        assert s.proc.poll() is None, s.log()  # it served every tool without dying


@pytest.fixture(scope="module")
def http(serve):
    with httpx.Client(base_url=serve.base_url, timeout=60) as client:
        yield client


def tool(name: str) -> str:
    """The tool's console script beside this interpreter (the test environment's), else skip."""
    path = Path(sys.executable).with_name(name)
    if not path.is_file():
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not installed")
        path = Path(found)
    return str(path)


def run_tool(args: list[str], cwd: Path, offline: bool = True) -> subprocess.CompletedProcess:
    env = cli_env(HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1", NO_COLOR="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:  # aiperf cannot load a local tokenizer directory with HF_HUB_OFFLINE=1 (it needs no network without it)
        env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def server_count(http: httpx.Client, body: dict) -> int:
    """The prompt tokens the server counts for a completions or chat request body."""
    query = {"messages": body["messages"]} if "messages" in body else {"prompt": body["prompt"]}
    return http.post("/tokenize", json=query).json()["count"]


# --- guidellm -------------------------------------------------------------------------------------
@pytest.mark.parametrize("request_format", ["/v1/completions", "/v1/chat/completions"])
def test_guidellm(serve, http, tiny_checkpoint, tmp_path, request_format):
    report = tmp_path / "guidellm.json"
    run_tool(
        [
            tool("guidellm"), "run",
            "--backend", f"kind=openai_http,target={serve.base_url},model={MODEL},request_format={request_format}",
            "--tokenizer", f"kind=hf_auto,model={tiny_checkpoint}",
            "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
            "--profile", "kind=concurrent,streams=2",
            "--constraint", "kind=max_requests,count=4",
            "--output", f"kind=json,path={report}",
            "--disable-console",
        ],
        cwd=tmp_path,
    )
    requests = json.loads(report.read_text())["benchmarks"][0]["requests"]
    assert (len(requests["successful"]), len(requests["errored"]), len(requests["incomplete"])) == (4, 0, 0)
    for stats in requests["successful"]:
        body = json.loads(stats["request_args"])["body"]
        assert body["ignore_eos"] is True and body["stream_options"]["continuous_usage_stats"] is True
        assert stats["prompt_tokens"] == server_count(http, body)  # counted by the server (usage), not guessed
        assert stats["output_tokens"] == 16


# --- aiperf -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint_type", ["completions", "chat"])
def test_aiperf_streaming(serve, http, tiny_checkpoint, tmp_path, endpoint_type):
    artifacts = tmp_path / "aiperf"
    run_tool(
        [
            tool("aiperf"), "profile",
            "--model", MODEL, "--url", serve.base_url, "--endpoint-type", endpoint_type, "--streaming",
            "--tokenizer", str(tiny_checkpoint), "--use-server-token-count",
            "--request-count", "4", "--concurrency", "2", "--isl", "32", "--osl", "16", "--extra-inputs", "ignore_eos:true",
            "--ui-type", "none", "--artifact-dir", str(artifacts), "--no-server-metrics", "--no-gpu-telemetry",
        ],
        cwd=tmp_path,
        offline=False,
    )
    summary = json.loads((artifacts / "profile_export_aiperf.json").read_text())
    assert summary["request_count"]["avg"] == 4
    assert not summary.get("error_request_count") and not summary.get("error_summary")
    payloads = [p for entry in json.loads((artifacts / "inputs.json").read_text())["data"] for p in entry["payloads"]]
    expected_prompts = sorted(server_count(http, p) for p in payloads)
    records = [json.loads(line) for line in (artifacts / "profile_export.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == 4 and not any(r.get("error") for r in records)
    assert sorted(r["metrics"]["usage_prompt_tokens"]["value"] for r in records) == expected_prompts
    assert sorted(r["metrics"]["input_sequence_length"]["value"] for r in records) == expected_prompts
    assert [r["metrics"]["output_token_count"]["value"] for r in records] == [16] * 4


# --- lm-evaluation-harness ----------------------------------------------------------------------------
LM_EVAL_TASKS = REPO_ROOT / "tests" / "lm_eval_tasks"


def lm_eval_samples(output: Path, task: str) -> list[dict]:
    (path,) = output.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lm_eval_local_completions_with_the_remote_tokenizer(serve, http, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval[api]
    output = tmp_path / "lm_eval"
    run_tool(
        [
            tool("lm_eval"), "--model", "local-completions",
            "--model_args",
            f"model={MODEL},base_url={serve.base_url}/v1/completions,tokenizer_backend=remote,num_concurrent=2,max_retries=1",
            "--tasks", "nanogpt_tiny_mc,nanogpt_tiny_gen", "--include_path", str(LM_EVAL_TASKS),
            "--output_path", str(output), "--log_samples",
        ],
        cwd=REPO_ROOT,  # the task files name their data relative to the repository
    )
    mc = lm_eval_samples(output, "nanogpt_tiny_mc")
    assert len(mc) == 3
    for sample in mc:
        for (context, continuation), (loglikelihood, _) in zip(
            ((a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()), (r[0] for r in sample["resps"])
        ):
            ctx = http.post("/tokenize", json={"prompt": context, "add_special_tokens": False}).json()["tokens"]
            cont = http.post("/tokenize", json={"prompt": continuation, "add_special_tokens": False}).json()["tokens"]
            body = http.post("/v1/completions", json={"prompt": ctx + cont, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
            assert float(loglikelihood) == pytest.approx(sum(body["choices"][0]["logprobs"]["token_logprobs"][len(ctx):]), abs=1e-4)
    gen = lm_eval_samples(output, "nanogpt_tiny_gen")
    assert len(gen) == 3
    for sample in gen:
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": ["\n", "<|endoftext|>"]}
        assert sample["resps"][0][0] == http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert any(sample["resps"][0][0] for sample in gen)


def test_lm_eval_local_chat_completions(serve, http, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")
    output = tmp_path / "lm_eval_chat"
    run_tool(
        [
            tool("lm_eval"), "--model", "local-chat-completions",
            "--model_args",
            f"model={MODEL},base_url={serve.base_url}/v1/chat/completions,tokenizer_backend=remote,num_concurrent=1,max_retries=1",
            "--apply_chat_template", "--tasks", "nanogpt_tiny_gen", "--include_path", str(LM_EVAL_TASKS),
            "--output_path", str(output), "--log_samples",
        ],
        cwd=REPO_ROOT,
    )
    samples = lm_eval_samples(output, "nanogpt_tiny_gen")
    assert len(samples) == 3
    for sample in samples:
        (rendered,) = sample["arguments"]["gen_args_0"]["arg_0"]  # lm-eval logs the chat as one JSON string
        messages = json.loads(rendered)
        body = {"messages": messages, "max_tokens": 8, "temperature": 0, "stop": ["\n", "<|endoftext|>"]}
        assert sample["resps"][0][0] == http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert any(sample["resps"][0][0] for sample in samples)  # the answers compared are not all empty


# --- the openai SDK's chat client ------------------------------------------------------------------
def test_openai_sdk_chat_against_serve(serve):
    from openai import OpenAI

    client = OpenAI(base_url=serve.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Say something."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [m.id for m in client.models.list().data] == [MODEL]


# --- vllm bench serve ------------------------------------------------------------------------------------
# vLLM does not install on this CPU machine; these are the exact bodies and headers of its benchmark
# client, vllm/benchmarks/lib/endpoint_request_func.py in vLLM 0.34.0 (async_request_openai_completions
# and async_request_openai_chat_completions; `ignore_eos` with --ignore-eos, `logprobs` is None unless
# --logprobs), read the way it reads them: SSE messages split on blank lines, ":" pings skipped,
# text chunks timed, the usage chunk's completion_tokens taken as the output length.
def vllm_bench_completions_body(prompt: str, output_len: int) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "repetition_penalty": 1.0,
        "max_tokens": output_len,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def vllm_bench_chat_body(prompt: str, output_len: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        "max_completion_tokens": output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


async def vllm_bench_request(session, url: str, payload: dict, request_id: str, chat: bool) -> dict:
    headers = {"x-request-id": request_id}
    if chat:
        headers["Content-Type"] = "application/json"
    result = {"success": False, "chunks": 0, "output_tokens": None, "prompt_len": None, "text": ""}
    async with session.post(url=url, json=payload, headers=headers) as response:
        if response.status != 200:
            result["error"] = f"{response.status} {await response.text()}"
            return result
        buffer = ""
        async for data in response.content.iter_any():
            buffer += data.decode("utf-8")
            while "\n\n" in buffer:
                message, buffer = buffer.split("\n\n", 1)
                message = message.strip()
                if not message or message.startswith(":"):
                    continue
                chunk = message.removeprefix("data: ")
                if chunk == "[DONE]":
                    continue
                data_json = json.loads(chunk)
                if choices := data_json.get("choices"):
                    result["chunks"] += 1
                    result["text"] += (choices[0]["delta"].get("content") if chat else choices[0].get("text")) or ""
                elif usage := data_json.get("usage"):
                    result["output_tokens"] = usage.get("completion_tokens")
                    result["prompt_len"] = usage.get("prompt_tokens")
        result["success"] = result["chunks"] > 0
    return result


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_vllm_bench_serve_requests(serve, http, chat):
    aiohttp = pytest.importorskip("aiohttp")
    prompts = [f"Benchmark prompt number {i} about the sea and the sky" for i in range(8)]
    url = serve.base_url + ("/v1/chat/completions" if chat else "/v1/completions")
    make = vllm_bench_chat_body if chat else vllm_bench_completions_body

    async def run():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            requests = [vllm_bench_request(session, url, make(p, 12), f"bench-abc-{i}", chat) for i, p in enumerate(prompts)]
            return await asyncio.gather(*requests)

    results = asyncio.run(run())
    assert all(r["success"] for r in results), results
    for prompt, result in zip(prompts, results):
        assert result["output_tokens"] == 12
        assert result["prompt_len"] == server_count(http, make(prompt, 12))
