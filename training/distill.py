"""Knowledge distillation: train a student on a teacher's softened distribution.

    loss = alpha * CE(student, data) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

with alpha 0.7 and T 2 by default (recipe section [distill]). Two kinds of teacher:

* a local checkpoint directory (any HF GPT-2 directory this project loads): its full logits,
  computed on the fly for each batch, KL over the whole vocabulary;
* any OpenAI-compatible server: `POST {base}/v1/completions` with the window's token ids as the
  prompt, `echo: true`, `max_tokens: 0` and `logprobs: k`. The answer's `top_logprobs[j]` is the
  teacher's distribution for token j given tokens < j, so a window of T + 1 tokens yields the
  targets of the T training positions. Only k log-probabilities come back, so the KL is over
  the teacher's top k (renormalised). Answers are cached on disk (one file per window, keyed
  by URL, model, k and the tokens), so a resumed or repeated run does not ask again.

The teachers must share the student's tokenizer (GPT-2 BPE); top-logprob keys are token
strings, mapped back to ids by `model.tokenizer.text_to_token` (the inverse of the rule this
project's server renders them with: the text, `bytes:\\xNN` for bytes that are not valid UTF-8,
or `token_id:N`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from nanogpt_mlx.atomic import atomic_file
from nanogpt_mlx.model.checkpoint import CheckpointError, load_model
from nanogpt_mlx.model.tokenizer import get_tokenizer, text_to_token
from nanogpt_mlx.training.losses import cross_entropy, distill_kl_full, distill_kl_topk, distillation_loss
from nanogpt_mlx.training.recipe import Recipe, TrainingError


# --- teachers --------------------------------------------------------------------------------
class LocalTeacher:
    """A checkpoint's full logits for each (B, T) batch."""

    kind = "full"

    def __init__(self, model_dir: str):
        try:
            self.model = load_model(model_dir)
        except CheckpointError as exc:
            raise TrainingError(f"teacher: {exc}") from exc
        self.model.eval()
        self.vocab_size = self.model.config.vocab_size
        self.block_size = self.model.config.block_size
        self._forward = mx.compile(lambda x: self.model(x), inputs=self.model.state)

    def targets(self, x: np.ndarray) -> tuple[mx.array]:
        logits = self._forward(mx.array(x))
        mx.eval(logits)
        return (mx.stop_gradient(logits),)


