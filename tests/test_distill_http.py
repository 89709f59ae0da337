"""Distillation against the real thing: `nanogpt-mlx serve` as the teacher on 127.0.0.1.

The teacher is a tiny random model (peaked, so its distribution is distinctive) with a 32-token
context, served with `--max-logprobs 4`; the student reads 32-token windows, so every window must
be cut to fit and its last position trains on CE alone. A fault-injecting proxy (500s, 429s with
Retry-After, timeouts, dropped connections) sits in front of it where a test says so.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_train import TINY_MODEL, write_shards

from nanogpt_mlx.model.checkpoint import load_model, save_checkpoint
from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.training.dataset import TokenShards
from nanogpt_mlx.training.distill import LocalTeacher, RemoteLogitTeacher, TeacherClient, held_out_against, run_distill
from nanogpt_mlx.training.distill.faults import FAULTS, FaultProxy
from nanogpt_mlx.training.recipe import Recipe
from nanogpt_mlx.training.train import Trainer

from conftest import cli_command, cli_env
from server_support import ServeProcess, wait_for

TEACHER_CONTEXT = 32
SERVER_LOGPROBS = 4
SEQ_LEN = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, random_model) -> Path:
    config = ModelConfig(**{**TINY_MODEL, "block_size": TEACHER_CONTEXT})
    teacher = random_model(config, seed=5, std=0.8)  # peaked: its top 4 hold about half the mass
    return save_checkpoint(teacher, tmp_path_factory.mktemp("teacher") / "ckpt")


@pytest.fixture(scope="module")
def teacher_server(teacher_dir, tmp_path_factory):
    # One sequence at a time: every answer is computed at the same shapes, so it is bit-identical
    # however the requests arrive (the fault test compares weights exactly).
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with ServeProcess(cli_command(), ["--model", str(teacher_dir), "--max-logprobs", str(SERVER_LOGPROBS), "--max-batch", "1",
                                      "--log-level", "warning", "--access-log", "off"], log_path=log) as server:
        yield server


def recipe_for(shards: Path, teacher: str, steps: int = 3, **distill) -> Recipe:
    return Recipe.from_dict({
        "model": dict(TINY_MODEL),
        "data": {"train": str(shards), "seq_len": SEQ_LEN, "batch_size": 4, "eval_batches": 0},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": steps, "eval_interval": 0, "save_interval_steps": steps, "log_interval": 1},
        "distill": {"teacher": teacher, "top_k": 20, "concurrency": 2, "timeout": 5.0, "max_retries": 12, **distill},
    })


def weights(run: Path, step: int) -> dict[str, np.ndarray]:
    model = load_model(run / "checkpoints" / f"step_{step:08d}")
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def test_remote_teacher_fits_the_server_and_matches_the_model(teacher_server, teacher_dir, shards, capsys):
    """max_model_len from /v1/models, the server's logprobs limit found by asking, echoed tokens
    checked, and the answers equal to the same model's top k computed in-process."""
    client = TeacherClient(teacher_server.base_url, timeout=30, concurrency=2)
    teacher = RemoteLogitTeacher(client, top_k=20)
    window = np.stack([np.asarray(TokenShards(shards, "train").shards[0][i * 50:i * 50 + SEQ_LEN + 1]) for i in range(3)])
    x, y = window[:, :-1].astype(np.int32), window[:, 1:].astype(np.int32)
    ids, logprobs = (np.array(a) for a in teacher.targets(x, y))
    assert teacher.max_model_len == TEACHER_CONTEXT and teacher.model_name == "nanogpt-mlx"
    assert teacher.top_k == SERVER_LOGPROBS and ids.shape == (3, SEQ_LEN, SERVER_LOGPROBS)
    err = capsys.readouterr().err
    assert f"at most {SERVER_LOGPROBS} logprobs" in err and "train on CE alone" in err
    # 33 tokens do not fit 32: the last position has no teacher distribution
    assert np.isfinite(logprobs[:, : SEQ_LEN - 1]).all() and np.isneginf(logprobs[:, SEQ_LEN - 1]).all()

    local_ids, local_values = (np.array(a) for a in LocalTeacher(teacher_dir, top_k=SERVER_LOGPROBS).targets(x))
    for b in range(3):
        for t in range(SEQ_LEN - 1):
            order = np.argsort(-local_values[b, t])
            assert list(ids[b, t]) == list(local_ids[b, t][order]), (b, t)
            np.testing.assert_allclose(logprobs[b, t], local_values[b, t][order], rtol=1e-4, atol=1e-4)
    assert client.stats.rejected == 1 and client.stats.retried == 0
    teacher.close()


