"""What Prometheus metrics cost: streaming throughput of `nanogpt-mlx serve` with and without them.

Starts two servers on the same model side by side, one as configured by default (metrics on,
/metrics scraped every --scrape-interval seconds while it is under load, as Prometheus would)
and one with `--no-metrics`, then loads them alternately with serve_load's streaming clients
(64-token completions, `ignore_eos`): each round measures every concurrency on both, swapping
which goes first from one round to the next so that drift on a shared machine (other processes,
thermal state) falls on both alike. Only one server is under load at a time; the idle one waits
on a condition variable and costs nothing.

Reports per concurrency the median output tok/s of each server over the rounds, the overhead
(1 - with / without) of the medians and the median of the per-round (paired) overheads, and the
rounds themselves, whose spread shows how much of the difference is noise. Also an in-process bound that noise cannot
blur: the time of the metric work (the engine's stats callback) per generated token, as a share of the
per-token time measured under load, and the time of one /metrics exposition as a share of the
scrape interval.

Without --model it serves a random-weight model of the full default shape.

    python -m nanogpt_mlx.benchmarks.metrics_overhead                          # c = 1, 8, 32; 3 rounds
    python -m nanogpt_mlx.benchmarks.metrics_overhead --rounds 5 --out metrics_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

import httpx

from nanogpt_mlx.benchmarks.serve_load import free_port, random_full_size_checkpoint, run_level, start_server, wait_healthy

CONFIGS = {"metrics on": [], "metrics off": ["--no-metrics"]}


async def measure(base_url: str, concurrency: int, args, scrape_interval: float | None) -> dict:
    """One serve_load level; meanwhile GET /metrics every `scrape_interval` s (None: no scraping)."""

    async def scrape() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            while True:
                await asyncio.sleep(scrape_interval)
                r = await client.get("/metrics")
                r.raise_for_status()

    scraper = asyncio.create_task(scrape()) if scrape_interval else None
    try:
        return await run_level(base_url, concurrency, args.requests_per_client, args.max_tokens, args.temperature)
    finally:
        if scraper is not None:
            scraper.cancel()
            try:
                await scraper
            except asyncio.CancelledError:
                pass


def metric_calls_per_token_seconds(concurrency: int, max_tokens: int) -> float:
    """Seconds of metric work per generated token, with real prometheus-client families: the
    engine's stats callback (`ServerMetrics.observe_step`) on a decode step of `concurrency` rows
    (one inter-token latency each), shared over its tokens, plus the step where a sequence gets
    its slot and first token and the one where it finishes, shared over its `max_tokens`."""
    from nanogpt_mlx.server.engine.types import SequenceStats, StepStats
    from nanogpt_mlx.server.metrics import ServerMetrics

    m = ServerMetrics(kv_cache_slots=32)
    n = 20000
    decode_step = StepStats(
        running=concurrency,
        kv_rows_used=concurrency,
        decode_batch_size=concurrency,
        generation_tokens=concurrency,
        inter_token_latencies=[0.012] * concurrency,
    )
    first = StepStats(
        running=1,
        kv_rows_used=1,
        prompt_tokens=30,
        generation_tokens=1,
        queue_times=[0.001],
        time_to_first_tokens=[0.05],
        prefill_times=[0.02],
    )
    finished = SequenceStats(
        "length", 30, max_tokens, e2e_latency=1.5, queue_time=0.001, time_to_first_token=0.05, prefill_time=0.02, decode_time=1.4
    )
    last = StepStats(finished=[finished])

    def per_sequence() -> None:
        m.observe_step(first)
        m.observe_step(last)

    step = min(timeit.repeat(lambda: m.observe_step(decode_step), number=n, repeat=5)) / n
    sequence = min(timeit.repeat(per_sequence, number=n, repeat=5)) / n
    return step / concurrency + sequence / max_tokens


def exposition_seconds() -> float:
    """Seconds to render /metrics once, with every family populated as under load."""
    from nanogpt_mlx.server.metrics import ServerMetrics

    m = ServerMetrics(kv_cache_slots=32)
    for i in range(1000):
        for family in (m.inter_token_latency, m.time_to_first_token, m.request_latency, m.queue_time, m.prefill_time, m.decode_time):
            family.observe(0.001 * i)
        m.batch_size.observe(i % 33)
    for status, code in [(400, "invalid_value"), (401, "invalid_api_key"), (404, "model_not_found"), (503, "queue_full")]:
        m.count_error(status, code)
    return min(timeit.repeat(m.render, number=200, repeat=5)) / 200


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: a random-weight model of the full default shape)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=3, help="measurements of each (server, concurrency), interleaved")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--scrape-interval", type=float, default=5.0, help="seconds between GET /metrics on the metrics server (0: none)")
    p.add_argument("--out", default="metrics_overhead.json")
    args = p.parse_args(argv)

    runs: dict[str, dict[int, list[dict]]] = {name: {c: [] for c in args.concurrency} for name in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="metrics-overhead-") as tmp:
        tmp_path = Path(tmp)
        model_dir = Path(args.model) if args.model else random_full_size_checkpoint(tmp_path)
        servers = {}
        try:
            for name, extra in CONFIGS.items():
                port = free_port()
                log_path = tmp_path / f"{name.replace(' ', '-')}.log"
                proc = start_server(model_dir, port, args.max_batch, extra, log_path)
                servers[name] = (f"http://127.0.0.1:{port}", proc, log_path)
            for base_url, proc, _ in servers.values():
                wait_healthy(base_url, proc)
            assert httpx.get(servers["metrics off"][0] + "/metrics", timeout=10).status_code == 404
            assert httpx.get(servers["metrics on"][0] + "/metrics", timeout=10).status_code == 200

            names = list(CONFIGS)
            for r in range(args.rounds):
                for c in args.concurrency:
                    for name in names if r % 2 == 0 else names[::-1]:
                        base_url = servers[name][0]
                        scrape = args.scrape_interval if name == "metrics on" and args.scrape_interval > 0 else None
                        level = asyncio.run(measure(base_url, c, args, scrape))
                        runs[name][c].append(level)
                        ttft_ms = level["ttft_p95_s"] * 1e3
                        print(
                            f"round {r + 1} c={c:<3} {name:<11} {level['output_tok_s']:7.1f} tok/s  "
                            f"TTFT p95 {ttft_ms:5.0f} ms  {level['errors']} errors",
                            flush=True,
                        )
        finally:
            for _, proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for _, proc, _ in servers.values():
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            logs = {name: log_path.read_text()[-2000:] for name, (_, _, log_path) in servers.items()}

    summary = []
    render = exposition_seconds()
    scrape_share = render / args.scrape_interval if args.scrape_interval > 0 else 0.0
    print()
    print(
        f"{'conc':>4} {'with (tok/s)':>13} {'without':>9} {'overhead':>9} {'paired':>8} "
        f"{'metric calls':>13} {'scrapes':>8}   rounds with / without"
    )
    for c in args.concurrency:
        on = [lvl["output_tok_s"] for lvl in runs["metrics on"][c]]
        off = [lvl["output_tok_s"] for lvl in runs["metrics off"][c]]
        on_median, off_median = statistics.median(on), statistics.median(off)
        overhead = 1 - on_median / off_median if off_median else float("nan")  # nan: every request failed
        paired = statistics.median(1 - a / b if b else float("nan") for a, b in zip(on, off))  # same round: same drift
        calls = metric_calls_per_token_seconds(c, args.max_tokens)
        calls_share = calls * on_median  # (s of metric calls per token) x (tokens per s): one engine thread makes them all
        summary.append(
            {
                "concurrency": c,
                "with_metrics_tok_s": on,
                "without_metrics_tok_s": off,
                "with_median_tok_s": on_median,
                "without_median_tok_s": off_median,
                "overhead": overhead,
                "paired_overhead": paired,
                "metric_calls_per_token_s": calls,
                "metric_calls_share_of_time": calls_share,
                "exposition_s": render,
                "exposition_share_of_time": scrape_share,
                "ttft_p95_s": {
                    "with": statistics.median(l["ttft_p95_s"] for l in runs["metrics on"][c]),
                    "without": statistics.median(l["ttft_p95_s"] for l in runs["metrics off"][c]),
                },
            }
        )
        rounds = f"{' '.join(f'{v:.0f}' for v in on)} / {' '.join(f'{v:.0f}' for v in off)}"
        print(
            f"{c:>4} {on_median:>13.1f} {off_median:>9.1f} {overhead * 100:>8.2f}% {paired * 100:>7.2f}% "
            f"{calls_share * 100:>12.3f}% {scrape_share * 100:>7.3f}%   {rounds}"
        )
    print("overhead = 1 - with / without, of the medians; paired = median over rounds of each round's overhead")
    print("(negative: the server with metrics was faster, i.e. noise)")
    print("metric calls = the stats callback's work per token x tokens per second, measured in-process")
    print(f"scrapes = one /metrics exposition ({render * 1e3:.2f} ms) / the scrape interval")

    result = {
        "benchmark": "metrics_overhead",
        "model": str(args.model or "random full-size (8 x 384, 52,990,464 parameters)"),
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "rounds": args.rounds,
        "scrape_interval_s": args.scrape_interval,
        "max_batch": args.max_batch,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "levels": summary,
        "runs": {name: {str(c): levels for c, levels in by_c.items()} for name, by_c in runs.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    errors = sum(lvl["errors"] for by_c in runs.values() for levels in by_c.values() for lvl in levels)
    if errors:
        for name, text in logs.items():
            print(f"--- {name} server log (tail)\n{text}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
