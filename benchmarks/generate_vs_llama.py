"""Batch-1 generation, ours against llama.cpp on the same weights: the card's 50-token prompt and
100 greedy tokens, prefill included.

    python -m nanogpt_mlx.benchmarks.generate_vs_llama --weights random --rounds 3
    nanogpt-mlx bench generate --weights checkpoint --rounds 3

Ours: `generate_tokens` (what `nanogpt-mlx generate` runs) in a fresh process per round
(workloads.py's `ours_generation`). llama.cpp: `llama-server` with one slot, measured by its own
clock (the `timings` it returns: prompt_ms + predicted_ms, as llama-bench counts prompt and
generation), so no HTTP or client time is charged to it; its prompt cache is off, so every run
prefills the whole prompt as ours does. The rounds alternate (ours, llama.cpp, then llama.cpp,
ours) and each round gives the ratio ours / llama.cpp of the median tok/s (gen_tokens divided by
the whole time). Weights: the suite's random card-shaped ones, or the bundled checkpoint, each as
the same F32 GGUF the suite gives llama-server (built on first use into the suite's cache).
Writes `benchmarks/results/<machine-id>/generate_vs_llama-<weights>.json` (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
from pathlib import Path

import httpx

from nanogpt_mlx.benchmarks import servers as srv
from nanogpt_mlx.benchmarks.machine import describe_machine, load_average, machine_id
from nanogpt_mlx.benchmarks.suite import (
    CARD_MODEL,
    RESULTS_ROOT,
    checkpoint_cache,
    default_checkpoint,
    ensure_gguf,
    random_weights,
    run_worker,
)
from nanogpt_mlx.benchmarks.workloads import _prompt


def llama_generation_seconds(base_url: str, prompt: list[int], tokens: int, runs: int, warmup: int) -> list[float]:
    """llama.cpp's own time for each run: prompt processing + generation, greedy, no prompt cache."""
    body = {"prompt": prompt, "n_predict": tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": True, "cache_prompt": False}
    seconds = []
    for i in range(warmup + runs):
        r = httpx.post(base_url + "/completion", json=body, timeout=600)
        r.raise_for_status()
        reply = r.json()
        timings = reply["timings"]
        if timings["predicted_n"] != tokens or timings["prompt_n"] != len(prompt):
            raise RuntimeError(f"llama-server prefilled {timings['prompt_n']} / generated {timings['predicted_n']} tokens")
        if i >= warmup:
            seconds.append((timings["prompt_ms"] + timings["predicted_ms"]) / 1e3)
    return seconds


def weights_dirs(weights: str, cache: Path) -> tuple[Path, Path]:
    """The HF checkpoint directory and its cache folder (where its GGUF goes), as the suite's."""
    if weights == "checkpoint":
        checkpoint = default_checkpoint()
        return checkpoint, checkpoint_cache(cache, checkpoint)
    return random_weights(cache, CARD_MODEL)


def run(args) -> dict:
    from nanogpt_mlx.benchmarks.llama_cpp import binary_version, find_llama_server

    binary, how = find_llama_server()
    if binary is None:
        raise SystemExit(f"no llama-server: {how}")
    model_dir, base = weights_dirs(args.weights, Path(args.cache))
    gguf = ensure_gguf(model_dir, base / "gguf-f32")
    params = {"model_dir": str(model_dir), "device": "cpu", "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens,
              "runs": args.runs, "warmup": args.warmup}
    prompt = _prompt(params, CARD_MODEL["vocab_size"])
    result: dict = {
        "benchmark": "generate_vs_llama",
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "load_average_before": load_average(),
        "weights": args.weights,
        "model_dir": str(model_dir),
        "gguf": str(gguf),
        "llama_server": {"binary": str(binary), "how": how, "version": binary_version(binary)},
        "args": vars(args),
        "rounds": [],
    }
    spec = srv.llama_server(binary, gguf, 1, CARD_MODEL["block_size"], "cpu")
    with tempfile.TemporaryDirectory(prefix="generate-vs-llama-") as logs:
        for r in range(args.rounds):
            order = ("ours", "llama") if r % 2 == 0 else ("llama", "ours")
            seconds = {}
            for who in order:
                if who == "ours":
                    seconds["ours"] = run_worker("ours_generation", params)["generation_s"]
                else:
                    with srv.running(spec, Path(logs)) as server:  # a fresh process per round, as ours
                        seconds["llama"] = llama_generation_seconds(server.base_url, prompt, args.gen_tokens, args.runs, args.warmup)
            tok_s = {who: args.gen_tokens / statistics.median(s) for who, s in seconds.items()}
            entry = {"ours_tok_s": tok_s["ours"], "llama_tok_s": tok_s["llama"], "ratio": tok_s["ours"] / tok_s["llama"],
                     "seconds": seconds}
            result["rounds"].append(entry)
            print(f"round {r + 1}: ours {tok_s['ours']:.1f} tok/s, llama.cpp {tok_s['llama']:.1f} tok/s, "
                  f"ratio {entry['ratio']:.2f}", flush=True)
    result["load_average_after"] = load_average()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", choices=("random", "checkpoint"), default="random")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=20, help="timed generations per round and side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=50)
    p.add_argument("--gen-tokens", type=int, default=100)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "nanogpt-mlx" / "bench"))
    p.add_argument("--out", help="the JSON results (default: benchmarks/results/<machine-id>/generate_vs_llama-<weights>.json)")
    args = p.parse_args(argv)
    result = run(args)
    out = Path(args.out) if args.out else RESULTS_ROOT / machine_id() / f"generate_vs_llama-{args.weights}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)  # whole or not at all
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