def test_faults_cost_retries_not_windows_or_weights(teacher_server, shards, tmp_path):
    """500s, 429s with Retry-After, timeouts and dropped connections on a fraction of requests:
    the run completes, every window is answered once, and the weights equal a clean run's."""
    fraction, seed = 0.4, 15
    decided = [FaultProxy("http://x", fraction, seed).decide(i) for i in range(14)]
    assert set(FAULTS) <= set(decided)  # every kind of fault among the first requests

    clean = run_distill(recipe_for(shards, teacher_server.base_url), str(tmp_path / "clean"), progress=False)
    with FaultProxy(teacher_server.base_url, fraction=fraction, seed=seed, retry_after="1") as proxy:
        faulty = run_distill(recipe_for(shards, proxy.base_url), str(tmp_path / "faulty"), progress=False)
    windows = 3 * 4
    for summary in (clean, faulty):
        assert summary["step"] == 3
        assert summary["teacher"]["windows_requested"] == windows and summary["teacher"]["windows_cached"] == 0
    http = faulty["teacher"]["http"]
    assert all(proxy.counts[kind] >= 1 for kind in FAULTS), proxy.counts
    # Each injected fault cost one retry (a genuinely slow answer would add a timeout of its own).
    assert http["retries"]["429"] == proxy.counts["429"] and http["retries"]["500"] == proxy.counts["500"]
    assert http["retries"]["connection"] >= proxy.counts["drop"] and http["retries"]["timeout"] >= proxy.counts["timeout"]
    assert http["waited_seconds"] >= proxy.counts["429"] * 1.0  # Retry-After honoured
    # A window is answered twice only when the client gave up on a genuinely slow answer.
    assert sum(n - 1 for n in proxy.answered.values()) <= http["retries"]["timeout"] - proxy.counts["timeout"]
    a, b = weights(tmp_path / "clean", 3), weights(tmp_path / "faulty", 3)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_killed_run_resumes_without_asking_twice(teacher_server, shards, tmp_path):
    """SIGKILL mid-run, then --resume: the windows answered before the kill come from the cache."""
    recipe = tmp_path / "recipe.json"
    r = recipe_for(shards, "").to_dict()
    r["train"].update(max_steps=8, save_interval_steps=2)
    lines = [f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in r[section].items() if v != "")
             for section in ("model", "data", "optim", "train")]
    recipe.write_text("\n".join(lines))
    run = tmp_path / "run"
    with FaultProxy(teacher_server.base_url, fraction=0.0) as proxy:
        args = [*cli_command(), "distill", "--config", str(recipe), "--out", str(run), "--teacher", proxy.base_url,
                "--concurrency", "2", "--no-progress"]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(), stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: len(list((run / "teacher_cache").glob("*/*.npz"))) >= 12 or proc.poll() is not None,
                     "12 answers in the cache", timeout=300, interval=0.2)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        cached_at_kill = len(list((run / "teacher_cache").glob("*/*.npz")))
        assert cached_at_kill >= 12
        resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=cli_env(), timeout=600,
                                 stdin=subprocess.DEVNULL)
        assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["step"] == 8
    windows = 8 * 4
    assert len(list((run / "teacher_cache").glob("*/*.npz"))) == windows == len(proxy.answered)
    # Only answers in flight at the kill (at most `concurrency`, never written to the cache) may be
    # asked again; every answer the cache held is read from it.
    assert sum(n - 1 for n in proxy.answered.values()) <= 2, proxy.answered


def test_logit_distillation_over_http_beats_ce_only(teacher_server, teacher_dir, shards, tmp_path):
    """The proof in small: same student, data, steps and seed; the one that learnt from the
    server's top-4 logprobs ends much closer to the teacher than the one trained on CE alone."""
    kd = recipe_for(shards, teacher_server.base_url, steps=12, alpha=0.0, temperature=1.0)
    Trainer(kd, str(shards), str(tmp_path / "ce"), progress=False).fit()  # CE only: the trainer's own loss
    run_distill(kd, str(tmp_path / "kd"), progress=False)
    local = LocalTeacher(teacher_dir)
    kl = {name: held_out_against(load_model(tmp_path / name / "checkpoints" / "step_00000012"), local, str(shards),
                                 seq_len=SEQ_LEN, batch_size=4, max_batches=4).kl for name in ("ce", "kd")}
    assert kl["kd"] < 0.85 * kl["ce"], kl


