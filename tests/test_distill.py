"""Distillation: the losses, a local checkpoint teacher, and the HTTP teacher's protocol handling
against a scripted /v1/completions server on 127.0.0.1 (for answers a real server never gives:
other tokenizers, vLLM's wording of limits, no /v1/models). The real server as the teacher, the
fault-injecting proxy and sequence-level distillation are in test_distill_http.py."""

from __future__ import annotations

import email.utils
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from test_train import TINY_MODEL, write_recipe, write_shards

from nanogpt_mlx.model.checkpoint import load_config, load_model, save_checkpoint
from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.gpt import GPT
from nanogpt_mlx.model.tokenizer import get_tokenizer, text_to_token, token_to_text
from nanogpt_mlx.training.distill import RemoteLogitTeacher, TeacherClient, run_distill
from nanogpt_mlx.training.distill.client import retry_after_seconds
from nanogpt_mlx.training.distill.teachers import limit_in
from nanogpt_mlx.training.losses import cross_entropy, distill_kl_full, distill_kl_topk, distillation_loss
from nanogpt_mlx.training.recipe import Recipe, TrainingError

from conftest import REPO_ROOT

ENC = get_tokenizer()
TOP_K = 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"))


# --- the loss --------------------------------------------------------------------------------
def test_distillation_loss_pieces():
    rng = np.random.default_rng(0)
    v = 50
    student = mx.array(rng.standard_normal((2, 3, v)).astype(np.float32))
    teacher = mx.array((2 * rng.standard_normal((2, 3, v))).astype(np.float32))
    targets = mx.array(rng.integers(0, v, (2, 3)))
    ce = cross_entropy(student, targets)
    kl = distill_kl_full(student, teacher, 2.0)
    assert distillation_loss(ce, kl, 1.0, 2.0).item() == pytest.approx(ce.item())
    assert distillation_loss(ce, kl, 0.7, 2.0).item() == pytest.approx(0.7 * ce.item() + 0.3 * 4.0 * kl.item(), rel=1e-6)
    assert distill_kl_full(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kl.item() > 0.01
    # top-k KL with k = the whole vocabulary is the full KL (the bucket then holds ~nothing)
    log_p = teacher - mx.logsumexp(teacher, axis=-1, keepdims=True)
    order = mx.argsort(-log_p, axis=-1)
    everything = mx.take_along_axis(log_p, order, axis=-1)
    assert distill_kl_topk(student, order, everything, 2.0, "renorm").item() == pytest.approx(kl.item(), rel=1e-5)
    assert distill_kl_topk(student, order, everything, 2.0, "bucket").item() == pytest.approx(kl.item(), rel=2e-2)
    # positions the teacher did not answer (-inf everywhere) contribute nothing
    empty = mx.full((2, 3, 4), -mx.inf)
    for form in ("bucket", "renorm"):
        assert distill_kl_topk(student, mx.zeros((2, 3, 4), dtype=mx.int32), empty, 2.0, form).item() == 0.0
    with pytest.raises(ValueError, match="sparse KL form"):
        distill_kl_topk(student, order, everything, 2.0, "other")


def test_bucket_kl_is_the_kl_of_the_coarsened_distributions():
    """Top k + one outcome for the rest: zero when the student equals the teacher, the exact KL of
    the (k + 1)-outcome distributions otherwise, and averaged over answered positions only."""
    rng = np.random.default_rng(1)
    v, k, t = 40, 5, 2.0
    teacher = mx.array((2 * rng.standard_normal((1, 4, v))).astype(np.float32))
    student = mx.array(rng.standard_normal((1, 4, v)).astype(np.float32))
    log_p = teacher - mx.logsumexp(teacher, axis=-1, keepdims=True)
    ids = mx.argsort(-log_p, axis=-1)[..., :k]
    top = mx.take_along_axis(log_p, ids, axis=-1)
    assert distill_kl_topk(teacher, ids, top, t, "bucket").item() == pytest.approx(0.0, abs=1e-6)

    def coarse(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
        p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        head = p[ids]
        c = np.append(head, 1 - head.sum()) ** (1 / t)
        return c / c.sum()

    expected = []
    for pos in range(4):
        a = coarse(np.array(teacher[0, pos], dtype=np.float64), np.array(ids[0, pos]))
        b = coarse(np.array(student[0, pos], dtype=np.float64), np.array(ids[0, pos]))
        expected.append(float((a * np.log(a / b)).sum()))
    got = distill_kl_topk(student, ids, top, t, "bucket").item()
    assert got == pytest.approx(np.mean(expected), rel=1e-4)
    # position 3 without a teacher: the mean is over positions 0-2
    masked = mx.concatenate([top[:, :3], mx.full((1, 1, k), -mx.inf)], axis=1)
    assert distill_kl_topk(student, ids, masked, t, "bucket").item() == pytest.approx(np.mean(expected[:3]), rel=1e-4)


# --- a local checkpoint teacher --------------------------------------------------------------------
def kl_to_teacher(student: GPT, teacher: GPT, x: mx.array) -> float:
    return distill_kl_full(student(x), teacher(x), 1.0).item()


def test_local_teacher_pulls_the_student_toward_it(shards, tmp_path, random_model):
    teacher = random_model(ModelConfig(**TINY_MODEL), seed=5, std=0.3)  # a peaked, distinctive distribution
    teacher_dir = save_checkpoint(teacher, tmp_path / "teacher")
    recipe = Recipe.from_dict({
        "model": dict(TINY_MODEL),
        "data": {"train": str(shards), "seq_len": 32, "batch_size": 4, "eval_batches": 1},
        "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": 12, "eval_interval": 0, "save_interval_steps": 12},
        "distill": {"teacher": str(teacher_dir), "alpha": 0.0, "temperature": 1.0},
    })
    x = mx.array(np.random.default_rng(3).integers(0, 1000, (4, 32)))
    fresh = GPT(ModelConfig(**TINY_MODEL))
    fresh.init_weights(seed=recipe.train.seed)  # what the student starts from
    before = kl_to_teacher(fresh, teacher, x)
    run_distill(recipe, str(tmp_path / "run"), progress=False)
    student = load_model(tmp_path / "run" / "checkpoints" / "step_00000012")
    after = kl_to_teacher(student, teacher, x)
    assert after < 0.7 * before, (before, after)


# --- an HTTP teacher ---------------------------------------------------------------------------------
def token_text(i: int) -> str:
    raw = ENC.decode_single_token_bytes(i)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def fake_distribution(prev: int) -> dict[str, float]:
    """The fake teacher: after token t it predicts t+1 (p 0.6), then t+2, t+3, ... (keys are
    token strings, as OpenAI's API returns them). Never a duplicate string among the k."""
    out, probs = {}, [0.6, 0.2, 0.1, 0.05, 0.03]
    nxt = prev + 1
    for p in probs:
        while token_text(nxt % 50000) in out or ENC.encode_ordinary(token_text(nxt % 50000)) != [nxt % 50000]:
            nxt += 1  # skip tokens whose text is ambiguous so the check below is exact
        out[token_text(nxt % 50000)] = math.log(p)
        nxt += 1
    return out


def token_id_key(text: str, j: int) -> str:
    """The same token named the other ways a server may name it: `token_id:N` or `bytes:\\xNN...`."""
    (token,) = ENC.encode_ordinary(text)
    if j % 3 == 1:
        return f"token_id:{token}"
    if j % 3 == 2:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in ENC.decode_single_token_bytes(token))
    return text


