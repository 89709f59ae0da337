"""Held-out loss, perplexity and throughput: `nanogpt-mlx eval --model DIR --data SHARDS`.

The validation split is walked in order, non-overlapping windows of `seq_len`, so the same
data gives the same number every time. Under `mx.distributed` each process scores every
world-th batch and the sums are added across processes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import islice

import mlx.core as mx

from nanogpt_mlx.model.gpt import GPT
from nanogpt_mlx.training.losses import token_cross_entropy


@dataclass
class EvalResult:
    loss: float  # mean nats per token
    tokens: int
    seconds: float  # all of it, including the first batch's compilation
    steady_tokens: int = 0  # tokens after the first batch, and their time: the throughput
    steady_seconds: float = 0.0

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    @property
    def tok_per_s(self) -> float:
        if self.steady_tokens and self.steady_seconds > 0:
            return self.steady_tokens / self.steady_seconds
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "seconds": self.seconds,
                "tok_per_s": self.tok_per_s}


class Evaluator:
    """Scores (x, y) batches with a compiled forward pass that reads the model's current weights."""

    def __init__(self, model: GPT, group=None):
        self.model = model
        self.group = group
        self.world = group.size() if group is not None else 1
        self.rank = group.rank() if group is not None else 0

        # The model's parameters are compile *inputs*, so the compiled graph sees each update
        # (captured arrays would be frozen into the graph as constants).
        def _loss_sum(x, y):
            return token_cross_entropy(model(x), y).sum()

        self._loss_sum = mx.compile(_loss_sum, inputs=model.state)

    def __call__(self, batches, max_batches: int | None = None) -> EvalResult:
        was_training = self.model.training
        self.model.eval()
        total_loss, count = 0.0, 0  # summed in float64 on the host: exact enough for any split size
        first_tokens, first_done = 0, None
        start = time.perf_counter()
        try:
            iterator = batches if max_batches is None else islice(batches, max_batches)
            for x, y in iterator:
                x, y = x[self.rank :: self.world], y[self.rank :: self.world]
                if len(x) == 0:
                    continue
                total_loss += float(self._loss_sum(mx.array(x), mx.array(y)).item())
                count += y.size
                if first_done is None:
                    first_tokens, first_done = count, time.perf_counter()
        finally:
            self.model.train(was_training)
        if self.world > 1:
            sums = mx.distributed.all_sum(mx.array([total_loss, float(count)], dtype=mx.float32), group=self.group)
            total_loss, count = float(sums[0].item()), int(sums[1].item())
        end = time.perf_counter()
        if count == 0:
            return EvalResult(loss=float("nan"), tokens=0, seconds=end - start)
        steady = (count - first_tokens * self.world, end - first_done) if first_done is not None else (0, 0.0)
        return EvalResult(loss=total_loss / count, tokens=count, seconds=end - start, steady_tokens=steady[0], steady_seconds=steady[1])


def run_eval(model_dir: str, data_dir: str, split: str = "val", batch_size: int = 8, seq_len: int | None = None,
             max_batches: int | None = None, progress: bool = True, model: GPT | None = None) -> EvalResult:
    """Score the checkpoint in `model_dir` (or `model`, already loaded from it) on a split of `data_dir`."""
    from tqdm import tqdm

    from nanogpt_mlx.model.checkpoint import load_model
    from nanogpt_mlx.training.dataset import DataError, TokenShards, sequential_batches
    from nanogpt_mlx.training.recipe import TrainingError

    model = model or load_model(model_dir)
    seq_len = seq_len or model.config.block_size
    if seq_len > model.config.block_size:
        raise TrainingError(f"--seq-len {seq_len} exceeds the model's context ({model.config.block_size})")
    try:
        shards = TokenShards(data_dir, split)
    except DataError as exc:
        raise TrainingError(str(exc)) from exc
    except (ValueError, OSError) as exc:  # e.g. numpy cannot memory-map a 0-byte shard file
        raise TrainingError(f"cannot read the {split} shards of {data_dir}: {exc}") from exc
    vocab = shards.manifest["tokenizer"].get("vocab_size", 0)
    if vocab > model.config.vocab_size:
        raise TrainingError(f"{data_dir} was tokenized with {vocab} token ids; the model knows only {model.config.vocab_size}")
    windows = sum((len(s) - 1) // seq_len for s in shards.shards)
    if windows == 0:
        raise TrainingError(f"the {split} split of {data_dir} has {len(shards)} tokens: not one window of {seq_len} + 1")
    n_batches = math.ceil(windows / batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    batches = tqdm(sequential_batches(shards, batch_size, seq_len), total=n_batches, desc="eval", unit="batch", disable=not progress)
    return Evaluator(model)(batches, max_batches=n_batches)
