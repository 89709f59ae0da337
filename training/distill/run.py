"""`nanogpt-mlx distill`: a teacher, the trainer, and the loss that joins them.

    loss = alpha * CE(student, data) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

Logit mode hands the trainer an `extras_fn` that returns the teacher's targets for each
micro-batch (a local teacher's full logits, or top-k log-probabilities from a server) and a loss
that takes them; checkpoints, resume, eval and data parallel are the trainer's. Sequence mode
(sequence.py) turns the teacher's text into training data and trains with plain CE.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from nanogpt_mlx.training.distill.client import TeacherClient
from nanogpt_mlx.training.distill.sequence import (
    ENDPOINTS,
    SequenceTeacher,
    corpus_prompts,
    file_prompts,
    mix_data,
    write_teacher_text,
)
from nanogpt_mlx.training.distill.teachers import LocalTeacher, RemoteLogitTeacher, windows_of
from nanogpt_mlx.training.losses import (
    SPARSE_KL_FORMS,
    cross_entropy,
    distill_kl_full,
    distill_kl_topk,
    distillation_loss,
    token_cross_entropy,
)
from nanogpt_mlx.training.recipe import DistillSection, Recipe, TrainingError

MODES = ("logits", "sequence")


def is_url(teacher: str) -> bool:
    return teacher.startswith(("http://", "https://"))


def check_settings(d: DistillSection) -> None:
    checks = [
        (d.mode in MODES, f"distill.mode must be one of {', '.join(MODES)}, got {d.mode!r}"),
        (d.sparse_kl in SPARSE_KL_FORMS, f"distill.sparse_kl must be one of {', '.join(SPARSE_KL_FORMS)}, got {d.sparse_kl!r}"),
        (d.top_k >= 1, f"distill.top_k must be >= 1, got {d.top_k}"),
        (d.teacher_max_len >= 0, f"distill.teacher_max_len must be >= 0, got {d.teacher_max_len}"),
        (d.concurrency >= 1, f"distill.concurrency must be >= 1, got {d.concurrency}"),
        (d.timeout > 0 and d.max_retries >= 0, "distill.timeout must be > 0 and distill.max_retries >= 0"),
        (d.endpoint in ENDPOINTS, f"distill.endpoint must be one of {', '.join(ENDPOINTS)}, got {d.endpoint!r}"),
        (0.0 <= d.mix_ratio <= 1.0, f"distill.mix_ratio must be in [0, 1], got {d.mix_ratio}"),
        (d.num_prompts >= 1 and d.prompt_tokens >= 1 and d.max_new_tokens >= 1,
         "distill.num_prompts, prompt_tokens and max_new_tokens must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)
    if not d.teacher:
        raise TrainingError("no teacher: pass --teacher DIR_OR_URL (or set distill.teacher)")
    if d.mode == "sequence" and not is_url(d.teacher):
        raise TrainingError("sequence-level distillation asks a server for text: --teacher must be an http(s):// URL")


def make_client(d: DistillSection) -> TeacherClient:
    return TeacherClient(d.teacher, api_key_env=d.api_key_env, timeout=d.timeout, max_retries=d.max_retries,
                         concurrency=d.concurrency)


def make_teacher(recipe: Recipe, out_dir: str | Path | None = None, progress: bool = False):
    d = recipe.distill
    check_settings(d)
    if is_url(d.teacher):
        cache = d.cache_dir or (str(Path(out_dir) / "teacher_cache") if out_dir else None)
        return RemoteLogitTeacher(make_client(d), model=d.teacher_model, top_k=d.top_k, cache_dir=cache,
                                  max_model_len=d.teacher_max_len, progress=progress)
    if not Path(d.teacher).is_dir():
        raise TrainingError(f"teacher not found: {d.teacher} is neither a checkpoint directory nor an http(s):// URL")
    return LocalTeacher(d.teacher)


# --- losses for the compiled step ------------------------------------------------------------
def full_kl_loss(alpha: float, temperature: float):
    def loss_fn(model, x, y, teacher_logits):
        logits = model(x)
        return distillation_loss(cross_entropy(logits, y), distill_kl_full(logits, teacher_logits, temperature), alpha, temperature)

    return loss_fn


def topk_kl_loss(alpha: float, temperature: float, form: str = "renorm"):
    def loss_fn(model, x, y, topk_ids, topk_logprobs):
        logits = model(x)
        kl = distill_kl_topk(logits, topk_ids, topk_logprobs, temperature, form)
        return distillation_loss(cross_entropy(logits, y), kl, alpha, temperature)

    return loss_fn


def loss_for(teacher, d: DistillSection):
    if teacher.kind == "full":
        return full_kl_loss(d.alpha, d.temperature), lambda x, y: teacher.targets(x)
    return topk_kl_loss(d.alpha, d.temperature, d.sparse_kl), teacher.targets


# --- the windows a run will ask for ------------------------------------------------------------------
def planned_windows(recipe: Recipe, data_dir: str, rows: tuple[int, int] | None = None, world: int = 1):
    """Yield, step by step, the windows (seq_len + 1 tokens) the trainer will draw: the same seeded
    samplers, phases and micro-batches as train.Trainer, so a prefetch asks exactly what the
    run will ask. `rows`: only this process's slice of each global batch."""
    from nanogpt_mlx.training.dataset import RandomWindowSampler, TokenShards

    shards = TokenShards(data_dir, "train")
    phase, sampler = None, None
    for step in range(recipe.train.max_steps):
        index, _, seq_len, batch = recipe.phase_at(step)
        if index != phase:
            phase = index
            sampler = RandomWindowSampler(shards, batch * world, seq_len, seed=recipe.train.seed + index)
        windows = []
        for _ in range(recipe.data.grad_accum):
            x, y = sampler.next_batch()
            if rows is not None:
                x, y = x[rows[0]:rows[1]], y[rows[0]:rows[1]]
            windows += windows_of(x, y)
        yield step, windows


