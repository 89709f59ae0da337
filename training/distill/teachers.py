"""Teachers that give a distribution for every position of a training window.

* `LocalTeacher`: a checkpoint loaded in-process; its full logits (KL over the whole
  vocabulary), or, with `top_k`, the same top-k form an HTTP teacher gives (what the sparse-KL
  comparison trains against).
* `RemoteLogitTeacher`: an OpenAI-compatible server that shares our tokenizer. Each window is a
  token-id prompt to `/v1/completions` with `echo: true`, `max_tokens: 0`, `logprobs: k`; the
  answer's `top_logprobs[j]` is the teacher's distribution of token j given the tokens before
  it. It adapts to the server it meets:

  - the context: `max_model_len` from `/v1/models` (vLLM's field; `distill.teacher_max_len`
    overrides it, and a `context_length_exceeded` answer naming the length is read too). A window
    of seq_len + 1 tokens that does not fit is cut to the teacher's context: the positions whose
    targets fall past it have no teacher distribution and train on CE alone (the first token of
    every request has none either, which is why a window is sent with one token more than the
    student reads);
  - the number of logprobs: at most what it allows; a 400 naming `logprobs` is read for the
    limit ("at most N", vLLM's "max allowed: N"), else it stops with an error naming the setting;
  - the tokens: the echoed prompt is mapped back to ids (`model.tokenizer.text_to_token`: text,
    `bytes:\\xNN`, `token_id:N`) and must equal what was sent, and every top-logprob key must name
    one of our tokens; anything else stops the run with an error (the teacher tokenizes
    differently: use sequence-level distillation);
  - failures: 429 / 5xx / timeouts / dropped connections are retried with backoff and
    `Retry-After` (client.py), `concurrency` windows at a time.

  Answers are cached by content (cache.py), so a killed run resumes without asking twice.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np

from nanogpt_mlx.model.checkpoint import CheckpointError, load_model
from nanogpt_mlx.model.tokenizer import get_tokenizer, text_to_token, token_to_text
from nanogpt_mlx.training.distill.cache import AnswerCache, content_key
from nanogpt_mlx.training.distill.client import TeacherClient, TeacherRejected
from nanogpt_mlx.training.recipe import TrainingError

CACHE_VERSION = "logits-v1"  # part of every cache key: bump when the stored answer's meaning changes


def windows_of(x: np.ndarray, y: np.ndarray) -> list[list[int]]:
    """The seq_len + 1 tokens behind each row of a batch (x, y = x shifted by one)."""
    return [list(map(int, row)) + [int(last)] for row, last in zip(x, y[:, -1])]


# --- a checkpoint in-process -----------------------------------------------------------------
class LocalTeacher:
    """A checkpoint's logits for each (B, T) batch: full (kind "full") or its top k (kind "topk")."""

    def __init__(self, model_dir: str | Path, top_k: int | None = None):
        try:
            self.model = load_model(model_dir)
        except CheckpointError as exc:
            raise TrainingError(f"teacher: {exc}") from exc
        self.model.eval()
        self.kind = "topk" if top_k else "full"
        self.top_k = top_k
        self.vocab_size = self.model.config.vocab_size
        self.block_size = self.model.config.block_size
        self._forward = mx.compile(lambda x: self.model(x), inputs=self.model.state)

    def logits(self, x: np.ndarray) -> mx.array:
        logits = self._forward(mx.array(x))
        mx.eval(logits)
        return mx.stop_gradient(logits)

    def targets(self, x: np.ndarray, y: np.ndarray | None = None) -> tuple[mx.array, ...]:
        logits = self.logits(x)
        if self.kind == "full":
            return (logits,)
        log_p = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        ids = mx.argpartition(-log_p, self.top_k - 1, axis=-1)[..., : self.top_k]
        values = mx.take_along_axis(log_p, ids, axis=-1)
        mx.eval(ids, values)
        return ids.astype(mx.int32), values

    def describe(self) -> dict:
        return {"kind": "local", "form": self.kind, "top_k": self.top_k}

    def close(self) -> None:
        pass


# --- an OpenAI-compatible server ---------------------------------------------------------------
_LIMIT_PATTERNS = (
    r"at most (\d+)",  # this project's server: "logprobs must be at most 20 on this server, got 30"
    r"max(?:imum)? allowed:?\s*(\d+)",  # vLLM: "... greater than max allowed: 20"
    r"(?:<=|less than or equal to|up to|maximum(?: value)?(?: is| of)?)\s*(\d+)",  # pydantic / OpenAI
)
_CONTEXT_PATTERN = r"maximum context length is (\d+)"


def limit_in(message: str) -> int | None:
    for pattern in _LIMIT_PATTERNS:
        found = re.search(pattern, message, flags=re.IGNORECASE)
        if found:
            return int(found.group(1))
    return None


