"""`nanogpt-mlx train | eval | distill` (and `publish`, from training/publish.py).

Recipes are TOML files (`training/configs/card.toml` is the card's recipe and the default);
any key can be overridden with `--set section.key=value`, and the common ones have flags.
Data parallel: launch the same command under `mlx.launch` (see training/README.md).
"""

from __future__ import annotations

import argparse
import json


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model from a recipe (default: the card's)",
        description="Train with AdamW, warm-up + cosine, a compiled step and resumable checkpoints. "
        "Data: a directory made by `nanogpt-mlx prepare-data`. Under `mlx.launch` it trains data-parallel.",
    )
    _add_recipe_args(p)
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser(
        "distill",
        help="train a student against a teacher: a checkpoint, a server's logprobs, or a server's text",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Knowledge distillation: loss = alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T).

Three kinds of teacher (training/README.md, "Distillation"):
  local checkpoint     --teacher DIR: its full logits in-process, KL over the whole vocabulary
  server, logits       --teacher URL: /v1/completions with echo + top-k logprobs (same tokenizer);
                       reads max_model_len from /v1/models, adapts to the server's logprobs limit,
                       checks the echoed tokens, retries 429/5xx/timeouts, caches every answer
  server, sequence     --teacher URL --mode sequence: the teacher's continuations of prompts
                       (/v1/completions or /v1/chat/completions) as text, mixed with the corpus;
                       any tokenizer, no logprobs needed (llama.cpp's server, hosted chat APIs)

Every option is also a recipe key (section [distill], or --set distill.KEY=VALUE).""",
        epilog="""examples:
  nanogpt-mlx distill --data SHARDS --out RUN --teacher checkpoints/default
  nanogpt-mlx distill --data SHARDS --out RUN --teacher http://127.0.0.1:8000 --top-k 20
  OPENAI_API_KEY=... nanogpt-mlx distill --data SHARDS --out RUN --teacher https://host/v1 \\
      --teacher-model NAME --mode sequence --endpoint chat --num-prompts 1100 --mix-ratio 0.3""",
    )
    _add_recipe_args(p)
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", help="checkpoint directory or http(s):// base URL (distill.teacher)")
    g.add_argument("--teacher-model", help="model name sent to an HTTP teacher (distill.teacher_model; default: the first it lists)")
    g.add_argument("--mode", choices=["logits", "sequence"], help="logits: learn the teacher's distributions; sequence: "
                   "learn its text (distill.mode, default logits)")
    g.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the teacher's API key, sent as "
                   "Bearer (distill.api_key_env, default OPENAI_API_KEY)")
    g.add_argument("--concurrency", type=int, help="requests in flight to an HTTP teacher (distill.concurrency, default 4)")
    g.add_argument("--timeout", type=float, help="seconds to wait for one answer (distill.timeout, default 120)")
    g.add_argument("--max-retries", type=int, help="retries of one request on 429 / 5xx / timeouts / dropped connections, "
                   "with backoff honouring Retry-After (distill.max_retries, default 8)")
    g.add_argument("--cache-dir", metavar="DIR", help="where teacher answers are cached (distill.cache_dir, default RUN/teacher_cache)")
    g = p.add_argument_group("logit distillation")
    g.add_argument("--alpha", type=float, help="weight of the hard-label CE (distill.alpha, default 0.7)")
    g.add_argument("--temperature", type=float, help="softening temperature T (distill.temperature, default 2)")
    g.add_argument("--top-k", type=int, help="logprobs asked of an HTTP teacher per position; fewer if the server allows "
                   "fewer (distill.top_k, default 20)")
    g.add_argument("--sparse-kl", choices=["bucket", "renorm"], help="KL from top-k logprobs: bucket = the k tokens plus "
                   "one outcome for the rest, renorm = the k renormalised (distill.sparse_kl, default renorm)")
    g.add_argument("--teacher-max-len", type=int, help="the HTTP teacher's context in tokens (distill.teacher_max_len; "
                   "default: max_model_len from its /v1/models)")
    g.add_argument("--prefetch", action="store_true", default=None, help="ask the teacher for every window of the run "
                   "before the first step (distill.prefetch)")
    g = p.add_argument_group("sequence-level distillation")
    g.add_argument("--prompts", metavar="FILE", help="prompts: one per line, or JSONL with 'prompt'/'text' "
                   "(distill.prompts; default: sampled from the --data train split)")
    g.add_argument("--num-prompts", type=int, help="prompts sampled from the corpus (distill.num_prompts, default 1100)")
    g.add_argument("--prompt-tokens", type=int, help="length of sampled prompts (distill.prompt_tokens, default 32)")
    g.add_argument("--max-new-tokens", type=int, help="tokens per continuation (distill.max_new_tokens, default 256)")
    g.add_argument("--gen-temperature", type=float, help="the teacher's sampling temperature (distill.gen_temperature, default 0.8)")
    g.add_argument("--endpoint", choices=["completions", "chat"], help="/v1/completions or /v1/chat/completions "
                   "(distill.endpoint, default completions)")
    g.add_argument("--mix-ratio", type=float, help="share of training windows drawn from teacher text, the rest from "
                   "--data (distill.mix_ratio, default 0.5)")
    p.set_defaults(func=_cmd_distill)

    p = subparsers.add_parser(
        "eval",
        help="held-out loss, perplexity and tok/s of a checkpoint",
        description="Score a checkpoint on a split of prepared token shards (non-overlapping windows, in order).",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (HF GPT-2 layout)")
    p.add_argument("--data", required=True, metavar="SHARDS", help="directory made by `nanogpt-mlx prepare-data`")
    p.add_argument("--split", default="val", help="split to score (default val)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="window length (default: the model's context)")
    p.add_argument("--max-batches", type=int, help="score at most this many batches")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)

    from nanogpt_mlx.training import publish

    publish.register_cli(subparsers)


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="card", help="recipe TOML file or bundled name: card, default-offline (default card)")
    p.add_argument("--data", metavar="SHARDS", help="token shards directory (data.train)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory: checkpoints, best/, log.jsonl, loss.png")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (start fresh if there is none)")
    p.add_argument("--init-from", metavar="DIR", help="start from this checkpoint's weights (fresh optimizer)")
    p.add_argument("--max-steps", type=int, help="train.max_steps")
    p.add_argument("--batch-size", type=int, help="data.batch_size (rows per micro-batch per process)")
    p.add_argument("--seq-len", type=int, help="data.seq_len")
    p.add_argument("--grad-accum", type=int, help="data.grad_accum")
    p.add_argument("--lr", type=float, help="optim.lr (peak)")
    p.add_argument("--warmup-steps", type=int, help="optim.warmup_steps")
    p.add_argument("--eval-interval", type=int, help="train.eval_interval (0 disables)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override any recipe key (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")


_FLAG_KEYS = {
    "data": "data.train",
    "max_steps": "train.max_steps",
    "batch_size": "data.batch_size",
    "seq_len": "data.seq_len",
    "grad_accum": "data.grad_accum",
    "lr": "optim.lr",
    "warmup_steps": "optim.warmup_steps",
    "eval_interval": "train.eval_interval",
    "seed": "train.seed",
    "teacher": "distill.teacher",
    "teacher_model": "distill.teacher_model",
    "alpha": "distill.alpha",
    "temperature": "distill.temperature",
    "top_k": "distill.top_k",
    "mode": "distill.mode",
    "api_key_env": "distill.api_key_env",
    "concurrency": "distill.concurrency",
    "timeout": "distill.timeout",
    "max_retries": "distill.max_retries",
    "cache_dir": "distill.cache_dir",
    "sparse_kl": "distill.sparse_kl",
    "teacher_max_len": "distill.teacher_max_len",
    "prefetch": "distill.prefetch",
    "prompts": "distill.prompts",
    "num_prompts": "distill.num_prompts",
    "prompt_tokens": "distill.prompt_tokens",
    "max_new_tokens": "distill.max_new_tokens",
    "gen_temperature": "distill.gen_temperature",
    "endpoint": "distill.endpoint",
    "mix_ratio": "distill.mix_ratio",
}


def build_recipe(args: argparse.Namespace):
    from nanogpt_mlx.training.recipe import Recipe

    recipe = Recipe.load(args.config)
    sets = list(args.set)
    for attr, key in _FLAG_KEYS.items():
        value = getattr(args, attr, None)
        if value is not None:
            sets.append(f"{key}={json.dumps(value)}")
    return recipe.override(sets)


def _cmd_train(args: argparse.Namespace) -> int:
    from nanogpt_mlx.training.train import Trainer

    recipe = build_recipe(args)
    trainer = Trainer(recipe, recipe.data.train, args.out, resume=args.resume, init_from=args.init_from, progress=not args.no_progress)
    summary = trainer.fit()
    if trainer.is_main:
        print(json.dumps(summary))
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from nanogpt_mlx.training.distill import run_distill

    recipe = build_recipe(args)
    summary = run_distill(recipe, args.out, resume=args.resume, init_from=args.init_from, progress=not args.no_progress)
    if summary is not None:
        print(json.dumps(summary))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from nanogpt_mlx.training.evaluate import run_eval
    from nanogpt_mlx.training.recipe import TrainingError

    if args.batch_size < 1 or (args.max_batches is not None and args.max_batches < 1):
        raise TrainingError("--batch-size and --max-batches must be >= 1")
    result = run_eval(args.model, args.data, split=args.split, batch_size=args.batch_size, seq_len=args.seq_len,
                      max_batches=args.max_batches, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"{args.split}: loss {result.loss:.4f} nats/token, perplexity {result.perplexity:,.2f}, "
              f"{result.tokens:,} tokens in {result.seconds:.1f} s ({result.tok_per_s:,.0f} tok/s)")
    return 0
