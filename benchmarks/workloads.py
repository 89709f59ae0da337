"""The timed work of the suite, each run in a fresh subprocess: ours, mlx-lm in process, and the machine's limits.

    python -m nanogpt_mlx.benchmarks.workloads NAME '{"model_dir": ..., ...}'    # prints one JSON line

A fresh process per workload keeps each measurement clean: compiled graphs, the memory glibc
keeps after a training step, and a peer's threads never spill into the next figure. Every
workload returns raw seconds per timed run (after warm-up); the suite summarizes them.
Importing this module prepares nanogpt-mlx's CPU runtime first, so mlx-lm measured here runs on
the same BLAS, FTZ/DAZ and malloc settings as ours (without them MLX's reference BLAS would
decide the comparison). transformers + torch run in `peer_torch.py`, a plain process.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx  # the package nanogpt_mlx (this module's parent) has prepared the runtime already
import numpy as np

from nanogpt_mlx.benchmarks.internals import select_device
from nanogpt_mlx.benchmarks.timing import timed

VOCAB_DRAW = 50257  # random token ids are drawn below the GPT-2 vocabulary


def _tokens(rng: np.random.Generator, shape, vocab: int) -> np.ndarray:
    return rng.integers(0, min(vocab, VOCAB_DRAW), shape).astype(np.int32)


def _prompt(p: dict, vocab: int) -> list[int]:
    """The generation prompt: the same `prompt_tokens` random ids for every implementation."""
    return _tokens(np.random.default_rng(1234), p["prompt_tokens"], vocab).tolist()


# --- ours ------------------------------------------------------------------------------------
def ours_inference(p: dict) -> dict:
    """The card's inference figures: forward B x T (full logits), generation, 1 x N prefill."""
    from nanogpt_mlx.model.checkpoint import load_model
    from nanogpt_mlx.model.runner import ModelRunner

    device = select_device(p["device"])
    model = load_model(p["model_dir"])  # inference mode: dropout off
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    out = {"device": device, "params": model.num_params()}

    batch = mx.array(_tokens(rng, (p["forward_batch"], p["forward_seq"]), vocab))
    out["forward_s"] = timed(lambda: mx.eval(model(batch)), p["runs"], p["warmup"])

    out["generation_s"] = _generation_seconds(model, p)

    runner = ModelRunner(model, max_rows=1)  # what the server's engine prefills a prompt with
    prefill_tokens = _tokens(rng, p["prefill_tokens"], vocab)
    out["prefill_s"] = timed(lambda: runner.prefill(0, prefill_tokens, 0), p["runs"], p["warmup"])
    runner.close()
    return out


def _generation_seconds(model, p: dict) -> list[float]:
    """Seconds of each timed batch-1 generation: `prompt_tokens` prompt, `gen_tokens` greedy tokens
    (what `nanogpt-mlx generate` runs: `generate_tokens`)."""
    from nanogpt_mlx.model.generate import generate_tokens
    from nanogpt_mlx.model.sampling import SamplingParams

    prompt = _prompt(p, model.config.vocab_size)
    greedy = SamplingParams(temperature=0.0)

    def generate() -> None:
        produced = sum(1 for _ in generate_tokens(model, prompt, p["gen_tokens"], greedy))
        if produced != p["gen_tokens"]:
            raise RuntimeError(f"generation stopped after {produced} of {p['gen_tokens']} tokens")

    return timed(generate, p["runs"], p["warmup"])


def ours_generation(p: dict) -> dict:
    """The batch-1 generation figure alone (generate_vs_llama.py)."""
    from nanogpt_mlx.model.checkpoint import load_model

    device = select_device(p["device"])
    return {"device": device, "generation_s": _generation_seconds(load_model(p["model_dir"]), p)}