class FakeTeacher(BaseHTTPRequestHandler):
    requests: list[dict] = []
    key_form = "text"  # "mixed": top_logprobs keys also as token_id:N and bytes:\xNN
    behaviour = ""  # "mismatch" | "unknown-key" | "vllm-limit" | "no-zero-max-tokens" | "context-16"

    def _send(self, status: int, answer: dict) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        tokens = body["prompt"]
        behaviour = FakeTeacher.behaviour
        if behaviour == "vllm-limit" and body["logprobs"] > 3:  # vLLM's wording
            return self._send(400, {"object": "error", "message": f"Requested sample logprobs of {body['logprobs']}, "
                                    "which is greater than max allowed: 3", "type": "BadRequestError", "param": None, "code": 400})
        if behaviour == "no-zero-max-tokens" and body["max_tokens"] == 0:
            return self._send(400, {"error": {"message": "max_tokens must be at least 1", "param": "max_tokens"}})
        if behaviour == "context-16" and len(tokens) + body["max_tokens"] > 16:
            return self._send(400, {"error": {"message": "This model's maximum context length is 16 tokens, however you "
                                              f"requested {len(tokens)} tokens", "code": "context_length_exceeded"}})
        top = [None] + [fake_distribution(t) for t in tokens[:-1]]
        if FakeTeacher.key_form == "mixed":
            top = [None] + [{token_id_key(text, j): lp for j, (text, lp) in enumerate(d.items())} for d in top[1:]]
        if behaviour == "unknown-key":
            top[2] = {"no such token": -0.1, **top[2]}
        echoed = [token_text(t) for t in tokens]
        if behaviour == "mismatch":
            echoed[2] = token_text((tokens[2] + 1) % 50000)  # a teacher whose tokenizer splits differently
        FakeTeacher.requests.append({"path": self.path, **body, "answered_keys": [list(d) for d in top[1:]]})
        extra = [None] * body["max_tokens"]  # the generated tokens' entries (ignored by the client)
        self._send(200, {
            "object": "text_completion",
            "choices": [{"index": 0, "text": "", "finish_reason": "length",
                         "logprobs": {"tokens": echoed + ["x"] * body["max_tokens"],
                                      "token_logprobs": [None] + [-1.0] * (len(tokens) - 1) + extra,
                                      "top_logprobs": top + [{"x": -1.0}] * body["max_tokens"],
                                      "text_offset": list(range(len(tokens))) + extra}}],
        })

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_server():
    FakeTeacher.requests, FakeTeacher.behaviour, FakeTeacher.key_form = [], "", "text"
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeTeacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def expected_ids(prev: int) -> list[int]:
    return [ENC.encode_ordinary(text)[0] for text in fake_distribution(prev)]


