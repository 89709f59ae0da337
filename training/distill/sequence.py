"""Sequence-level distillation: the student learns from the teacher's text, not its logits.

For teachers that tokenize differently or give no prompt logprobs (llama.cpp's server, hosted
chat-only APIs):

    prompts (a file, or windows sampled from the corpus)
      -> teacher continuations over /v1/completions or /v1/chat/completions   (cached per prompt)
      -> RUN/teacher_text/teacher.jsonl -> token shards (prepare-data)
      -> RUN/data: the corpus's train shards + the teacher's, mixed at `mix_ratio`
      -> the ordinary trainer (cross-entropy) on RUN/data

The mixed directory is a prepared-data directory like any other: its manifest lists the corpus
shards where they are (relative paths, nothing copied) and the teacher's shard as many times as
the ratio needs (plus one cut copy for the fraction), so a random window comes from teacher
text with probability `mix_ratio`. Its validation split is the corpus's.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanogpt_mlx.atomic import write_bytes, write_json, write_text
from nanogpt_mlx.model.tokenizer import EOT_TOKEN, get_tokenizer
from nanogpt_mlx.training.distill.cache import AnswerCache, content_key
from nanogpt_mlx.training.distill.client import TeacherClient, TeacherRejected
from nanogpt_mlx.training.recipe import TrainingError

CACHE_VERSION = "sequence-v1"
ENDPOINTS = ("completions", "chat")


# --- prompts ---------------------------------------------------------------------------------------
def file_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per non-empty line of a text file, or the `prompt` (else `text`) field of each
    JSONL line."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"prompts file not found: {path}")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainingError(f"{path}:{n}: not JSON: {exc}") from exc
            text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise TrainingError(f"{path}:{n}: expected an object with a string 'prompt' or 'text'")
            prompts.append(text)
        else:
            prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise TrainingError(f"{path} holds no prompts")
    return prompts


def corpus_prompts(data_dir: str | os.PathLike, count: int, prompt_tokens: int, seed: int) -> list[str]:
    """`count` prompts of about `prompt_tokens` tokens from random places of the train split
    (starting at a document's start when one begins inside the window)."""
    from nanogpt_mlx.training.dataset import DataError, TokenShards

    try:
        shards = TokenShards(data_dir, "train")
    except DataError as exc:
        raise TrainingError(str(exc)) from exc
    sizes = np.array([max(len(s) - 2 * prompt_tokens, 0) for s in shards.shards], dtype=np.int64)
    if sizes.sum() == 0:
        raise TrainingError(f"the train split of {data_dir} is too small to sample {prompt_tokens}-token prompts from")
    rng = np.random.default_rng(seed)
    tokenizer = get_tokenizer()
    prompts = []
    for _ in range(count):
        index = int(rng.choice(len(sizes), p=sizes / sizes.sum()))
        shard, start = shards.shards[index], int(rng.integers(0, sizes[index]))
        window = np.asarray(shard[start:start + 2 * prompt_tokens], dtype=np.int64)
        eots = np.flatnonzero(window[:prompt_tokens] == shards.eot_token)
        begin = int(eots[-1]) + 1 if len(eots) else 0  # a document starts here: begin with it
        tokens = [int(t) for t in window[begin:begin + prompt_tokens] if t != shards.eot_token]
        prompts.append(tokenizer.decode(tokens))
    return prompts


# --- the teacher's continuations -----------------------------------------------------------------
@dataclass
class Continuation:
    prompt: str
    text: str
    completion_tokens: int


class SequenceTeacher:
    """Continuations of prompts from an OpenAI-compatible server, cached per prompt."""

    def __init__(self, client: TeacherClient, model: str = "", endpoint: str = "completions", max_new_tokens: int = 256,
                 temperature: float = 0.8, top_p: float = 1.0, seed: int = 0, cache_dir: str | Path | None = None):
        if endpoint not in ENDPOINTS:
            raise TrainingError(f"distill.endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}")
        if max_new_tokens < 1:
            raise TrainingError(f"distill.max_new_tokens must be >= 1, got {max_new_tokens}")
        self.client, self.model_name, self.endpoint = client, model, endpoint
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.cache = AnswerCache(cache_dir, kind="json") if cache_dir else None
        self.tokenizer = get_tokenizer()
        self.requested = 0
        self.cached = 0
        self.tokens_received = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    def _body(self, index: int, prompt: str) -> dict:
        body = {"max_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed + index}
        if self.model_name:
            body["model"] = self.model_name
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    def continuation(self, index: int, prompt: str) -> Continuation:
        body = self._body(index, prompt)
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        key = content_key(CACHE_VERSION, self.client.url(path), body)
        stored = self.cache.get(key) if self.cache is not None else None
        if stored is None:
            try:
                answer = self.client.post(path, body)
            except TeacherRejected as rejected:
                raise TrainingError(f"the teacher {self.client.url(path)} rejected a prompt: {rejected}") from None
            try:
                choice = answer["choices"][0]
                text = choice["message"]["content"] if self.endpoint == "chat" else choice["text"]
            except (KeyError, IndexError, TypeError) as exc:
                raise TrainingError(f"the teacher {self.client.url(path)} answered without choices[0]."
                                    f"{'message.content' if self.endpoint == 'chat' else 'text'}") from exc
            text = text or ""
            usage = answer.get("usage") or {}
            tokens = usage.get("completion_tokens")
            if not isinstance(tokens, int):  # a server that reports no usage: count in our tokenizer
                tokens = len(self.tokenizer.encode_ordinary(text))
            stored = {"prompt": prompt, "text": text, "completion_tokens": tokens}
            if self.cache is not None:
                self.cache.put(key, stored)
            with self._lock:
                self.requested += 1
                self.tokens_received += tokens
        else:
            with self._lock:
                self.cached += 1
        return Continuation(stored["prompt"], stored["text"], stored["completion_tokens"])

    def generate(self, prompts: list[str], progress: bool = True) -> list[Continuation]:
        from tqdm import tqdm

        start = time.perf_counter()
        out: list[Continuation | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), unit="prompt", desc="teacher", disable=not progress, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        try:
            with ThreadPoolExecutor(max_workers=self.client.concurrency, thread_name_prefix="teacher") as pool:
                futures = [pool.submit(self.continuation, i, p) for i, p in enumerate(prompts)]
                for i, future in enumerate(futures):
                    out[i] = future.result()
                    bar.update(1)
                    bar.set_postfix(requests=self.requested, cached=self.cached, tokens=self.tokens_received,
                                    retries=self.client.stats.retried, refresh=False)
        finally:
            bar.close()
            self.seconds += time.perf_counter() - start
        return out  # type: ignore[return-value]

    def summary(self) -> dict:
        return {"prompts": self.requested + self.cached, "requests": self.requested, "cached": self.cached,
                "tokens_received": self.tokens_received, "seconds": round(self.seconds, 2),
                "http": self.client.stats.as_dict()}


# --- text -> shards -> a mixed data directory -------------------------------------------------------
def write_teacher_text(continuations: list[Continuation], out_dir: str | Path, endpoint: str) -> Path:
    """The teacher's documents as JSONL and token shards (all train) in `out_dir`; returns the shards
    directory. A completion continues its prompt, so the document is prompt + continuation; a chat
    answer stands alone."""
    from nanogpt_mlx.training.prepare import prepare_data

    out_dir = Path(out_dir)
    lines = []
    for c in continuations:
        text = c.prompt + c.text if endpoint == "completions" else c.text
        text = text.replace(EOT_TOKEN, "")
        if text.strip():
            lines.append(json.dumps({"text": text}) + "\n")
    if not lines:
        raise TrainingError("the teacher returned no text at all")
    jsonl = out_dir / "teacher.jsonl"
    write_text(jsonl, "".join(lines))
    prepare_data([jsonl], out_dir / "tokens", val_fraction=0.0, progress=False)
    return out_dir / "tokens"


def mix_data(corpus_dir: str | Path | None, teacher_dir: str | Path, out_dir: str | Path, ratio: float) -> dict:
    """A prepared-data directory whose train windows come from the teacher's shards with probability
    `ratio` and from the corpus's otherwise (val: the corpus's). Returns its manifest."""
    from nanogpt_mlx.training.dataset import MANIFEST, load_manifest

    if not 0.0 <= ratio <= 1.0:
        raise TrainingError(f"distill.mix_ratio must be in [0, 1], got {ratio}")
    if corpus_dir is None and ratio < 1.0:
        raise TrainingError("mixing teacher text with the corpus needs --data (or set distill.mix_ratio = 1)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = load_manifest(teacher_dir)
    teacher_shards = [(Path(teacher_dir) / s["file"], s["tokens"]) for s in teacher["splits"]["train"]["shards"]]
    teacher_tokens = sum(n for _, n in teacher_shards)
    if teacher_tokens == 0:
        raise TrainingError("the teacher's text holds no tokens")

    def ref(path: Path) -> str:
        return os.path.relpath(Path(path).resolve(), out_dir.resolve())

    train, documents, corpus_tokens = [], 0, 0
    if corpus_dir is not None:
        corpus = load_manifest(corpus_dir)
        if ratio < 1.0:
            for s in corpus["splits"]["train"]["shards"]:
                train.append({"file": ref(Path(corpus_dir) / s["file"]), "tokens": s["tokens"], "from": "corpus"})
                corpus_tokens += s["tokens"]
            documents += corpus["splits"]["train"]["documents"]
        val = {"documents": corpus["splits"].get("val", {}).get("documents", 0),
               "tokens": corpus["splits"].get("val", {}).get("tokens", 0),
               "shards": [{"file": ref(Path(corpus_dir) / s["file"]), "tokens": s["tokens"]}
                          for s in corpus["splits"].get("val", {}).get("shards", [])]}
        tokenizer = corpus["tokenizer"]
    else:
        val = {"documents": 0, "tokens": 0, "shards": []}
        tokenizer = teacher["tokenizer"]
    # Teacher tokens wanted: ratio of the whole, i.e. ratio / (1 - ratio) x the corpus.
    wanted = teacher_tokens if ratio >= 1.0 else round(ratio / (1.0 - ratio) * corpus_tokens)
    repeats, rest = divmod(wanted, teacher_tokens)
    for _ in range(repeats):
        for path, n in teacher_shards:
            train.append({"file": ref(path), "tokens": n, "from": "teacher"})
    if rest:
        # The fraction: the first `rest` teacher tokens, copied once into this directory.
        joined = np.concatenate([np.memmap(p, dtype=np.uint16, mode="r") for p, _ in teacher_shards])[:rest]
        write_bytes(out_dir / "teacher_part.bin", joined.astype("<u2").tobytes())
        train.append({"file": "teacher_part.bin", "tokens": int(rest), "from": "teacher"})
    if not train:
        raise TrainingError("nothing to train on: mix_ratio 0 and no corpus tokens")
    total = sum(s["tokens"] for s in train)
    manifest = {
        "format": teacher["format"], "version": teacher["version"], "dtype": "uint16", "tokenizer": tokenizer,
        "document_separator": teacher.get("document_separator"),
        "splits": {"train": {"documents": documents + teacher["splits"]["train"]["documents"] * max(repeats, 1),
                             "tokens": total, "shards": train},
                   "val": val},
        "split_rule": "distill mix: corpus train + teacher text; val from the corpus",
        "mixture": {"corpus": str(corpus_dir) if corpus_dir else None, "teacher": str(teacher_dir), "ratio": ratio,
                    "teacher_tokens": teacher_tokens, "corpus_tokens": corpus_tokens,
                    "teacher_share": round(wanted / total, 6) if total else 0.0,
                    "teacher_repeats": round(wanted / teacher_tokens, 4)},
    }
    write_json(out_dir / MANIFEST, manifest)
    return manifest