def ours_training(p: dict) -> dict:
    """Training tok/s (the real compiled trainer step), evaluation tok/s, and the size on disk."""
    from nanogpt_mlx.benchmarks.train_speed import measure
    from nanogpt_mlx.model.checkpoint import load_config, load_model, save_checkpoint
    from nanogpt_mlx.training.evaluate import Evaluator

    device = select_device(p["device"])
    out: dict = {"device": device}
    config = load_config(p["model_dir"])
    if p.get("train_steps"):
        train = measure(p["train_batch"], p["train_seq"], steps=p["train_steps"], warmup=p["warmup"], config=config)
        out["train_s"] = train["step_s_all"]
        out["train_peak_memory_gb"] = train["peak_memory_gb"]
        mx.clear_cache()
    model = load_model(p["model_dir"])
    if p.get("eval_runs"):
        evaluator = Evaluator(model)
        rng = np.random.default_rng(2)
        x = _tokens(rng, (p["eval_batch"], p["eval_seq"]), config.vocab_size)
        y = _tokens(rng, (p["eval_batch"], p["eval_seq"]), config.vocab_size)
        out["eval_s"] = timed(lambda: evaluator([(x, y)]), p["eval_runs"], p["warmup"])
    with tempfile.TemporaryDirectory(prefix="bench-size-") as tmp:
        for dtype in ("float32", "float16"):
            path = save_checkpoint(model, Path(tmp) / dtype, dtype=dtype)
            out[f"size_{dtype}_bytes"] = (path / "model.safetensors").stat().st_size
    out["params"] = model.num_params()
    return out


def ours_engine(p: dict) -> dict:
    """`ModelRunner`, the engine's model interface: batched decode steps, a prompt's prefill, a batch of prompts."""
    from nanogpt_mlx.model.checkpoint import load_model
    from nanogpt_mlx.model.runner import ModelRunner, PrefillChunk

    device = select_device(p["device"])
    model = load_model(p["model_dir"])
    vocab = model.config.vocab_size
    rng = np.random.default_rng(3)
    rows_needed = max([*p["decode_rows"], p["batched_prefill_rows"]])
    runner = ModelRunner(model, max_rows=rows_needed)
    out: dict = {"device": device, "decode_s": {}}
    for rows in p["decode_rows"]:
        tokens = _tokens(rng, rows, vocab)
        positions = np.full(rows, p["decode_position"], dtype=np.int32)
        out["decode_s"][str(rows)] = timed(lambda: runner.decode(tokens, positions), p["decode_steps"], p["warmup"])  # noqa: B023
    prompt = _tokens(rng, p["prefill_tokens"], vocab)
    out["prefill_s"] = timed(lambda: runner.prefill(0, prompt, 0), p["runs"], p["warmup"])
    chunks = [PrefillChunk(row=r, tokens=_tokens(rng, p["batched_prefill_tokens"], vocab)) for r in range(p["batched_prefill_rows"])]
    out["batched_prefill_s"] = timed(lambda: runner.prefill_many(chunks), p["runs"], p["warmup"])
    runner.close()
    return out


def ours_greedy(p: dict) -> dict:
    """Our greedy continuations of the check prompts (token ids and text), the reference peers are held to."""
    from nanogpt_mlx.model.checkpoint import load_model
    from nanogpt_mlx.model.generate import generate_tokens
    from nanogpt_mlx.model.sampling import SamplingParams
    from nanogpt_mlx.model.tokenizer import get_tokenizer

    select_device(p["device"])
    model = load_model(p["model_dir"])
    tok = get_tokenizer(p["model_dir"])
    results = []
    for text in p["prompts"]:
        ids = list(generate_tokens(model, tok.encode(text), p["greedy_tokens"], SamplingParams(temperature=0.0)))
        results.append({"prompt": text, "tokens": ids, "pieces": [tok.decode([t]) for t in ids]})
    return {"continuations": results}