def teacher_for(url: str, top_k: int = TOP_K, **kwargs) -> RemoteLogitTeacher:
    client = TeacherClient(url, timeout=10, max_retries=kwargs.pop("max_retries", 2), backoff=0.05)
    return RemoteLogitTeacher(client, model="fake", top_k=top_k, **kwargs)


def test_http_teacher_aligns_positions_and_caches(fake_server, tmp_path):
    teacher = teacher_for(fake_server, cache_dir=tmp_path / "cache")
    rng = np.random.default_rng(0)
    window = rng.integers(0, 40000, (3, 9)).astype(np.int32)
    x, y = window[:, :-1], window[:, 1:]
    ids, logprobs = teacher.targets(x, y)
    ids, logprobs = np.array(ids), np.array(logprobs)
    assert ids.shape == (3, 8, TOP_K) and logprobs.shape == (3, 8, TOP_K)
    for b in range(3):
        for t in range(8):
            # position t predicts y[t] = window[t + 1] from x[..t]: the teacher's answer after x[t]
            assert list(ids[b, t]) == expected_ids(int(x[b, t])), (b, t)
    np.testing.assert_allclose(logprobs[0, 0], np.log([0.6, 0.2, 0.1, 0.05, 0.03]), rtol=1e-6)
    sent = FakeTeacher.requests
    assert len(sent) == 3 and teacher.windows_requested == 3
    assert all(r["echo"] is True and r["max_tokens"] == 0 and r["logprobs"] == TOP_K and r["model"] == "fake" for r in sent)
    assert sorted(r["prompt"] for r in sent) == sorted(row.tolist() for row in window)
    assert all(r["path"] == "/v1/completions" for r in sent)
    assert teacher.max_model_len is None  # this server has no /v1/models: windows are sent whole
    teacher.close()

    again = teacher_for(fake_server, cache_dir=tmp_path / "cache")
    ids2, _ = again.targets(x, y)
    assert again.windows_requested == 0 and again.windows_cached == 3 and len(FakeTeacher.requests) == 3  # the disk cache
    np.testing.assert_array_equal(np.array(ids2), ids)
    again.close()


def test_http_teacher_reads_token_id_and_bytes_keys(fake_server):
    FakeTeacher.key_form = "mixed"
    teacher = teacher_for(fake_server)
    window = np.random.default_rng(1).integers(0, 40000, (2, 7)).astype(np.int32)
    ids, logprobs = teacher.targets(window[:, :-1], window[:, 1:])
    keys = [k for r in FakeTeacher.requests for d in r["answered_keys"] for k in d]
    assert any(k.startswith("token_id:") for k in keys) and any(k.startswith("bytes:") for k in keys)
    for b in range(2):
        for t in range(6):
            assert list(np.array(ids)[b, t]) == expected_ids(int(window[b, t])), (b, t)
    np.testing.assert_allclose(np.array(logprobs)[0, 0], np.log([0.6, 0.2, 0.1, 0.05, 0.03]), rtol=1e-6)


@pytest.mark.parametrize("behaviour, message", [
    ("mismatch", r"tokens differ from ours: position 2 .*--mode sequence"),
    ("unknown-key", r"named a token 'no such token' .* --mode sequence"),
])
def test_http_teacher_stops_when_it_tokenizes_differently(fake_server, behaviour, message):
    FakeTeacher.behaviour = behaviour
    teacher = teacher_for(fake_server)
    window = np.random.default_rng(2).integers(0, 40000, (1, 7)).astype(np.int32)
    with pytest.raises(TrainingError, match=message):
        teacher.targets(window[:, :-1], window[:, 1:])