class HTTPTeacher:
    """Top-k log-probabilities from an OpenAI-compatible /v1/completions endpoint, cached on disk."""

    kind = "topk"

    def __init__(self, base_url: str, model: str = "", top_k: int = 20, cache_dir: str | os.PathLike | None = None,
                 timeout: float = 120.0, retries: int = 3, workers: int = 4, api_key: str | None = None):
        if top_k < 1:
            raise TrainingError(f"distill.top_k must be >= 1, got {top_k}")
        self.base_url = base_url.rstrip("/")
        self.endpoint = self.base_url + ("/completions" if self.base_url.endswith("/v1") else "/v1/completions")
        self.model_name = model
        self.top_k = top_k
        self.timeout, self.retries, self.workers = timeout, retries, workers
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.requests = 0  # answers fetched over HTTP (not from the cache)
        self._tokenizer = get_tokenizer()
        self.vocab_size = self._tokenizer.n_vocab
        self.block_size = None

    # -- one window --
    def _cache_path(self, tokens: list[int]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(json.dumps([self.endpoint, self.model_name, self.top_k, tokens]).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.npz"

    def _post(self, tokens: list[int]) -> dict:
        body = {"prompt": tokens, "max_tokens": 0, "echo": True, "logprobs": self.top_k, "temperature": 0}
        if self.model_name:
            body["model"] = self.model_name
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:300].decode("utf-8", "replace")
                if exc.code < 500 and exc.code != 429:  # the request itself is wrong: retrying will not help
                    raise TrainingError(f"teacher {self.endpoint} rejected the request: HTTP {exc.code}: {detail}") from exc
                last_error = f"HTTP {exc.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
                last_error = str(getattr(exc, "reason", exc))
            if attempt < self.retries:
                time.sleep(min(0.5 * 2**attempt, 8.0))
        raise TrainingError(f"teacher {self.endpoint} is unreachable or failing after {self.retries + 1} attempts: {last_error}")

    def _parse(self, answer: dict, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            top = answer["choices"][0]["logprobs"]["top_logprobs"]
        except (KeyError, IndexError, TypeError) as exc:
            raise TrainingError(f"teacher {self.endpoint}: the answer has no choices[0].logprobs.top_logprobs "
                                "(does it support echo + logprobs?)") from exc
        if len(top) < n_positions + 1:
            raise TrainingError(f"teacher {self.endpoint} returned logprobs for {len(top)} prompt tokens, expected {n_positions + 1}: "
                                "does it honour echo?")
        ids = np.zeros((n_positions, self.top_k), dtype=np.int32)
        logprobs = np.full((n_positions, self.top_k), -np.inf, dtype=np.float32)
        for t in range(n_positions):
            entries = top[t + 1] or {}  # entry 0 (the first token) has no distribution
            ranked = sorted(entries.items(), key=lambda kv: -kv[1])[: self.top_k]
            for j, (text, lp) in enumerate(ranked):
                token = text_to_token(self._tokenizer, text)
                if token is not None:
                    ids[t, j], logprobs[t, j] = token, lp
        return ids, logprobs

    def window(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Targets for the len(tokens) - 1 positions of one window."""
        path = self._cache_path(tokens)
        if path is not None and path.is_file():
            try:
                with np.load(path) as cached:
                    return cached["ids"], cached["logprobs"]
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry: ask again
        ids, logprobs = self._parse(self._post(tokens), len(tokens) - 1)
        self.requests += 1
        if path is not None:
            with atomic_file(path, "wb") as f:
                np.savez(f, ids=ids, logprobs=logprobs)
        return ids, logprobs

    def targets(self, x: np.ndarray, y: np.ndarray) -> tuple[mx.array, mx.array]:
        windows = [list(map(int, row)) + [int(last)] for row, last in zip(x, y[:, -1])]
        with ThreadPoolExecutor(max_workers=min(self.workers, len(windows))) as pool:
            results = list(pool.map(self.window, windows))
        ids = np.stack([r[0] for r in results])
        logprobs = np.stack([r[1] for r in results])
        return mx.array(ids), mx.array(logprobs)


def make_teacher(recipe: Recipe):
    d = recipe.distill
    if not d.teacher:
        raise TrainingError("no teacher: pass --teacher DIR_OR_URL (or set distill.teacher)")
    if d.teacher.startswith(("http://", "https://")):
        cache = d.cache_dir or None
        return HTTPTeacher(d.teacher, model=d.teacher_model, top_k=d.top_k, cache_dir=cache)
    if not Path(d.teacher).is_dir():
        raise TrainingError(f"teacher not found: {d.teacher} is neither a checkpoint directory nor an http(s):// URL")
    return LocalTeacher(d.teacher)


# --- losses for the compiled step ------------------------------------------------------------
def full_kl_loss(alpha: float, temperature: float):
    def loss_fn(model, x, y, teacher_logits):
        logits = model(x)
        return distillation_loss(cross_entropy(logits, y), distill_kl_full(logits, teacher_logits, temperature), alpha, temperature)

    return loss_fn


def topk_kl_loss(alpha: float, temperature: float):
    def loss_fn(model, x, y, topk_ids, topk_logprobs):
        logits = model(x)
        kl = distill_kl_topk(logits, topk_ids, topk_logprobs, temperature)
        return distillation_loss(cross_entropy(logits, y), kl, alpha, temperature)

    return loss_fn


# --- the run ---------------------------------------------------------------------------------
def run_distill(recipe: Recipe, out_dir: str, resume: bool = False, init_from: str | None = None, progress: bool = True) -> dict | None:
    from nanogpt_mlx.training.train import Trainer

    d = recipe.distill
    if d.cache_dir == "" and d.teacher.startswith(("http://", "https://")):
        d.cache_dir = str(Path(out_dir) / "teacher_cache")  # default: beside the run, reused on --resume
    teacher = make_teacher(recipe)
    student_vocab = recipe.model_config().vocab_size if not init_from else None
    if student_vocab is not None and teacher.vocab_size != student_vocab:
        raise TrainingError(f"the teacher has a {teacher.vocab_size}-token vocabulary, the student {student_vocab}: "
                            "they must share the tokenizer")
    longest = max(seq for _, seq, _ in recipe.phases())
    if teacher.block_size is not None and longest > teacher.block_size:
        raise TrainingError(f"seq_len {longest} exceeds the teacher's context ({teacher.block_size})")

    if teacher.kind == "full":
        loss_fn = full_kl_loss(d.alpha, d.temperature)
        extras_fn = lambda x, y: teacher.targets(x)  # noqa: E731
    else:
        loss_fn = topk_kl_loss(d.alpha, d.temperature)
        extras_fn = teacher.targets
    trainer = Trainer(recipe, recipe.data.train, out_dir, resume=resume, init_from=init_from, progress=progress,
                      loss_fn=loss_fn, extras_fn=extras_fn)
    if teacher.vocab_size != trainer.config.vocab_size:
        raise TrainingError(f"the teacher has a {teacher.vocab_size}-token vocabulary, the student {trainer.config.vocab_size}: "
                            "they must share the tokenizer")
    summary = trainer.fit()
    if isinstance(teacher, HTTPTeacher) and trainer.is_main:
        print(f"teacher: {teacher.requests} windows fetched over HTTP (the rest from {teacher.cache_dir})", file=sys.stderr)
    return summary if trainer.is_main else None