# --- mlx-lm, in process ----------------------------------------------------------------------
def mlx_lm_inference(p: dict) -> dict:
    """mlx-lm's GPT-2 on the same HF directory: forward, generation (its `generate_step`, greedy), prefill."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    device = select_device(p["device"])
    model, _ = load(p["model_dir"])
    vocab = p["vocab_size"]
    rng = np.random.default_rng(0)
    out = {"device": device}

    batch = mx.array(_tokens(rng, (p["forward_batch"], p["forward_seq"]), vocab))
    out["forward_s"] = timed(lambda: mx.eval(model(batch)), p["runs"], p["warmup"])

    prompt = mx.array(_prompt(p, vocab))

    def generate() -> None:
        steps = generate_step(prompt, model, max_tokens=p["gen_tokens"])  # default sampler: argmax
        produced = sum(1 for _ in steps)
        if produced != p["gen_tokens"]:
            raise RuntimeError(f"mlx-lm generated {produced} of {p['gen_tokens']} tokens")

    out["generation_s"] = timed(generate, p["runs"], p["warmup"])

    prefill_tokens = mx.array(_tokens(rng, (1, p["prefill_tokens"]), vocab))

    def prefill() -> None:
        cache = make_prompt_cache(model)
        mx.eval(model(prefill_tokens, cache=cache)[:, -1, :])

    out["prefill_s"] = timed(prefill, p["runs"], p["warmup"])
    return out


def mlx_lm_greedy(p: dict) -> dict:
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    select_device(p["device"])
    model, tokenizer = load(p["model_dir"])
    results = []
    for text in p["prompts"]:
        ids = [int(t) for t, _ in generate_step(mx.array(tokenizer.encode(text)), model, max_tokens=p["greedy_tokens"])]
        results.append({"prompt": text, "tokens": ids, "text": tokenizer.decode(ids)})
    return {"continuations": results}


# --- the weights every implementation loads ----------------------------------------------
def save_random(p: dict) -> dict:
    """Random weights of the given shape (seeded), saved once as a HF GPT-2 directory in fp32."""
    from nanogpt_mlx.model.checkpoint import save_checkpoint
    from nanogpt_mlx.model.config import ModelConfig
    from nanogpt_mlx.model.gpt import GPT

    model = GPT(ModelConfig(**p["config"]))
    model.init_weights(seed=p["seed"])
    return {"model_dir": str(save_checkpoint(model, p["out_dir"], dtype="float32")), "params": model.num_params()}


def mlx_lm_variant(p: dict) -> dict:
    """The HF directory as mlx-lm's GPT-2 loads it: names without `transformer.`, fp32, and no
    separate LM head (its GPT-2 ties the head to the embedding: same shape and cost, other values)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from nanogpt_mlx.atomic import atomic_dir

    src = Path(p["model_dir"])
    weights = load_file(str(src / "model.safetensors"))
    converted = {k.removeprefix("transformer."): v.astype(np.float32) for k, v in weights.items() if k != "lm_head.weight"}
    config = json.loads((src / "config.json").read_text())
    config.update(tie_word_embeddings=True, torch_dtype="float32")
    with atomic_dir(p["out_dir"]) as tmp:
        save_file(converted, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in ("vocab.json", "merges.txt", "generation_config.json"):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    return {"model_dir": p["out_dir"], "untied_head_dropped": "lm_head.weight" in weights}


# --- the machine's limits --------------------------------------------------------------------
def _product_times(m: int, k: int, n: int, runs: int, host: bool) -> dict[str, list[float]]:
    """Seconds of an (m, k) @ (k, n) fp32 product in MLX and, with `host`, in NumPy (its own BLAS)."""
    a = mx.random.normal((m, k))
    b = mx.random.normal((k, n))
    mx.eval(a, b)
    times = {"mlx": timed(lambda: mx.eval(a @ b), runs, 2)}
    if host:
        a_host, b_host = np.asarray(a), np.asarray(b)
        times["numpy"] = timed(lambda: a_host @ b_host, runs, 2)
    return times


def limits(p: dict) -> dict:
    """Memory read bandwidth (a matrix-vector product that streams a large matrix, as a decode step
    streams the weights) and fp32 GEMM peak (large square products), best of several runs, through
    MLX's matmul and (on the CPU) NumPy's: the process's two BLAS libraries."""
    device = select_device(p["device"])
    n = p["bandwidth_n"]
    host = device == "cpu"
    gemv = _product_times(1, n, n, p["limit_runs"], host)
    out = {"device": device, "bandwidth_bytes": 4 * n * n, "gemv_s": gemv, "gemm_s": {}}
    for size in p["gemm_sizes"]:
        out["gemm_s"][str(size)] = _product_times(size, size, size, p["limit_runs"], host)
    return out


WORKLOADS = {
    "ours_inference": ours_inference,
    "ours_generation": ours_generation,
    "ours_training": ours_training,
    "ours_engine": ours_engine,
    "ours_greedy": ours_greedy,
    "mlx_lm_inference": mlx_lm_inference,
    "mlx_lm_greedy": mlx_lm_greedy,
    "limits": limits,
    "save_random": save_random,
    "mlx_lm_variant": mlx_lm_variant,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name, params = argv[0], json.loads(argv[1])
    result = WORKLOADS[name](params)
    sys.stdout.flush()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