def test_http_teacher_adapts_to_the_server(fake_server, capsys):
    """vLLM's wording of the logprobs limit, a server that refuses max_tokens 0, a context limit
    learnt from a context_length_exceeded answer: each read and followed, then the run goes on."""
    window = np.random.default_rng(3).integers(0, 40000, (2, 21)).astype(np.int32)
    x, y = window[:, :-1], window[:, 1:]

    FakeTeacher.behaviour = "vllm-limit"
    teacher = teacher_for(fake_server, top_k=TOP_K)
    ids, logprobs = teacher.targets(x, y)
    assert teacher.top_k == 3 and np.array(ids).shape == (2, 20, 3)
    assert list(np.array(ids)[0, 0]) == expected_ids(int(x[0, 0]))[:3]
    assert "at most 3 logprobs" in capsys.readouterr().err

    FakeTeacher.behaviour = "no-zero-max-tokens"
    teacher = teacher_for(fake_server)
    ids, _ = teacher.targets(x, y)
    assert teacher.max_tokens == 1 and FakeTeacher.requests[-1]["max_tokens"] == 1
    assert list(np.array(ids)[1, 19]) == expected_ids(int(x[1, 19]))  # the generated token's entry is not read

    FakeTeacher.behaviour = "context-16"
    teacher = teacher_for(fake_server)
    ids, logprobs = teacher.targets(x, y)
    logprobs = np.array(logprobs)
    assert teacher.max_model_len == 16 and all(len(r["prompt"]) <= 16 for r in FakeTeacher.requests[-2:])
    assert np.isfinite(logprobs[:, :15]).all() and np.isneginf(logprobs[:, 15:]).all()  # 15 targets from 16 tokens
    assert list(np.array(ids)[0, 14]) == expected_ids(int(x[0, 14]))


def test_limits_and_retry_after_are_read():
    assert limit_in("logprobs must be at most 20 on this server, got 30") == 20
    assert limit_in("Requested sample logprobs of 50, which is greater than max allowed: 20") == 20
    assert limit_in("Input should be less than or equal to 5") == 5
    assert limit_in("logprobs is not supported") is None
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 20 < retry_after_seconds(future) <= 31


def test_token_strings_round_trip():
    """model.tokenizer's token <-> API string rule: what the server shows, and its inverse."""
    shown = [token_to_text(ENC, i) for i in range(ENC.n_vocab)]
    assert shown == [token_text(i) for i in range(ENC.n_vocab)]  # the API's convention, written out above
    assert [text_to_token(ENC, s) for s in shown] == list(range(ENC.n_vocab))
    partial = [i for i, s in enumerate(shown) if s.startswith("bytes:")]
    assert partial and all(len(shown[i]) == len("bytes:") + 4 * len(ENC.decode_single_token_bytes(i)) for i in partial)
    hello = ENC.encode_ordinary(" Hello")[0]
    assert text_to_token(ENC, "bytes:" + "".join(f"\\x{b:02x}" for b in b" Hello")) == hello
    assert text_to_token(ENC, f"token_id:{hello}") == hello
    for unknown in ("no such token", "token_id:50257", "token_id:-1", "bytes:\\xzz", "bytes:", "bytes:\\x48\\x65\\x6c\\x6c\\x6f\\x21\\x21"):
        assert text_to_token(ENC, unknown) is None, unknown


def test_http_teacher_unreachable_is_a_clear_error(tmp_path):
    teacher = RemoteLogitTeacher(TeacherClient("http://127.0.0.1:9", timeout=2, max_retries=1, backoff=0.01), top_k=3)
    with pytest.raises(TrainingError, match="unreachable"):
        teacher.targets(np.zeros((1, 4), np.int32), np.zeros((1, 4), np.int32))
    assert teacher.client.stats.retries["connection"] == 1


def test_cli_distill_from_http_teacher(fake_server, shards, tmp_path, run_cli):
    recipe = write_recipe(tmp_path, train={"max_steps": 3, "save_interval_steps": 3, "eval_interval": 3})
    run = tmp_path / "run"
    proc = run_cli("distill", "--config", recipe, "--data", shards, "--out", run, "--teacher", fake_server,
                   "--teacher-model", "fake", "--top-k", str(TOP_K), "--no-progress", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(FakeTeacher.requests) == 3 * 4  # 3 steps x 4 rows, one window each
    assert (run / "checkpoints" / "step_00000003" / "model.safetensors").is_file()
    assert any((run / "teacher_cache").rglob("*.npz"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 3 and math.isfinite(summary["loss"])

    proc = run_cli("distill", "--config", recipe, "--data", shards, "--out", tmp_path / "run2", "--teacher", tmp_path / "nope", timeout=120)
    assert proc.returncode == 2 and "teacher not found" in proc.stderr and "Traceback" not in proc.stderr


def test_draft_recipe_is_a_small_student_of_the_bundled_checkpoint():
    """configs/draft.toml (training/README.md): the same tokenizer and context as its teacher."""
    recipe = Recipe.load("draft")
    config = recipe.validate()
    teacher = load_config(REPO_ROOT / recipe.distill.teacher)
    assert config.n_layer < teacher.n_layer and config.vocab_size == teacher.vocab_size
    assert config.block_size == teacher.block_size and max(s for _, s, _ in recipe.phases()) <= teacher.block_size
    assert recipe.distill.mode == "logits" and recipe.distill.temperature == 1.0
