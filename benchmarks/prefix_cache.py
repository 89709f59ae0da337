"""Prefix caching on vs off: TTFT and throughput of `nanogpt-mlx serve` on three workloads, side by side.

Starts two servers on the same checkpoint (servers.py), one with the prefix cache (the default)
and one with `--no-prefix-cache`; only one is under load at a time. Each workload runs on both,
in alternating order round by round (on first in odd rounds), with fresh random content every
round, so neither server has seen its prompts before:

    lmeval  lm-eval-like multiple choice: per document a 300-token context (fresh random token
            ids) and 4 requests = context + a 6-12-token choice, each as lm-eval's
            `local-completions` sends a loglikelihood request (echo, logprobs 1, max_tokens 1);
            the documents' requests in order through a closed loop of --concurrency clients
            (lm-eval sends its batch at once)
    fewshot the same shape with generation instead (a few-shot generate_until task): 4 generated
            tokens per request
    chat    multi-turn chat: --sessions concurrent conversations of --turns turns; each turn's
            prompt is the whole conversation so far (a ~120-token system prompt, every earlier
            user message and reply) plus a new ~30-token user message; 32 generated tokens
    unique  unique prompts (no shared prefix beyond chance): 200 random token ids, 32 generated
            tokens, --concurrency clients (the regression check)

Streaming requests with `ignore_eos` (serve_load.one_request), so every completion has its full
length. Per workload and server: TTFT p50 / p95 (send -> first token), requests/s and output
tok/s over the workload's wall time, and the prefix-cache hit rate from the server's own
Prometheus counters (hits / queries, in tokens). Writes a JSON results file.

    nanogpt-mlx bench prefix-cache --model checkpoints/default --out prefix_cache.json
    python -m nanogpt_mlx.benchmarks.prefix_cache --rounds 3 --workloads lmeval chat
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from nanogpt_mlx.atomic import write_json
from nanogpt_mlx.benchmarks.machine import machine_id
from nanogpt_mlx.benchmarks.serve_load import PASSAGE, one_request
from nanogpt_mlx.benchmarks.servers import ours, running
from nanogpt_mlx.benchmarks.stats import percentile

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = sorted(set(PASSAGE.replace(",", "").replace(".", "").lower().split()))


def _ids(rng: np.random.Generator, n: int) -> list[int]:
    return [int(t) for t in rng.integers(100, 50000, size=n)]


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n)) + f" {int(rng.integers(1_000_000))}"


async def _closed_loop(base_url: str, requests: list[tuple], concurrency: int, extra: dict | None = None) -> list[dict]:
    """`concurrency` clients taking (prompt, max_tokens) from the list in order; `extra`: more request fields."""
    queue: asyncio.Queue = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                prompt, max_tokens = queue.get_nowait()
                results.append(await one_request(client, prompt, max_tokens, 0.0, extra))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _documents(rng: np.random.Generator, args, max_tokens: int) -> list[tuple]:
    requests = []
    for _ in range(args.documents):
        context = _ids(rng, 300)
        requests += [(context + _ids(rng, int(rng.integers(6, 13))), max_tokens) for _ in range(4)]
    return requests


async def lmeval(base_url: str, rng: np.random.Generator, args) -> list[dict]:
    return await _closed_loop(base_url, _documents(rng, args, 1), args.concurrency, {"echo": True, "logprobs": 1})


async def fewshot(base_url: str, rng: np.random.Generator, args) -> list[dict]:
    return await _closed_loop(base_url, _documents(rng, args, 4), args.concurrency)


async def unique(base_url: str, rng: np.random.Generator, args) -> list[dict]:
    requests = [(_ids(rng, 200), 32) for _ in range(args.unique_requests)]
    return await _closed_loop(base_url, requests, args.concurrency)


async def chat(base_url: str, rng: np.random.Generator, args) -> list[dict]:
    limits = httpx.Limits(max_connections=args.sessions + 4, max_keepalive_connections=args.sessions + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def session(system: str, questions: list[str]) -> list[dict]:
            history, results = f"System: {system}", []
            for question in questions:
                history += f"\nUser: {question}\nAssistant:"
                result = await one_request(client, history, 32, 0.0)
                results.append(result)
                history += result.get("text", "")
            return results

        sessions = [(_words(rng, 120), [_words(rng, 30) for _ in range(args.turns)]) for _ in range(args.sessions)]
        return [r for rs in await asyncio.gather(*(session(s, q) for s, q in sessions)) for r in rs]


WORKLOADS: dict[str, Callable] = {"lmeval": lmeval, "fewshot": fewshot, "chat": chat, "unique": unique}


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def measure(base_url: str, workload: str, seed: int, args) -> dict:
    before = httpx.get(base_url + "/metrics", timeout=30).text
    started = time.perf_counter()
    results = asyncio.run(WORKLOADS[workload](base_url, np.random.default_rng(seed), args))
    wall = time.perf_counter() - started
    after = httpx.get(base_url + "/metrics", timeout=30).text
    ok = [r for r in results if "error" not in r]
    ttft = [r["arrivals"][0] - r["sent"] for r in ok]
    queries = _counter(after, "nanogpt_mlx_prefix_cache_queries_total") - _counter(before, "nanogpt_mlx_prefix_cache_queries_total")
    hits = _counter(after, "nanogpt_mlx_prefix_cache_hits_total") - _counter(before, "nanogpt_mlx_prefix_cache_hits_total")
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "requests_per_s": len(ok) / wall,
        "output_tok_s": sum(r["tokens"] for r in ok) / wall,
        "prefix_cache_hit_rate": hits / queries if queries else None,
    }


FIGURES = ("ttft_p50_s", "ttft_p95_s", "requests_per_s", "output_tok_s")


def summarize(rounds: list[dict]) -> dict:
    """Median over rounds of each figure, per workload and server, and the on/off ratios."""
    summary = {}
    for workload in rounds[0]:
        entry = {}
        for mode in ("on", "off"):
            entry[mode] = {f: statistics.median(r[workload][mode][f] for r in rounds) for f in FIGURES}
            rates = [r[workload][mode]["prefix_cache_hit_rate"] for r in rounds if r[workload][mode]["prefix_cache_hit_rate"] is not None]
            entry[mode]["prefix_cache_hit_rate"] = statistics.median(rates) if rates else None
        entry["on_over_off"] = {f: entry["on"][f] / entry["off"][f] for f in FIGURES}
        summary[workload] = entry
    return summary


def print_table(summary: dict) -> None:
    print(f"{'workload':<8} {'cache':<5} {'TTFT p50':>9} {'TTFT p95':>9} {'req/s':>7} {'out tok/s':>9} {'hit rate':>8}")
    for workload, entry in summary.items():
        for mode in ("on", "off"):
            e = entry[mode]
            hit = "-" if e["prefix_cache_hit_rate"] is None else f"{e['prefix_cache_hit_rate']:.0%}"
            print(f"{workload:<8} {mode:<5} {e['ttft_p50_s'] * 1e3:>7.0f}ms {e['ttft_p95_s'] * 1e3:>7.0f}ms "
                  f"{e['requests_per_s']:>7.2f} {e['output_tok_s']:>9.1f} {hit:>8}")
        r = entry["on_over_off"]
        ratios = f"{r['ttft_p50_s']:>8.2f}x {r['ttft_p95_s']:>8.2f}x {r['requests_per_s']:>6.2f}x {r['output_tok_s']:>8.2f}x"
        print(f"{'':<8} {'on/off':<5} {ratios}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO_ROOT / "checkpoints" / "default"), help="checkpoint directory (default: the bundled one)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--rounds", type=int, default=1, help="rounds per workload, alternating which server goes first")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--concurrency", type=int, default=8, help="clients of the lmeval, fewshot and unique workloads")
    p.add_argument("--documents", type=int, default=8, help="lmeval and fewshot: documents of 4 choices each")
    p.add_argument("--sessions", type=int, default=8, help="chat: concurrent conversations")
    p.add_argument("--turns", type=int, default=4, help="chat: turns per conversation")
    p.add_argument("--unique-requests", type=int, default=32, help="unique: requests")
    p.add_argument("--out", type=Path, default=None, help="the JSON results (default: benchmarks/results/<machine-id>/prefix_cache.json)")
    return p


def run(args: argparse.Namespace, say: Callable[[str], None] = print) -> dict:
    """Both servers started once, every workload measured on each, alternating; the results as
    `main` writes them (`say` gets a line per workload and round)."""
    on_spec = ours(Path(args.model), args.max_batch, args.device)
    off_spec = ours(Path(args.model), args.max_batch, args.device)
    off_spec.name, off_spec.command = "nanogpt-mlx-no-prefix-cache", [*off_spec.command, "--no-prefix-cache"]
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="prefix-cache-") as tmp, running(on_spec, Path(tmp)) as on, running(off_spec, Path(tmp)) as off:
        # Warm-up, not recorded: each server's first forwards of each shape pay MLX's first-call costs.
        small = argparse.Namespace(**{**vars(args), "documents": 2, "sessions": 2, "turns": 2, "unique_requests": 4})
        for workload in args.workloads:
            for server in (on, off):
                measure(server.base_url, workload, 999_999, small)
        for round_ in range(args.rounds):
            results: dict = {}
            for i, workload in enumerate(args.workloads):
                seed = 1000 * round_ + i
                order = [("on", on), ("off", off)] if round_ % 2 == 0 else [("off", off), ("on", on)]
                results[workload] = {mode: measure(server.base_url, workload, seed, args) for mode, server in order}
                say(f"round {round_ + 1} {workload}: " + ", ".join(
                    f"{mode} TTFT p50 {results[workload][mode]['ttft_p50_s'] * 1e3:.0f} ms" for mode in ("on", "off")))
            rounds.append(results)
    summary = summarize(rounds)
    out = {
        "benchmark": "prefix_cache",
        "model": str(args.model),
        "max_batch": args.max_batch,
        "args": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "summary": summary,
        "rounds": rounds,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = run(args, say=lambda line: print(line, flush=True))
    rounds = out["rounds"]
    print()
    print_table(out["summary"])
    path = args.out or REPO_ROOT / "benchmarks" / "results" / machine_id() / "prefix_cache.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, out)
    print(f"wrote {path}")
    errors = sum(r[w][m]["errors"] for r in rounds for w in r for m in ("on", "off"))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
