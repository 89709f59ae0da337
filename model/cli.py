"""Subcommands that only need the model: `info`, `generate`, `convert`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "default"


def resolve_model_dir(model: str | None) -> Path:
    """`--model`, else $NANOGPT_MLX_MODEL, else the bundled default checkpoint.

    The bundled checkpoint lives in the source tree (checkpoints/default, ~101 MB), so it is
    found by editable installs (`pip install -e .`, the README's way); a wheel install points
    NANOGPT_MLX_MODEL (or --model) at a checkpoint directory instead.
    """
    from nanogpt_mlx.cli import UserError

    model = model or os.environ.get("NANOGPT_MLX_MODEL")
    if model:
        return Path(model)
    if (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        return DEFAULT_CHECKPOINT
    raise UserError(
        "no --model given and the bundled default checkpoint is not here "
        f"({DEFAULT_CHECKPOINT}). Pass --model DIR (or set NANOGPT_MLX_MODEL) with a HF GPT-2 directory, e.g. one written by "
        "`nanogpt-mlx train` or `nanogpt-mlx convert --from-npz checkpoint_N.npz --out DIR`."
    )


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=["auto", "cpu", "gpu"], default="auto", help="where MLX runs (default: GPU if Metal/CUDA is available)"
    )


def select_device(name: str) -> str:
    """`device.select_device`, with an unavailable `--device gpu` reported as a user error."""
    from nanogpt_mlx.cli import UserError
    from nanogpt_mlx.model import device

    try:
        return device.select_device(name)
    except (RuntimeError, ValueError) as exc:
        raise UserError(str(exc)) from exc


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("info", help="version, device, BLAS and a measured fp32 GFLOP/s")
    add_device_flag(p)
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("generate", help="stream a continuation of a prompt to stdout")
    p.add_argument("--model", help="checkpoint directory (default: the bundled checkpoint)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr at the end")
    add_device_flag(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("convert", help="import an original nanoGPT-MLX .npz checkpoint, or re-save a checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-npz", help="checkpoint_N.npz of the original project (its _meta.json or config.json beside it)")
    src.add_argument("--from-dir", help="an existing HF GPT-2 checkpoint directory (e.g. to change dtype)")
    p.add_argument("--out", required=True, help="output directory (HF GPT-2 format)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.set_defaults(func=cmd_convert)


def cmd_info(args) -> int:
    import platform

    import mlx.core as mx

    from nanogpt_mlx import __version__
    from nanogpt_mlx.model import ops
    from nanogpt_mlx.model.cpu import blas, runtime
    from nanogpt_mlx.model.device import measure_gflops

    device = select_device(args.device)
    ops.current()  # what a process computing here would use (on the CPU: prepares it for compute)
    report = runtime.REPORT
    python = f"python {platform.python_version()}   {platform.machine()} {platform.system()}"
    print(f"nanogpt-mlx {__version__}   mlx {mx.__version__}   {python}")
    print(f"device: {device}")
    print(f"blas: {report.blas_name}" + (f" ({report.blas_path})" if report.blas_path else ""))
    if report.blas_one_row_path:
        print(f"blas for 1-row products: mkl ({report.blas_one_row_path})")
    threads = blas.threads()
    print(f"blas threads: {threads if threads is not None else 'unknown'}")
    tuning = [
        f"ftz/daz={'on' if report.ftz_daz else 'off'}",
        f"malloc={'tuned' if report.malloc_tuned else 'default'}",
        f"jit -march=native={'on' if report.jit_march_native else 'off'}",
        f"numpy blas threads={'sleep when idle' if report.numpy_blas_quiet else 'default'}",
    ]
    print("cpu tuning: " + "  ".join(tuning))
    for note in report.notes:
        print(f"note: {note}")
    print(f"fp32 matmul 1024^3: {measure_gflops():.1f} GFLOP/s")
    return 0


def cmd_generate(args) -> int:
    from nanogpt_mlx.cli import UserError
    from nanogpt_mlx.model.checkpoint import load_model
    from nanogpt_mlx.model.generate import generate_tokens
    from nanogpt_mlx.model.sampling import SamplingParams
    from nanogpt_mlx.model.tokenizer import EOT_ID, StreamingDetokenizer, get_tokenizer

    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")
    select_device(args.device)
    model_dir = resolve_model_dir(args.model)
    model = load_model(model_dir)
    tokenizer = get_tokenizer(model_dir)
    prompt = tokenizer.encode(args.prompt, allowed_special={"<|endoftext|>"}) or [EOT_ID]
    budget = model.config.block_size - len(prompt)
    if budget < 1:
        raise UserError(f"the prompt is {len(prompt)} tokens; the context is {model.config.block_size}")
    max_tokens = min(args.max_tokens, budget)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    detok = StreamingDetokenizer(tokenizer)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    start = time.perf_counter()
    n = 0
    for token in generate_tokens(model, prompt, max_tokens, params, stop_tokens=frozenset({EOT_ID})):
        n += 1
        if token == EOT_ID:
            break
        out.write(detok.add(token))
        out.flush()
    out.write(detok.finalize() + "\n")
    out.flush()
    if args.stats:
        elapsed = time.perf_counter() - start
        print(f"{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tok/s (prompt {len(prompt)} tokens)", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from nanogpt_mlx.model.checkpoint import import_npz, load_model, save_checkpoint

    if args.from_npz:
        out = import_npz(args.from_npz, args.out, dtype=args.dtype)
    else:
        out = save_checkpoint(load_model(args.from_dir), args.out, dtype=args.dtype)
    print(f"wrote {out}")
    return 0