class RemoteLogitTeacher:
    kind = "topk"

    def __init__(self, client: TeacherClient, model: str = "", top_k: int = 20, cache_dir: str | Path | None = None,
                 max_model_len: int = 0, progress: bool = False):
        if top_k < 1:
            raise TrainingError(f"distill.top_k must be >= 1, got {top_k}")
        self.client = client
        self.model_name = model
        self.requested_top_k = self.top_k = top_k
        self.max_model_len = max_model_len or None  # None: not known yet (connect() reads it)
        self._override_len = bool(max_model_len)
        self.max_tokens = 0  # 1 for servers that refuse 0 (the one generated token is ignored)
        self.cache = AnswerCache(cache_dir) if cache_dir else None
        self.progress = progress
        self.tokenizer = get_tokenizer()
        self.vocab_size = self.tokenizer.n_vocab
        self.block_size = None
        self.windows_requested = 0  # answered over HTTP
        self.windows_cached = 0  # read from the cache
        self.fetch_seconds = 0.0
        self.cold_seconds = 0.0  # time in batches that asked the teacher anything
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=client.concurrency, thread_name_prefix="teacher")
        self._connected = False
        self._probed = False
        self._warned_short = False

    # --- what the server is ---------------------------------------------------------------------
    def connect(self) -> None:
        """Read the model id and max_model_len from /v1/models (a server without it is fine)."""
        if self._connected:
            return
        self._connected = True
        try:
            listing = self.client.get("models")
        except TeacherRejected:
            return
        cards = [c for c in listing.get("data", []) if isinstance(c, dict)] if isinstance(listing, dict) else []
        ids = [str(c.get("id")) for c in cards]
        if self.model_name and cards and self.model_name not in ids:
            raise TrainingError(f"the teacher serves {', '.join(ids)}, not {self.model_name!r} (--teacher-model)")
        card = next((c for c in cards if c.get("id") == self.model_name), cards[0] if cards else None)
        if card is None:
            return
        if not self.model_name:
            self.model_name = str(card.get("id"))
        if not self._override_len and isinstance(card.get("max_model_len"), int):
            self.max_model_len = card["max_model_len"]

    def sent_length(self, window: int) -> int:
        """How many of a window's tokens fit the teacher (all of them when its context is unknown)."""
        if self.max_model_len is None:
            return window
        budget = self.max_model_len - self.max_tokens
        if budget < 2:
            raise TrainingError(f"the teacher's context ({self.max_model_len} tokens) is too short to score a window")
        return min(window, budget)

    def describe(self) -> dict:
        return {"kind": "remote", "url": self.client.base_url, "model": self.model_name, "top_k": self.top_k,
                "max_model_len": self.max_model_len, "max_tokens": self.max_tokens}

    # --- one window ------------------------------------------------------------------------------
    def _key(self, sent: list[int], top_k: int) -> str:
        return content_key(CACHE_VERSION, self.client.url("completions"), self.model_name, top_k, sent)

    def _ask(self, sent: list[int], top_k: int, max_tokens: int) -> dict:
        body = {"prompt": sent, "max_tokens": max_tokens, "echo": True, "logprobs": top_k, "temperature": 0.0}
        if self.model_name:
            body["model"] = self.model_name
        return self.client.post("completions", body)

    def _adapt(self, rejected: TeacherRejected, sent: list[int], asked_k: int, asked_max_tokens: int) -> bool:
        """Change what is asked after a 400 the server explained; False if there is nothing to change.
        (Several threads may meet the same limit at once: each adapts from what it asked.)"""
        message, param, code = rejected.message, rejected.param or "", rejected.code or ""
        with self._lock:
            if code == "context_length_exceeded" or re.search(_CONTEXT_PATTERN, message, flags=re.IGNORECASE):
                found = re.search(_CONTEXT_PATTERN, message, flags=re.IGNORECASE)
                if found and int(found.group(1)) < len(sent) + asked_max_tokens:
                    if self.max_model_len is not None and self.max_model_len <= int(found.group(1)):
                        return True  # another thread got here first
                    self.max_model_len = int(found.group(1))
                    print(f"teacher: its context is {self.max_model_len} tokens; windows are cut to fit "
                          "(positions past it train on CE alone)", file=sys.stderr)
                    return True
                return False
            if "logprobs" in param or ("logprobs" in message and "max_tokens" not in param):
                limit = limit_in(message)
                if limit is not None and 1 <= limit < asked_k:
                    if self.top_k <= limit:
                        return True  # another thread got here first
                    print(f"teacher: it allows at most {limit} logprobs (the server's --max-logprobs); asking for "
                          f"{limit} instead of {self.top_k}", file=sys.stderr)
                    self.top_k = limit
                    return True
                raise TrainingError(
                    f"the teacher refused logprobs={asked_k}: {message}. Ask for fewer (--top-k) or raise the "
                    "server's limit (`nanogpt-mlx serve --max-logprobs N`, vLLM `--max-logprobs N`)")
            if "max_tokens" in param and asked_max_tokens == 0:
                self.max_tokens = 1
                return True
        return False

    def _parse(self, answer: dict, sent: list[int], top_k: int) -> tuple[np.ndarray, np.ndarray]:
        url = self.client.url("completions")
        try:
            logprobs = answer["choices"][0]["logprobs"]
            echoed, top = logprobs["tokens"], logprobs["top_logprobs"]
        except (KeyError, IndexError, TypeError) as exc:
            raise TrainingError(f"teacher {url}: the answer has no choices[0].logprobs.tokens / top_logprobs: "
                                "it does not support echo with logprobs (use --mode sequence)") from exc
        if not isinstance(echoed, list) or not isinstance(top, list) or len(echoed) < len(sent) or len(top) < len(sent):
            raise TrainingError(f"teacher {url} echoed {len(echoed or [])} of the {len(sent)} prompt tokens: "
                                "it does not honour echo (use --mode sequence)")
        for j, (text, ours) in enumerate(zip(echoed, sent)):
            if text_to_token(self.tokenizer, text) != ours:
                raise TrainingError(
                    f"the teacher's tokens differ from ours: position {j} of a window is our token {ours} "
                    f"({token_to_text(self.tokenizer, ours)!r}) but it echoed {text!r}. It does not use the GPT-2 "
                    "tokenizer (or names tokens another way): use sequence-level distillation (--mode sequence)")
        n = len(sent) - 1
        ids = np.zeros((n, top_k), dtype=np.int32)
        values = np.full((n, top_k), -np.inf, dtype=np.float32)
        for t in range(n):
            entries = top[t + 1]  # entry 0 (the first token) has no distribution
            if not isinstance(entries, dict) or not entries:
                raise TrainingError(f"teacher {url} gave no top_logprobs for prompt position {t + 1}")
            best: dict[int, float] = {}
            for text, lp in entries.items():
                token = text_to_token(self.tokenizer, text)
                if token is None:
                    raise TrainingError(f"teacher {url} named a token {text!r} in top_logprobs that our GPT-2 tokenizer "
                                        "does not have: it tokenizes differently (use --mode sequence)")
                best[token] = max(float(lp), best.get(token, -np.inf))
            ranked = sorted(best.items(), key=lambda kv: -kv[1])[:top_k]
            for j, (token, lp) in enumerate(ranked):
                ids[t, j], values[t, j] = token, lp
        return ids, values

    def window(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, logprobs) of shape (len(tokens) - 1, k): the teacher's top k for each target;
        rows past the teacher's context are -inf (no distribution)."""
        while True:
            sent = tokens[: self.sent_length(len(tokens))]
            top_k, max_tokens = self.top_k, self.max_tokens
            key = self._key(sent, top_k)
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                ids, values = cached["ids"], cached["logprobs"]
                with self._lock:
                    self.windows_cached += 1
                break
            try:
                answer = self._ask(sent, top_k, max_tokens)
            except TeacherRejected as rejected:
                if self._adapt(rejected, sent, top_k, max_tokens):
                    continue
                raise TrainingError(f"the teacher {self.client.url('completions')} rejected a window: {rejected}") from None
            ids, values = self._parse(answer, sent, top_k)
            if self.cache is not None:
                self.cache.put(key, {"ids": ids, "logprobs": values})
            with self._lock:
                self.windows_requested += 1
            break
        missing = len(tokens) - 1 - len(ids)
        if missing:
            ids = np.concatenate([ids, np.zeros((missing, ids.shape[1]), np.int32)])
            values = np.concatenate([values, np.full((missing, values.shape[1]), -np.inf, np.float32)])
        return ids, values

    def fetch(self, windows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Answers for many windows, `concurrency` at a time (the first alone: it finds the limits)."""
        self.connect()
        if windows and len(windows[0]) > self.sent_length(len(windows[0])) and not self._warned_short:
            self._warned_short = True
            short = len(windows[0]) - self.sent_length(len(windows[0]))
            print(f"teacher: its context is {self.max_model_len} tokens, so the last {short} position(s) of each "
                  f"{len(windows[0]) - 1}-token window train on CE alone", file=sys.stderr)
        start = time.perf_counter()
        asked_before = self.windows_requested
        results: list = [None] * len(windows)
        rest = list(range(len(windows)))
        if not self._probed and rest:
            results[0] = self.window(windows[0])
            self._probed = True
            rest = rest[1:]
        for i, answer in zip(rest, self._pool.map(lambda i: self.window(windows[i]), rest)):
            results[i] = answer
        elapsed = time.perf_counter() - start
        self.fetch_seconds += elapsed
        if self.windows_requested > asked_before:
            self.cold_seconds += elapsed
        return results

    def targets(self, x: np.ndarray, y: np.ndarray) -> tuple[mx.array, mx.array]:
        results = self.fetch(windows_of(x, y))
        return mx.array(np.stack([r[0] for r in results])), mx.array(np.stack([r[1] for r in results]))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()