def prefetch(teacher: RemoteLogitTeacher, recipe: Recipe, data_dir: str, progress: bool = True, chunk: int = 256) -> dict:
    """Ask the teacher for every window of the run (cached ones are read, not asked), `concurrency`
    at a time across steps. Returns counts and rates."""
    import time

    from tqdm import tqdm

    asked, cached, start = teacher.windows_requested, teacher.windows_cached, time.perf_counter()
    bar = tqdm(total=recipe.train.max_steps, unit="step", desc="teacher", disable=not progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    pending, steps = [], 0
    try:
        for _, windows in planned_windows(recipe, data_dir):
            pending += windows
            steps += 1
            if len(pending) >= chunk:
                teacher.fetch(pending)
                bar.update(steps)
                pending, steps = [], 0
                bar.set_postfix(asked=teacher.windows_requested - asked, cached=teacher.windows_cached - cached,
                                retries=teacher.client.stats.retried, refresh=False)
        if pending:
            teacher.fetch(pending)
            bar.update(steps)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    n_asked, n_cached = teacher.windows_requested - asked, teacher.windows_cached - cached
    return {"windows": n_asked + n_cached, "asked": n_asked, "cached": n_cached, "seconds": round(seconds, 3),
            "windows_per_s": round((n_asked + n_cached) / max(seconds, 1e-9), 2)}


# --- the runs --------------------------------------------------------------------------------
def run_distill(recipe: Recipe, out_dir: str, resume: bool = False, init_from: str | None = None, progress: bool = True,
                stop_at: int | None = None) -> dict | None:
    """Train `recipe` against its teacher; `stop_at`: stop (with a checkpoint) at that step, as
    `Trainer.fit` does."""
    check_settings(recipe.distill)
    if recipe.distill.mode == "sequence":
        return run_sequence_distill(recipe, out_dir, resume=resume, init_from=init_from, progress=progress, stop_at=stop_at)
    from nanogpt_mlx.training.train import Trainer

    teacher = make_teacher(recipe, out_dir, progress=progress)
    try:
        if isinstance(teacher, RemoteLogitTeacher):
            teacher.connect()
            print(f"teacher: {teacher.client.base_url} model {teacher.model_name or '(default)'}, context "
                  f"{teacher.max_model_len or 'unknown'}, asking top {teacher.top_k} logprobs; cache {teacher.cache.root}",
                  file=sys.stderr)
        elif teacher.block_size is not None and max(seq for _, seq, _ in recipe.phases()) > teacher.block_size:
            raise TrainingError(f"seq_len exceeds the local teacher's context ({teacher.block_size})")
        loss_fn, extras_fn = loss_for(teacher, recipe.distill)
        trainer = Trainer(recipe, recipe.data.train, out_dir, resume=resume, init_from=init_from, progress=progress,
                          loss_fn=loss_fn, extras_fn=extras_fn)
        if teacher.vocab_size != trainer.config.vocab_size:
            raise TrainingError(f"the teacher has a {teacher.vocab_size}-token vocabulary, the student {trainer.config.vocab_size}: "
                                "they must share the tokenizer (or use --mode sequence with an HTTP teacher)")
        if isinstance(teacher, RemoteLogitTeacher) and recipe.distill.prefetch and trainer.is_main:
            counts = prefetch(teacher, recipe, recipe.data.train, progress=progress)
            print(f"teacher: prefetched {counts['windows']} windows ({counts['asked']} asked, {counts['cached']} cached) "
                  f"in {counts['seconds']:.1f} s", file=sys.stderr)
        summary = trainer.fit(stop_at=stop_at)
        if isinstance(teacher, RemoteLogitTeacher):
            summary["teacher"] = teacher_summary(teacher)
            if trainer.is_main:
                s = summary["teacher"]
                print(f"teacher: {s['windows_requested']} windows asked over HTTP, {s['windows_cached']} read from "
                      f"{teacher.cache.root}; {s['http']['retried']} retries {s['http']['retries']}", file=sys.stderr)
        return summary if trainer.is_main else None
    finally:
        teacher.close()


def teacher_summary(teacher: RemoteLogitTeacher) -> dict:
    return {**teacher.describe(), "windows_requested": teacher.windows_requested, "windows_cached": teacher.windows_cached,
            "fetch_seconds": round(teacher.fetch_seconds, 3), "http": teacher.client.stats.as_dict()}


def run_sequence_distill(recipe: Recipe, out_dir: str, resume: bool = False, init_from: str | None = None,
                         progress: bool = True, stop_at: int | None = None) -> dict | None:
    """Teacher text -> shards -> mixed with the corpus -> the trainer (plain CE)."""
    from nanogpt_mlx.training.train import Trainer

    d, out = recipe.distill, Path(out_dir)
    corpus = recipe.data.train or None
    if corpus is not None and not Path(corpus).is_dir():
        raise TrainingError(f"training data not found: {corpus} is not a directory")
    if d.prompts:
        prompts = file_prompts(d.prompts)
    elif corpus is not None:
        prompts = corpus_prompts(corpus, d.num_prompts, d.prompt_tokens, seed=recipe.train.seed)
    else:
        raise TrainingError("sequence-level distillation needs prompts: --prompts FILE, or --data to sample them from")
    client = make_client(d)
    teacher = SequenceTeacher(client, model=d.teacher_model, endpoint=d.endpoint, max_new_tokens=d.max_new_tokens,
                              temperature=d.gen_temperature, seed=recipe.train.seed,
                              cache_dir=d.cache_dir or out / "teacher_cache")
    try:
        print(f"teacher: {len(prompts)} prompts to {client.url('chat/completions' if d.endpoint == 'chat' else 'completions')}",
              file=sys.stderr)
        continuations = teacher.generate(prompts, progress=progress)
    finally:
        client.close()
    shards = write_teacher_text(continuations, out / "teacher_text", d.endpoint)
    manifest = mix_data(corpus, shards, out / "data", d.mix_ratio)
    m = manifest["mixture"]
    print(f"teacher: {teacher.requested} requests, {teacher.cached} from the cache, {teacher.tokens_received:,} tokens received; "
          f"{m['teacher_tokens']:,} teacher tokens x {m['teacher_repeats']} in {out / 'data'} "
          f"({m['teacher_share']:.0%} of the training windows)", file=sys.stderr)
    trainer = Trainer(recipe, str(out / "data"), out_dir, resume=resume, init_from=init_from, progress=progress)
    summary = trainer.fit(stop_at=stop_at)
    summary["teacher"] = {**teacher.summary(), "mixture": m}
    return summary if trainer.is_main else None


# --- held-out comparison with a teacher -------------------------------------------------------------
@dataclass
class HeldOut:
    kl: float  # mean KL(teacher || student) per token, nats, T = 1, full vocabulary
    loss: float  # mean cross-entropy on the data, nats/token
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def held_out_against(student, teacher: LocalTeacher, data_dir: str, seq_len: int, batch_size: int = 8,
                     max_batches: int | None = None, split: str = "val") -> HeldOut:
    """The student's full-vocabulary KL to a local teacher and its loss, over the split's windows."""
    from nanogpt_mlx.training.dataset import TokenShards, sequential_batches

    student.eval()
    kl_sum, ce_sum, tokens = 0.0, 0.0, 0
    for i, (x, y) in enumerate(sequential_batches(TokenShards(data_dir, split), batch_size, seq_len)):
        if max_batches is not None and i >= max_batches:
            break
        logits = student(mx.array(x))
        teacher_logits = teacher.logits(x)
        n = x.size
        kl = distill_kl_full(logits, teacher_logits, 1.0) * n
        ce = token_cross_entropy(logits, mx.array(y)).sum()
        mx.eval(kl, ce)
        kl_sum, ce_sum, tokens = kl_sum + kl.item(), ce_sum + ce.item(), tokens + n
    if tokens == 0:
        raise TrainingError(f"the {split} split of {data_dir} holds no window of {seq_len} tokens")
    return HeldOut(kl=kl_sum / tokens, loss=ce_sum / tokens, tokens=tokens)

