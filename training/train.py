"""The trainer: compiled AdamW steps over random windows, periodic eval, resumable checkpoints.

One optimizer step = `grad_accum` micro-batches of `batch_size` rows per process. Every
process draws the *global* batch (batch_size x world rows) from the same seeded sampler and
keeps its own slice, so N processes of batch b compute exactly what one process of batch N*b
does, and the sampler state (the data position) is the same everywhere: a checkpoint written
by rank 0 resumes any rank. Gradients are averaged with `all_sum` before clipping.

Determinism: the weights are initialised from `train.seed`; the sampler of phase i is seeded
with seed + i; MLX's global RNG (dropout) is reseeded from (seed, step, micro-batch) before
every micro-batch, so the random stream is a function of the step alone and needs no saving.
Together with the fp32 weights and the optimizer state in the checkpoint, a resumed run
repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from nanogpt_mlx.atomic import atomic_file, write_text
from nanogpt_mlx.model.checkpoint import CheckpointError, load_config, load_model
from nanogpt_mlx.model.gpt import GPT
from nanogpt_mlx.training import checkpointing as ckpt
from nanogpt_mlx.training.evaluate import Evaluator
from nanogpt_mlx.training.losses import cross_entropy
from nanogpt_mlx.training.optim import build_optimizer, current_lr
from nanogpt_mlx.training.recipe import Recipe, TrainingError

LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"
RECIPE_FILE = "recipe.json"


def default_loss(model: GPT, x: mx.array, y: mx.array) -> mx.array:
    return cross_entropy(model(x), y)


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run.

    `loss_fn(model, x, y, *extras)` and `extras_fn(x, y) -> tuple of arrays` let distillation
    reuse the loop with teacher signals as extra inputs to the compiled step.
    """

    def __init__(
        self,
        recipe: Recipe,
        data_dir: str,
        out_dir: str,
        resume: bool = False,
        init_from: str | None = None,
        progress: bool = True,
        loss_fn=default_loss,
        extras_fn=None,
        group=None,
    ):
        self.recipe = recipe
        self.data_dir = data_dir
        self.run_dir = Path(out_dir)
        self.loss_fn = loss_fn
        self.extras_fn = extras_fn
        self.group = group if group is not None else mx.distributed.init()
        self.world, self.rank = self.group.size(), self.group.rank()
        self.is_main = self.rank == 0
        self.progress = progress and self.is_main
        self._stop_requested = False

        self.config = self._model_config(init_from)
        recipe.validate(self.config)
        self._open_data()

        # Model and optimizer: a fresh start, an --init-from checkpoint, or the run's latest checkpoint.
        self.step, self.tokens_seen, self.best_val = 0, 0, math.inf
        self.elapsed_before = 0.0
        self.sampler_state = None
        resumed = None
        if resume:
            if self.is_main:
                for leftover in ckpt.clean_partials(self.run_dir):
                    print(f"removed unfinished checkpoint {leftover}", file=sys.stderr)
            resumed = ckpt.latest_checkpoint(self.run_dir, self.config)
            if resumed is None and self.is_main:
                print(f"--resume: no checkpoint in {self.run_dir}; starting from step 0", file=sys.stderr)
        elif ckpt.list_checkpoints(self.run_dir):
            raise TrainingError(f"{self.run_dir} already holds checkpoints: pass --resume to continue that run, or choose another --out")

        if resumed is not None:
            self.model = resumed.model
            self._restore_state(resumed)
        elif init_from:
            self.model = load_model(init_from)
        else:
            self.model = GPT(self.config)
            self.model.init_weights(seed=recipe.train.seed)
        if self.config.dropout != self.model.config.dropout:  # dropout may change across a resume
            self.model = _with_dropout(self.model, self.config)
        mx.eval(self.model.parameters())
        self.model.train()

        self.optimizer = build_optimizer(recipe.optim, recipe.train.max_steps)
        self.optimizer.init(self.model.trainable_parameters())
        if resumed is not None:
            self._restore_optimizer(resumed.optimizer_state, resumed.path)
        self.evaluator = Evaluator(self.model, self.group if self.world > 1 else None)
        self._build_steps()
        self.phase_index = None
        self.sampler = None

    # --- setup --------------------------------------------------------------------------------
    def _model_config(self, init_from):
        if not init_from:
            return self.recipe.model_config()
        try:
            config = load_config(init_from)
        except CheckpointError as exc:
            raise TrainingError(f"--init-from: {exc}") from exc
        # The recipe may leave [model] empty; whatever it does say must agree with the checkpoint.
        for key, value in self.recipe.model.items():
            if key != "dropout" and getattr(config, key) != value:
                raise TrainingError(
                    f"the recipe sets model.{key} = {value!r} but --init-from {init_from} has {key} = {getattr(config, key)!r}"
                )
        if "dropout" in self.recipe.model:
            config = config.replace(dropout=self.recipe.model["dropout"])
        return config

    def _open_data(self) -> None:
        from nanogpt_mlx.training.dataset import DataError, TokenShards

        if not self.data_dir:
            raise TrainingError("no training data: pass --data SHARDS_DIR (made by `nanogpt-mlx prepare-data`) or set data.train")
        if not Path(self.data_dir).is_dir():
            raise TrainingError(f"training data not found: {self.data_dir} is not a directory (run `nanogpt-mlx prepare-data` first)")
        try:
            self.train_shards = TokenShards(self.data_dir, "train")
        except DataError as exc:
            raise TrainingError(str(exc)) from exc
        except (ValueError, OSError) as exc:  # e.g. numpy cannot memory-map a 0-byte shard file
            raise TrainingError(f"cannot read the train shards of {self.data_dir}: {exc}") from exc
        if len(self.train_shards) == 0:
            raise TrainingError(f"the train split of {self.data_dir} is empty (0 tokens): nothing to train on")
        longest = max(seq for _, seq, _ in self.recipe.phases())
        if max(len(s) for s in self.train_shards.shards) < longest + 1:
            raise TrainingError(f"the train shards of {self.data_dir} hold fewer than seq_len + 1 = {longest + 1} tokens each")
        vocab = self.train_shards.manifest["tokenizer"].get("vocab_size", 0)
        if vocab > self.config.vocab_size:
            raise TrainingError(
                f"{self.data_dir} was tokenized with {vocab} token ids but model.vocab_size is {self.config.vocab_size}"
            )
        try:
            self.val_shards = TokenShards(self.data_dir, "val")
            if len(self.val_shards) <= self.recipe.phases()[-1][1]:
                raise DataError("too small")
        except (DataError, ValueError, OSError):
            self.val_shards = None
            if self.is_main and self.recipe.data.eval_batches:
                print(f"warning: {self.data_dir} has no usable validation split: no periodic eval, no best checkpoint", file=sys.stderr)

    def _restore_state(self, resumed: ckpt.Resumed) -> None:
        s = resumed.state
        self.step = int(s["step"])
        self.tokens_seen = int(s.get("tokens_seen", 0))
        self.best_val = float(s.get("best_val_loss") if s.get("best_val_loss") is not None else math.inf)
        self.elapsed_before = float(s.get("elapsed_seconds", 0.0))
        self.sampler_state = s.get("sampler")
        self.resumed_from = resumed.path
        if self.is_main:
            print(f"resuming from {resumed.path} (step {self.step}, {self.tokens_seen:,} tokens seen)", file=sys.stderr)

    def _restore_optimizer(self, state: dict, path: Path) -> None:
        current = dict(tree_flatten(self.optimizer.state))
        loaded = dict(tree_flatten(state))
        if set(current) != set(loaded) or any(current[k].shape != loaded[k].shape for k in current):
            raise TrainingError(f"cannot resume from {path}: its optimizer state does not match this model and optimizer")
        self.optimizer.state = state
        # Re-initialising fills nothing (every key exists) but marks the optimizer ready.
        self.optimizer.init(self.model.trainable_parameters())

    # --- the compiled steps -------------------------------------------------------------------
    def _build_steps(self) -> None:
        model, optimizer, recipe = self.model, self.optimizer, self.recipe
        loss_and_grad = nn.value_and_grad(model, self.loss_fn)
        world, group, clip = self.world, self.group, recipe.optim.grad_clip
        state = [model.state, optimizer.state, mx.random.state]

        def average(tree):
            if world == 1:
                return tree
            return nn.average_gradients(tree, group=group)

        def apply(grads):
            grads = average(grads)
            if clip > 0:
                grads, norm = optim.clip_grad_norm(grads, clip)
            else:
                norm = mx.sqrt(sum(g.square().sum() for _, g in tree_flatten(grads)))
            optimizer.update(model, grads)
            return norm

        # Accumulation of 1: forward, backward and update in one compiled graph.
        @partial(mx.compile, inputs=state, outputs=state)
        def fused_step(x, y, *extras):
            loss, grads = loss_and_grad(model, x, y, *extras)
            return loss, apply(grads)

        # Accumulation > 1: gradients of each micro-batch (compiled), summed eagerly, then one update.
        # (model.state is an output too: value_and_grad swaps traced arrays into the model while
        # tracing, and listing it makes compile put the real ones back.)
        @partial(mx.compile, inputs=[model.state, mx.random.state], outputs=[model.state, mx.random.state])
        def micro_grads(x, y, *extras):
            return loss_and_grad(model, x, y, *extras)

        @partial(mx.compile, inputs=state, outputs=state)
        def apply_accumulated(grads, scale):
            return apply(tree_map(lambda g: g * scale, grads))

        self._fused_step, self._micro_grads, self._apply_accumulated = fused_step, micro_grads, apply_accumulated

    def train_step(self, micro_batches: list[tuple]) -> tuple[float, float]:
        """One optimizer step over this process's micro-batches; returns (mean loss, grad norm)."""
        seed = self.recipe.train.seed
        if len(micro_batches) == 1:
            mx.random.seed(_step_seed(seed, self.step, 0))
            loss, norm = self._fused_step(*micro_batches[0])
        else:
            acc, loss = None, mx.array(0.0)
            for i, batch in enumerate(micro_batches):
                mx.random.seed(_step_seed(seed, self.step, i))
                micro_loss, grads = self._micro_grads(*batch)
                acc = grads if acc is None else tree_map(mx.add, acc, grads)
                loss = loss + micro_loss
                mx.eval(acc, loss)  # bound memory: one micro-batch of activations at a time
            n = len(micro_batches)
            norm = self._apply_accumulated(acc, mx.array(1.0 / n))
            loss = loss / n
        if self.world > 1:
            loss = mx.distributed.all_sum(loss, group=self.group) / self.world
        mx.eval(loss, norm, self.model.parameters(), self.optimizer.state)
        return float(loss.item()), float(norm.item())

    # --- data ---------------------------------------------------------------------------------
    def _sampler_for_step(self):
        from nanogpt_mlx.training.dataset import RandomWindowSampler

        index, _, seq_len, batch = self.recipe.phase_at(self.step)
        if index != self.phase_index:
            self.phase_index = index
            self.seq_len, self.batch_size = seq_len, batch
            self.sampler = RandomWindowSampler(self.train_shards, batch * self.world, seq_len, seed=self.recipe.train.seed + index)
            if self.sampler_state is not None and self.sampler_state.get("phase") == index:
                saved = self.sampler_state["state"]
                if (saved.get("batch_size"), saved.get("seq_len")) != (batch * self.world, seq_len):
                    raise TrainingError(
                        f"cannot resume {self.resumed_from} exactly: its data position is for global batches of "
                        f"{saved.get('batch_size')} x {saved.get('seq_len')} tokens, this run draws {batch * self.world} x {seq_len} "
                        f"({self.world} process(es) x data.batch_size {batch}). Keep batch_size x processes and seq_len as they were."
                    )
                try:
                    self.sampler.load_state_dict(saved)
                except (ValueError, KeyError) as exc:
                    raise TrainingError(f"cannot restore the data position from {self.resumed_from}: {exc}") from exc
            self.sampler_state = None
        return self.sampler

    def _next_micro_batches(self) -> list[tuple]:
        sampler = self._sampler_for_step()
        out = []
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for _ in range(self.recipe.data.grad_accum):
            xg, yg = sampler.next_batch()
            x, y = xg[lo:hi], yg[lo:hi]
            extras = self.extras_fn(x, y) if self.extras_fn else ()
            out.append((mx.array(x), mx.array(y), *extras))
        return out

    # --- eval, checkpoints, logs --------------------------------------------------------------
    def evaluate(self):
        from nanogpt_mlx.training.dataset import sequential_batches

        if self.val_shards is None or not self.recipe.data.eval_batches:
            return None
        seq_len = self.recipe.phases()[-1][1]  # always the final (longest) context: comparable numbers
        # Global batches (batch_size x processes rows; the evaluator splits rows across processes).
        batches = sequential_batches(self.val_shards, self.recipe.phases()[-1][2] * self.world, seq_len)
        return self.evaluator(batches, max_batches=self.recipe.data.eval_batches)

    def _state(self, val_loss=None) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_seconds": self.elapsed_before + (time.perf_counter() - self._t_start),
            "best_val_loss": None if math.isinf(self.best_val) else self.best_val,
            "val_loss": val_loss,
            "world_size": self.world,
            "global_batch_rows": self.batch_size * self.world,
            "sampler": {"phase": self.phase_index, "state": self.sampler.state_dict()} if self.sampler else None,
            "rng": {"scheme": "mx.random.seed(seed * 1000003 + step * 1009 + micro) before each micro-batch",
                    "seed": self.recipe.train.seed},
            "data": str(self.data_dir),
            "recipe": self.recipe.to_dict(),
        }

    def save(self) -> Path:
        path = ckpt.save_training_checkpoint(self.run_dir, self.model, self.optimizer.state, self._state(), self.recipe.train.keep_last)
        self._last_save = time.perf_counter()
        return path

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / LOG_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        """On resume, drop log lines past the checkpoint (steps a crash made us redo)."""
        path = self.run_dir / LOG_FILE
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and _json_step(line) <= self.step]
        write_text(path, "".join(line + "\n" for line in kept))

    # --- the loop -----------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict:
        """Train to train.max_steps (or only to step `stop_at`, saving a checkpoint there)."""
        from tqdm import tqdm

        r = self.recipe.train
        self._t_start = time.perf_counter()
        self._last_save = self._t_start
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text(self.run_dir / RECIPE_FILE, self.recipe.to_json() + "\n")
            self._truncate_log()
        self._sampler_for_step()
        params = self.model.num_params()
        if self.is_main:
            print(
                f"training {params / 1e6:.2f}M parameters on {len(self.train_shards):,} tokens; "
                f"{self.world} process(es) x batch {self.batch_size} x {self.seq_len} x accum {self.recipe.data.grad_accum}; "
                f"steps {self.step} -> {r.max_steps}; out {self.run_dir}",
                file=sys.stderr,
            )
        previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm) if self.is_main and _main_thread() else None
        bar = tqdm(total=r.max_steps, initial=self.step, unit="step", desc="train", disable=not self.progress, dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0)
        window_tokens, window_start = 0, time.perf_counter()
        last = {}
        try:
            while self.step < r.max_steps:
                micro = self._next_micro_batches()
                loss, norm = self.train_step(micro)
                lr = current_lr(self.optimizer)
                step_tokens = self.batch_size * self.seq_len * self.recipe.data.grad_accum * self.world
                self.step += 1
                self.tokens_seen += step_tokens
                window_tokens += step_tokens
                if not math.isfinite(loss):
                    raise TrainingError(f"the loss became {loss} at step {self.step}: lower optim.lr or check the data")
                bar.update(1)

                if self.step % r.log_interval == 0 or self.step == r.max_steps:
                    now = time.perf_counter()
                    tok_s = window_tokens / max(now - window_start, 1e-9)
                    window_tokens, window_start = 0, now
                    last = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": self.tokens_seen,
                            "tok_per_s": round(tok_s, 1), "seq_len": self.seq_len,
                            "elapsed": round(self.elapsed_before + now - self._t_start, 1)}
                    self._log(last)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)

                val = None
                if r.eval_interval and (self.step % r.eval_interval == 0 or self.step == r.max_steps):
                    val = self._eval_and_keep_best()
                due_by_time = r.save_interval_minutes > 0 and time.perf_counter() - self._last_save >= 60 * r.save_interval_minutes
                due_by_steps = r.save_interval_steps > 0 and self.step % r.save_interval_steps == 0
                stopping = self._stop_requested or self.step == stop_at
                if self.is_main and (due_by_time or due_by_steps or self.step == r.max_steps or stopping):
                    self.save()
                if stopping:
                    if self.is_main and self._stop_requested:
                        print(f"\nstopped by SIGTERM at step {self.step}; checkpoint saved, resume with --resume", file=sys.stderr)
                    break
                if val is not None:
                    window_start = time.perf_counter()  # eval time is not training throughput
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
        if self.is_main:
            plot_losses(self.run_dir / LOG_FILE, self.run_dir / PLOT_FILE)
        return {**last, "best_val_loss": None if math.isinf(self.best_val) else self.best_val}

    def _eval_and_keep_best(self):
        result = self.evaluate()
        if result is None:
            return None
        record = {"step": self.step, "val_loss": result.loss, "val_ppl": result.perplexity, "tokens": self.tokens_seen,
                  "eval_tok_per_s": round(result.tok_per_s, 1)}
        improved = result.loss < self.best_val
        if improved:
            self.best_val = result.loss
        if self.is_main:
            self._log(record)
            if improved:
                ckpt.save_best(self.run_dir, self.model, self._state(val_loss=result.loss))
            plot_losses(self.run_dir / LOG_FILE, self.run_dir / PLOT_FILE)
            print(f"\nstep {self.step}: val loss {result.loss:.4f}, perplexity {result.perplexity:,.2f}" + (" (best)" if improved else ""),
                  file=sys.stderr)
        return result

    def _on_sigterm(self, signum, frame):
        self._stop_requested = True


def _step_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro) % (2**63)


def _json_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # unreadable (torn) line: drop it


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _with_dropout(model: GPT, config) -> GPT:
    fresh = GPT(config)
    fresh.update(model.parameters())
    return fresh


def plot_losses(log_path: Path, png_path: Path) -> None:
    """Train loss (raw and smoothed) and val loss against tokens seen, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log_path.is_file():
        return
    train, val = [], []
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            train.append((rec["tokens"], rec["loss"]))
        if "val_loss" in rec:
            val.append((rec["tokens"], rec["val_loss"]))
    if not train and not val:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        t, l = np.array(train).T
        ax.plot(t, l, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per log interval)")
        if len(l) > 5:
            span = max(len(l) // 50, 2)
            ema = np.copy(l)
            for i in range(1, len(l)):
                ema[i] = ema[i - 1] + (l[i] - ema[i - 1]) / span
            ax.plot(t, ema, color="tab:blue", linewidth=1.5, label="train (smoothed)")
    if val:
        t, l = np.array(val).T
        ax.plot(t, l, "o-", color="tab:orange", markersize=3, label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(png_path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