def test_sequence_level_distillation_through_the_server(teacher_server, shards, tmp_path):
    recipe = recipe_for(shards, teacher_server.base_url, steps=2, mode="sequence", num_prompts=6, prompt_tokens=8,
                        max_new_tokens=8, mix_ratio=0.5, cache_dir=str(tmp_path / "cache"))
    summary = run_distill(recipe, str(tmp_path / "run"), progress=False)
    assert summary["step"] == 2
    teacher = summary["teacher"]
    assert teacher["requests"] == 6 and teacher["cached"] == 0 and teacher["tokens_received"] == 6 * 8
    docs = [json.loads(line)["text"] for line in (tmp_path / "run" / "teacher_text" / "teacher.jsonl").read_text().splitlines()]
    assert len(docs) == 6
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert manifest["mixture"]["teacher_share"] == pytest.approx(0.5, abs=1e-3)
    train = TokenShards(tmp_path / "run" / "data", "train")
    corpus = TokenShards(shards, "train")
    teacher_tokens = sum(s["tokens"] for s in manifest["splits"]["train"]["shards"] if s["from"] == "teacher")
    assert len(train) == len(corpus) + teacher_tokens and teacher_tokens == pytest.approx(len(corpus), rel=1e-3)
    assert len(TokenShards(tmp_path / "run" / "data", "val")) == len(TokenShards(shards, "val"))

    # the same prompts again (a rerun, another run dir): all from the cache, the same text
    again = run_distill(recipe, str(tmp_path / "run2"), progress=False)
    assert again["teacher"]["requests"] == 0 and again["teacher"]["cached"] == 6
    assert (tmp_path / "run2" / "teacher_text" / "teacher.jsonl").read_text() == \
        (tmp_path / "run" / "teacher_text" / "teacher.jsonl").read_text()


def test_sequence_level_from_a_chat_endpoint_with_a_prompts_file(teacher_server, shards, tmp_path, run_cli):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about rivers.\n\nWhat is light?\n")
    recipe = tmp_path / "recipe.toml"
    r = recipe_for(shards, "").to_dict()
    recipe.write_text("\n".join(f"[{s}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in r[s].items() if v != "")
                                for s in ("model", "data", "optim", "train")))
    env = cli_env(MY_TEACHER_KEY="not-checked-by-this-server")
    proc = run_cli("distill", "--config", recipe, "--data", shards, "--out", tmp_path / "run", "--teacher",
                   teacher_server.base_url + "/v1", "--mode", "sequence", "--endpoint", "chat", "--prompts", prompts,
                   "--max-new-tokens", "6", "--mix-ratio", "0.25", "--api-key-env", "MY_TEACHER_KEY", "--max-steps", "1",
                   "--no-progress", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 requests" in proc.stderr and "tokens received" in proc.stderr
    docs = (tmp_path / "run" / "teacher_text" / "teacher.jsonl").read_text().splitlines()
    assert 1 <= len(docs) <= 2 and not any("Tell me about rivers" in json.loads(d)["text"] for d in docs)  # answers only
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert manifest["mixture"]["teacher_share"] == pytest.approx(0.25, abs=1e-3)


def test_distill_help_and_errors(run_cli, shards, tmp_path):
    proc = run_cli("distill", "--help", timeout=60)
    assert proc.returncode == 0
    for flag in ("--teacher", "--mode", "--top-k", "--sparse-kl", "--teacher-max-len", "--concurrency", "--max-retries",
                 "--timeout", "--api-key-env", "--cache-dir", "--prefetch", "--prompts", "--num-prompts", "--max-new-tokens",
                 "--endpoint", "--mix-ratio", "--alpha", "--temperature"):
        assert flag in proc.stdout, flag
    proc = run_cli("distill", "--data", shards, "--out", tmp_path / "r", "--teacher", str(shards), "--mode", "sequence", timeout=60)
    assert proc.returncode == 2 and "must be an http(s):// URL" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("distill", "--data", shards, "--out", tmp_path / "r", "--teacher", "http://127.0.0.1:9", "--mix-ratio", "2",
                   "--mode", "sequence", timeout=60)
    assert proc.returncode == 2 and "mix_ratio" in proc.stderr
