"""The suite's outputs: results.json, report.md, PNG plots, and README.md's generated performance section.

    nanogpt-mlx bench report                                  # redo report.md and plots from the newest results.json
    nanogpt-mlx bench report --results benchmarks/results/ID/results.json --update-readme

`update_readme` rewrites only the text between `<!-- bench:begin -->` and `<!-- bench:end -->` in
the top README.md, from one results.json, and links to its report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from nanogpt_mlx.atomic import atomic_file, write_json, write_text
from nanogpt_mlx.benchmarks import stats

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
README = REPO / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PLOTS = ("card.png", "server_throughput.png", "server_latency.png", "limits.png")
LABELS = {"ours": "nanogpt-mlx", "transformers": "transformers + torch", "mlx-lm": "mlx-lm"}


# --- the machine's limits: what each figure costs in bytes and FLOPs per token --------------------

CARD_SHAPE = "the card's shape"


def sentence_case(text: str) -> str:
    return text[:1].upper() + text[1:]


def weights_phrase(results: dict, shape: str) -> str:
    """What the figures ran on: "random weights of <shape>", or the checkpoint's folder."""
    checkpoint = (results.get("weights") or {}).get("checkpoint")
    if checkpoint:
        return f"the checkpoint `{Path(checkpoint['dir']).name}`"
    return f"random weights of {shape}"

def model_costs(cfg: dict) -> dict:
    """Weights and matmul sizes of the model (fp32), for bytes- and FLOPs-per-token estimates."""
    C, L, F, V = cfg["n_embd"], cfg["n_layer"], cfg["n_inner"], cfg["vocab_size"]
    block_matmul = L * (3 * C * C + C * C + 2 * C * F)  # qkv, attention output, MLP in and out
    block_params = L * (3 * C * C + 3 * C + C * C + C + C * F + F + F * C + C + 4 * C) + 2 * C  # + biases, LayerNorms, ln_f
    return {"C": C, "L": L, "block_matmul": block_matmul, "head": C * V, "weight_bytes": 4 * (block_params + C * V)}


def derive_limits(results: dict) -> list[dict]:
    """Each measured figure as a share of the machine's limits.

    FLOPs per token: 2 per multiply-add of the weight matmuls (the LM head only where logits are
    computed: every position of a forward, the last of a prefill) plus 4 x layers x width x t for
    attention over t positions (scores and weighted sum; a B x T forward computes the full T x T).
    Training: 3x the forward. Bytes per token: the fp32 weights a step reads (blocks and head; the
    embedding is a gather), shared by the rows of a batch, plus the KV cache a row attends over.
    """
    lim = results.get("limits")
    if not lim:
        return []
    cfg = results["sizes"]["model"]
    s = results["sizes"]
    k = model_costs(cfg)
    bw, peak = lim["bandwidth_gb_s"] * 1e9, lim["gemm_gflops"] * 1e9

    def kv(position: float) -> float:
        return 2 * k["L"] * position * k["C"] * 4

    def decode(rows: int, position: float) -> tuple[float, float]:
        return k["weight_bytes"] / rows + kv(position), 2 * (k["block_matmul"] + k["head"]) + 4 * k["L"] * k["C"] * position

    def forward(tokens: int, t: int) -> tuple[float, float]:
        return k["weight_bytes"] / tokens, 2 * (k["block_matmul"] + k["head"]) + 4 * k["L"] * k["C"] * t

    def prefill(rows: int, t: int) -> tuple[float, float]:
        return k["weight_bytes"] / (rows * t), 2 * k["block_matmul"] + 4 * k["L"] * k["C"] * t + 2 * k["head"] / t

    rows = []

    def add(figure: str, who: str, summary: dict | None, cost: tuple[float, float], kind: str) -> None:
        if not summary or not summary.get("n"):
            return
        tok_s = summary["median"]
        bytes_per_token, flops_per_token = cost
        ceiling_bw, ceiling_flops = bw / bytes_per_token, peak / flops_per_token
        rows.append(
            {
                "figure": figure,
                "who": who,
                "tok_s": tok_s,
                "kind": kind,
                "bytes_per_token": bytes_per_token,
                "flops_per_token": flops_per_token,
                "pct_of_bandwidth": 100 * tok_s / ceiling_bw,
                "pct_of_compute": 100 * tok_s / ceiling_flops,
                "ceiling_tok_s": min(ceiling_bw, ceiling_flops),
                "bound": "memory" if ceiling_bw < ceiling_flops else "compute",
            }
        )

    gen_position = s["prompt_tokens"] + s["gen_tokens"] / 2
    for who, figs in results.get("inference", {}).items():
        add(
            f"generation {s['prompt_tokens']}+{s['gen_tokens']}, batch 1",
            who,
            figs.get("generation_tok_s"),
            decode(1, gen_position),
            "decode",
        )
        add(
            f"forward {s['forward_batch']}x{s['forward_seq']}",
            who,
            figs.get("forward_tok_s"),
            forward(s["forward_batch"] * s["forward_seq"], s["forward_seq"]),
            "compute",
        )
        add(f"prefill 1x{s['prefill_tokens']}", who, figs.get("prefill_tok_s"), prefill(1, s["prefill_tokens"]), "compute")
    engine = results.get("engine")
    if engine:
        for n, fig in engine["decode"].items():
            add(f"engine decode, {n} row{'' if n == '1' else 's'}", "ours", fig["tok_s"], decode(int(n), s["decode_position"]), "decode")
        add(
            f"engine batched prefill {s['batched_prefill_rows']}x{s['batched_prefill_tokens']}",
            "ours",
            engine["batched_prefill"]["tok_s"],
            prefill(s["batched_prefill_rows"], s["batched_prefill_tokens"]),
            "compute",
        )
    training = results.get("training")
    if training:
        fb, ff = forward(s["train_batch"] * s["train_seq"], s["train_seq"])
        add(f"training {s['train_batch']}x{s['train_seq']}", "ours", training["train_tok_s"], (fb, 3 * ff), "compute")
        add(
            f"evaluation {s['eval_batch']}x{s['eval_seq']}",
            "ours",
            training["eval_tok_s"],
            forward(s["eval_batch"] * s["eval_seq"], s["eval_seq"]),
            "compute",
        )
    return rows


# --- formatting ---------------------------------------------------------------------------------
def num(x, digits: int = 0) -> str:
    if not stats.finite(x):
        return "–"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def ratio(x) -> str:
    return f"{x:.2f}×" if stats.finite(x) else "–"


def spread(summary: dict, digits: int = 0) -> str:
    if not summary or not summary.get("n"):
        return "–"
    lo, hi = num(summary["p25"], digits), num(summary["p75"], digits)
    return f"{lo}–{hi} (min {num(summary['min'], digits)}, max {num(summary['max'], digits)})"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def hardware(results: dict) -> str:
    m = results["machine"]
    widest = next((f for f in ("amx_tile", "avx512f", "avx2") if f in m.get("cpu_flags", [])), None)
    vec = {"amx_tile": "AMX", "avx512f": "AVX-512", "avx2": "AVX2"}.get(widest, "")
    return f"{m['cpu']}, {m['cores']} cores" + (f", {vec}" if vec else "") + (" (GPU)" if results["device"] == "gpu" else "")


BUSY_NOTE = (
    "**Busy machine**: the 1-minute load average before or after the run exceeded half the {cores} cores, so other work "
    "shared the CPU; figures vary with it (llama.cpp's spinning threads suffer most). Compare only figures of one run."
)


def load(la: list[float] | None) -> str:
    return " / ".join(f"{x:.1f}" for x in la) if la else "–"


def busy(results: dict) -> bool:
    """Did other work share the CPU (1-minute load average above half the cores, before or after the run)?"""
    cores = results["machine"]["cores"] or 1
    loads = [la[0] for la in (results.get("load_average_before"), results.get("load_average_after")) if la]
    return any(load > cores / 2 for load in loads)


def card_rows(results: dict) -> list[dict]:
    """The card's table: figure, our summary, unit scale, the card's value."""
    s, card = results["sizes"], results["card_reference"]
    inf = results.get("inference", {}).get("ours", {})
    tr = results.get("training") or {}
    rows = [
        {
            "figure": f"forward {s['forward_batch']}×{s['forward_seq']}, full logits (tok/s)",
            "ours": inf.get("forward_tok_s"),
            "card": card["forward_tok_s"],
        },
        {
            "figure": "  latency mean (ms)",
            "ours": inf.get("forward_latency_ms"),
            "card": card["forward_latency_ms"]["mean"],
            "stat": "mean",
        },
        {"figure": "  latency p95 (ms)", "ours": inf.get("forward_latency_ms"), "card": card["forward_latency_ms"]["p95"], "stat": "p95"},
        {"figure": "  latency p99 (ms)", "ours": inf.get("forward_latency_ms"), "card": card["forward_latency_ms"]["p99"], "stat": "p99"},
        {
            "figure": f"generation {s['prompt_tokens']} + {s['gen_tokens']} greedy, batch 1 (tok/s)",
            "ours": inf.get("generation_tok_s"),
            "card": card["generation_tok_s"],
        },
        {"figure": f"training {s['train_batch']}×{s['train_seq']} (tok/s)", "ours": tr.get("train_tok_s"), "card": card["train_tok_s"]},
        {"figure": f"evaluation {s['eval_batch']}×{s['eval_seq']} (tok/s)", "ours": tr.get("eval_tok_s"), "card": None},
    ]
    return rows


def markdown(results: dict) -> str:
    m, s = results["machine"], results["sizes"]
    hw = hardware(results)
    out = [f"# nanogpt-mlx benchmark: {results['machine_id']}", ""]
    out.append(
        f"{results['started_at']} → {results['finished_at']} ({results['duration_s'] / 60:.1f} min), git {m['git']}, "
        f"device {results['device']}. Generated by `nanogpt-mlx bench`; definitions: [benchmarks/README.md](../../README.md)."
    )
    out.append("")
    if results["smoke"]:
        out += ["**Smoke run**: a tiny model and 2 runs of everything; these figures check the suite and measure nothing.", ""]
    elif not results.get("default_sizes"):
        changed = {k: v for k, v in s.items() if k != "model" and _default_sizes().get(k) != v}
        out += [f"Sizes differ from the defaults: {', '.join(f'{k}={v}' for k, v in changed.items())}.", ""]
    if busy(results):
        out += [BUSY_NOTE.format(cores=m["cores"]), ""]
    out += [
        "## Machine",
        "",
        table(
            ["", ""],
            [
                ["CPU", f"{m['cpu']} ({m['cores']} cores, {m['system']})"],
                ["vector extensions", ", ".join(m.get("cpu_flags", [])) or "–"],
                ["memory", f"{m.get('memory_gb', '–')} GiB"],
                ["BLAS", f"{m['blas']} ({m['blas_threads']} threads)"],
                ["libraries", ", ".join(f"{k} {v}" for k, v in m.get("libraries", {}).items())],
                [
                    "load average (1, 5, 15 min) before; after",
                    f"{load(results.get('load_average_before'))}; {load(results.get('load_average_after'))}",
                ],
            ],
        ),
        "",
    ]
    if results.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    out += peers_section(results)

    if "card" in results["sections"] and results.get("inference"):
        card = results["card_reference"]
        from nanogpt_mlx.benchmarks.suite import CARD_MODEL

        shape = "the card's shape" if s["model"] == CARD_MODEL else "a smaller shape than the card's"
        params = (results.get("training") or {}).get("params", 0)
        out += [
            "## The card's table",
            "",
            f"{sentence_case(weights_phrase(results, shape))} ({params:,} parameters), fp32, inference "
            f"mode (no dropout), {results['inference']['ours']['forward_tok_s']['n']} timed runs of each figure after "
            f"{s['warmup']} warm-up runs per process, over {s['rounds']} alternating rounds. "
            "Ours: median, the p25–p75 range and min / max. "
            f"Card: {card['hardware']}, from the original model card ({card['notes']}).",
            "",
        ]
        rows = []
        for r in card_rows(results):
            summ = r["ours"]
            if not summ or not summ.get("n"):
                continue
            value = summ.get(r.get("stat", "median"))
            rows.append(
                [
                    r["figure"],
                    num(value, 1),
                    spread(summ, 1) if r.get("stat", "median") == "median" else "–",
                    num(r["card"], 1) if r["card"] is not None else "–",
                    ratio(value / r["card"]) if r["card"] else "–",
                ]
            )
        tr = results.get("training")
        if tr:
            rows.append(["model size on disk, fp32 / fp16 (MB)", f"{tr['size_fp32_mb']:.1f} / {tr['size_fp16_mb']:.1f}", "–", "–", "–"])
            rows.append(["parameters", f"{tr['params']:,}", "–", f"{card['params'] / 1e6:.0f}M", "–"])
            if tr.get("train_peak_memory_gb"):
                rows.append(["training peak memory (GB)", f"{tr['train_peak_memory_gb']:.2f}", "–", "–", "–"])
        out += [
            table(["figure", f"ours ({hw})", "ours p25–p75 (min, max)", f"card ({card['hardware']})", "ours / card"], rows),
            "",
            "![the card's table](card.png)",
            "",
        ]

    if results.get("inference") and len(results["inference"]) > 1:
        out += ["## Peers in process (same weights, alternating)", ""]
        figs = results["inference"]
        names = list(figs)
        keys = [
            ("forward_tok_s", f"forward {s['forward_batch']}×{s['forward_seq']} tok/s"),
            ("generation_tok_s", f"generation {s['prompt_tokens']}+{s['gen_tokens']} tok/s"),
            ("prefill_tok_s", f"prefill 1×{s['prefill_tokens']} tok/s"),
        ]
        rows = []
        for key, label in keys:
            row = [label]
            for n in names:
                v = figs[n][key]["median"]
                row.append(num(v, 1) + ("" if n == "ours" else f" ({ratio(results['inference_ratios'][n][key])})"))
            rows.append(row)
        out += [
            table(["figure"] + [LABELS.get(n, n) + ("" if n == "ours" else " (× ours)") for n in names], rows),
            "",
            "mlx-lm's GPT-2 ties the LM head to the embedding (same shape and cost) and uses the tanh GELU; transformers runs "
            "torch's own kernels in a plain process.",
            "",
        ]

    eng = results.get("engine")
    if eng:
        rows = [
            [
                f"decode step, {n} row{'s' if n != '1' else ''} at position {s['decode_position']}",
                num(f["tok_s"]["median"], 1),
                num(f["step_ms"]["median"], 1),
                spread(f["tok_s"], 1),
            ]
            for n, f in eng["decode"].items()
        ]
        rows.append(
            [
                f"prefill 1×{s['prefill_tokens']} (last logits)",
                num(eng["prefill"]["tok_s"]["median"]),
                num(eng["prefill"]["ms"]["median"], 1),
                spread(eng["prefill"]["tok_s"]),
            ]
        )
        rows.append(
            [
                f"batched prefill {s['batched_prefill_rows']}×{s['batched_prefill_tokens']}",
                num(eng["batched_prefill"]["tok_s"]["median"]),
                num(eng["batched_prefill"]["ms"]["median"], 1),
                spread(eng["batched_prefill"]["tok_s"]),
            ]
        )
        out += ["## Engine (`ModelRunner`)", "", table(["", "tok/s", "ms per call", "tok/s p25–p75 (min, max)"], rows), ""]

    srv = results.get("server")
    if srv:
        out += server_section(results)
    if results.get("prefix_cache"):
        out += prefix_cache_section(results["prefix_cache"])
    if results.get("greedy_check"):
        out += greedy_section(results)
    lim = results.get("limits")
    if lim:
        out += [
            "## Limits",
            "",
            f"Measured: memory read bandwidth **{lim['bandwidth_gb_s']:.1f} GB/s** (the fastest matrix-vector product "
            f"over a {s['bandwidth_n']}² fp32 matrix; "
            + ", ".join(f"{lib} {v:.1f}" for lib, v in lim["bandwidth_gb_s_by_library"].items())
            + f"), fp32 GEMM peak **{lim['gemm_gflops']:.0f} GFLOP/s** (the fastest square product; "
            + ", ".join(f"{k}³ {v:.0f}" for k, v in lim["gemm_gflops_by_size"].items())
            + "). Each figure as a share of what the bandwidth (bytes per token) and the GEMM peak (FLOPs per token) allow; "
            "the smaller ceiling is the one that binds (definitions: benchmarks/report.py, `derive_limits`). The peak is what "
            "this process's BLAS libraries reach: a peer with kernels of its own can exceed it.",
            "",
        ]
        rows = [
            [
                r["figure"],
                LABELS.get(r["who"], r["who"]),
                num(r["tok_s"], 1),
                f"{r['bytes_per_token'] / 1e6:.2f}",
                f"{r['flops_per_token'] / 1e6:.0f}",
                f"{r['pct_of_bandwidth']:.0f} %",
                f"{r['pct_of_compute']:.0f} %",
                r["bound"],
            ]
            for r in lim.get("figures", [])
        ]
        out += [
            table(["figure", "who", "tok/s", "MB/token", "MFLOP/token", "% of bandwidth", "% of GEMM peak", "bound"], rows),
            "",
            "![limits](limits.png)",
            "",
        ]
    out += ["## Sizes", "", "```", json.dumps({k: v for k, v in s.items()}, separators=(", ", ": ")), "```", ""]
    return "\n".join(out)


def _default_sizes() -> dict:
    from dataclasses import asdict

    from nanogpt_mlx.benchmarks.suite import Sizes

    return asdict(Sizes())


def peers_section(results: dict) -> list[str]:
    rows = []
    for name, p in results["peers"].items():
        detail = (
            stats.one_line(p.get("reason", "")) if p["status"] != "ready" else "; ".join(x for x in (p.get("version"), p.get("how")) if x)
        )
        rows.append([name, p["status"].replace("ready", "measured"), (detail or "").replace("|", "\\|")])
    return ["## Peers", "", table(["peer", "status", "version / how, or why not"], rows), ""]


PREFIX_WORKLOADS = {
    "lmeval": "lm-eval loglikelihood: 4 choices × a 300-token context (echo, logprobs)",
    "fewshot": "few-shot generation, the same shape",
    "chat": "multi-turn chat",
    "unique": "unique prompts",
}


def prefix_cache_section(pc: dict) -> list[str]:
    """Cache on vs off on each workload (benchmarks/prefix_cache.py), medians over the rounds."""
    a = pc["args"]
    rows = []
    for workload, entry in pc["summary"].items():
        on, off, r = entry["on"], entry["off"], entry["on_over_off"]
        errors = sum(rnd[workload][mode]["errors"] for rnd in pc["rounds"] for mode in ("on", "off"))
        hit = on.get("prefix_cache_hit_rate")
        rows.append(
            [
                PREFIX_WORKLOADS.get(workload, workload),
                f"{num(1e3 * on['ttft_p50_s'])} / {num(1e3 * off['ttft_p50_s'])} ({ratio(r['ttft_p50_s'])})",
                f"{num(1e3 * on['ttft_p95_s'])} / {num(1e3 * off['ttft_p95_s'])} ({ratio(r['ttft_p95_s'])})",
                f"{num(on['requests_per_s'], 2)} / {num(off['requests_per_s'], 2)} ({ratio(r['requests_per_s'])})",
                "–" if hit is None else f"{hit:.0%}",
                str(errors),
            ]
        )
    return [
        "## Prefix cache",
        "",
        f"Two servers on `{pc['model']}`, one with the prefix cache (the default) and one with `--no-prefix-cache`, loaded "
        f"alternately with the same requests ({a['concurrency']} clients; {a['documents']} documents, {a['sessions']} chats of "
        f"{a['turns']} turns, {a['unique_requests']} unique prompts; {a['rounds']} rounds, medians). Cache on / off, and on ÷ off:",
        "",
        table(["workload", "TTFT p50 ms", "TTFT p95 ms", "requests/s", "hit rate", "errors"], rows),
        "",
    ]


def server_section(results: dict) -> list[str]:
    srv, s = results["server"], results["sizes"]
    out = [
        "## Server under load",
        "",
        f"Closed loop over loopback: C clients each send streaming completions back to back ({srv['max_tokens']} new tokens, "
        f"`ignore_eos`, temperature 1, every prompt unique so no prompt cache helps); at least {s['requests_per_client']} requests per "
        f"client and {s['min_requests']} per level; every server has {srv['slots']} slots and runs "
        f"{weights_phrase(results, CARD_SHAPE)}; {s['rounds']} rounds, the servers in "
        "alternating order, medians over the rounds. TTFT: send → first token; ITL: gap between streamed tokens; e2e: send → last byte.",
        "",
    ]
    for name, entry in srv["servers"].items():
        rows = []
        for c, lv in entry["levels"].items():
            md = lv["median"]
            rows.append(
                [
                    c,
                    num(md["output_tok_s"], 1),
                    num(1e3 * md["ttft_p50_s"], 0),
                    num(1e3 * md["ttft_p95_s"], 0),
                    num(1e3 * md["itl_p50_s"], 1),
                    num(1e3 * md["itl_p95_s"], 1),
                    num(1e3 * md["e2e_p95_s"], 0),
                    f"{lv['errors']} / {lv['requests']}",
                ]
            )
        out += [
            f"### {name}",
            "",
            table(
                ["clients", "output tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms", "e2e p95 ms", "errors / requests"],
                rows,
            ),
            "",
        ]
    if srv.get("ratios"):
        rows = []
        for name, by_level in srv["ratios"].items():
            for c, r in by_level.items():
                rows.append(
                    [
                        name,
                        c,
                        ratio(r["output_tok_s"]),
                        ratio(r["ttft_p50_s"]),
                        ratio(r["ttft_p95_s"]),
                        ratio(r["itl_p50_s"]),
                        ratio(r["e2e_p95_s"]),
                    ]
                )
        out += [
            "### Peers / ours",
            "",
            "Above 1× a peer has more throughput, or a longer latency, than ours.",
            "",
            table(["server", "clients", "output tok/s", "TTFT p50", "TTFT p95", "ITL p50", "e2e p95"], rows),
            "",
        ]
    out += ["![throughput against clients](server_throughput.png)", "", "![TTFT and ITL distributions](server_latency.png)", ""]
    return out


def greedy_section(results: dict) -> list[str]:
    g = results["greedy_check"]
    checkpoint = Path(g["checkpoint"])
    if checkpoint.is_relative_to(REPO):
        checkpoint = checkpoint.relative_to(REPO)
    elif checkpoint.is_relative_to(Path.home()):
        checkpoint = "~" / checkpoint.relative_to(Path.home())
    out = [
        "## Greedy agreement with ours",
        "",
        f"The same checkpoint ({checkpoint}), {g['tokens']} greedy tokens after each prompt; how many leading tokens equal ours. "
        "llama.cpp's and mlx-lm's GPT-2 use the tanh GELU where ours (and transformers') is the exact erf one, so they may part "
        "where two tokens are nearly tied.",
        "",
    ]
    rows = []
    for peer, check in g["peers"].items():
        for p in check["prompts"]:
            rows.append([peer, f"`{p['prompt']}`", f"{p['agree_tokens']} / {p['of']}"])
    if not rows:
        return []
    return out + [table(["peer", "prompt", "tokens equal to ours"], rows), ""]


# --- plots --------------------------------------------------------------------------------------
def plots(results: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        with atomic_file(out_dir / name) as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(name)

    hw = hardware(results)
    card = results["card_reference"]
    inf = results.get("inference", {})
    if "card" in results["sections"] and inf.get("ours"):
        s = results["sizes"]
        panels = [
            (f"forward {s['forward_batch']}×{s['forward_seq']} (tok/s)", "forward_tok_s", card["forward_tok_s"]),
            (f"forward {s['forward_batch']}×{s['forward_seq']} latency p95 (ms)", "forward_latency_ms", card["forward_latency_ms"]["p95"]),
            (f"generation {s['prompt_tokens']}+{s['gen_tokens']}, batch 1 (tok/s)", "generation_tok_s", card["generation_tok_s"]),
            (f"training {s['train_batch']}×{s['train_seq']} (tok/s)", "train_tok_s", card["train_tok_s"]),
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8))
        for ax, (title, key, card_value) in zip(axes, panels):
            bars = []
            if key == "train_tok_s":
                summ = (results.get("training") or {}).get("train_tok_s")
                if summ and summ.get("n"):
                    bars.append((f"ours\n{hw.split(',')[0]}", summ["median"], summ))
            else:
                for who, figs in inf.items():
                    summ = figs.get(key)
                    value = summ["p95"] if key == "forward_latency_ms" else summ["median"]
                    bars.append((LABELS.get(who, who).replace(" + ", "\n+ "), value, summ if key != "forward_latency_ms" else None))
            bars.append((f"card\n{card['hardware']}", card_value, None))
            xs = range(len(bars))
            colors = ["#1f77b4" if i == 0 else "#888888" if i == len(bars) - 1 else "#ff7f0e" for i in xs]
            ax.bar(xs, [b[1] for b in bars], color=colors)
            for i, (_, value, summ) in enumerate(bars):
                if summ:
                    ax.errorbar(i, value, yerr=[[value - summ["min"]], [summ["max"] - value]], color="black", capsize=3)
                ax.annotate(num(value, 1), (i, value), ha="center", va="bottom", fontsize=8)
            ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
            ax.set_yscale("log")
            ax.set_title(title, fontsize=10)
        fig.suptitle(f"The card's figures: ours on {hw} (median, min–max) beside the card's {card['hardware']}", fontsize=10)
        save(fig, "card.png")

    srv = results.get("server")
    if srv:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, entry in srv["servers"].items():
            cs = [int(c) for c in entry["levels"]]
            med = [entry["levels"][c]["median"]["output_tok_s"] for c in entry["levels"]]
            lo = [min(r["output_tok_s"] for r in entry["levels"][c]["rounds"]) for c in entry["levels"]]
            hi = [max(r["output_tok_s"] for r in entry["levels"][c]["rounds"]) for c in entry["levels"]]
            ax.errorbar(
                cs, med, yerr=[[m - lo_ for m, lo_ in zip(med, lo)], [h - m for m, h in zip(med, hi)]], marker="o", capsize=3, label=name
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(c) for c in srv["levels"]], [str(c) for c in srv["levels"]])
        ax.set_xlabel("concurrent streaming clients")
        ax.set_ylabel("output tok/s (median of rounds; min–max)")
        ax.set_title(f"Throughput against clients, {srv['max_tokens']}-token completions, {hw}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "server_throughput.png")

        names = list(srv["servers"])
        fig, axes = plt.subplots(2, 1, figsize=(max(6.5, 1.2 * len(srv["levels"]) * len(names)), 7))
        for ax, key, title in (
            (axes[0], "ttft_ms_quantiles", "time to first token (ms)"),
            (axes[1], "itl_ms_quantiles", "inter-token latency (ms)"),
        ):
            boxes, positions, colors = [], [], []
            for li, c in enumerate(srv["levels"]):
                for si, name in enumerate(names):
                    lv = srv["servers"][name]["levels"].get(str(c))
                    if not lv or not all(stats.finite(x) for x in lv[key]):
                        continue
                    q = lv[key]
                    boxes.append({"med": q[50], "q1": q[25], "q3": q[75], "whislo": q[5], "whishi": q[95], "fliers": [], "label": ""})
                    positions.append(li * (len(names) + 1) + si)
                    colors.append(f"C{si}")
            if boxes:
                art = ax.bxp(boxes, positions=positions, patch_artist=True, showfliers=False)
                for patch, color in zip(art["boxes"], colors):
                    patch.set_facecolor(color)
                    patch.set_alpha(0.6)
            ax.set_xticks(
                [li * (len(names) + 1) + (len(names) - 1) / 2 for li in range(len(srv["levels"]))], [f"{c} clients" for c in srv["levels"]]
            )
            ax.set_yscale("log")
            ax.set_ylabel(title)
            ax.grid(alpha=0.3, axis="y")
        handles = [matplotlib.patches.Patch(color=f"C{i}", alpha=0.6, label=n) for i, n in enumerate(names)]
        axes[0].legend(handles=handles, fontsize=8)
        axes[0].set_title(f"Distributions over all rounds: box p25–p75, median, whiskers p5–p95; {hw}", fontsize=10)
        save(fig, "server_latency.png")

    lim = results.get("limits")
    if lim and lim.get("figures"):
        rows = lim["figures"]
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
        ys = range(len(rows))
        ax.barh([y + 0.2 for y in ys], [r["pct_of_bandwidth"] for r in rows], height=0.4, label="% of memory bandwidth")
        ax.barh([y - 0.2 for y in ys], [r["pct_of_compute"] for r in rows], height=0.4, label="% of fp32 GEMM peak")
        ax.set_yticks(list(ys), [f"{r['figure']} ({LABELS.get(r['who'], r['who'])})" for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("% of the machine's measured limit")
        ax.set_title(f"{lim['bandwidth_gb_s']:.0f} GB/s, {lim['gemm_gflops']:.0f} GFLOP/s; {hw}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="x")
        save(fig, "limits.png")
    return written


# --- outputs ------------------------------------------------------------------------------------
def write_outputs(results: dict, out_dir: Path) -> None:
    """results.json, the plots and report.md into `out_dir`, each file replaced atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots(results, out_dir)
    write_json(out_dir / "results.json", _json_safe(results))
    write_text(out_dir / "report.md", markdown(results))


def _json_safe(value):
    """NaN and infinities as null: strict JSON readers reject them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def latest_results(root: Path | None = None) -> Path:
    """The newest full (non-smoke) results.json under benchmarks/results/, by its finish time."""
    root = root or HERE / "results"
    found = []
    for path in root.glob("*/results.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not data.get("smoke"):
            found.append((data.get("finished_at", ""), path))
    if not found:
        raise FileNotFoundError(f"no results.json under {root}: run `nanogpt-mlx bench` first")
    return max(found)[1]


def readme_section(results: dict, results_path: Path, readme: Path) -> str:
    """The generated text between the markers: the card's table, the server at each level with the peers, the limits."""
    link = os.path.relpath(results_path.parent / "report.md", readme.parent)
    card = results["card_reference"]
    hw = hardware(results)
    date = results["finished_at"][:10]
    lines = [
        BEGIN,
        "<!-- generated by `nanogpt-mlx bench report --update-readme` from "
        f"{os.path.relpath(results_path, readme.parent)}; edits here are overwritten -->",
        "",
    ]
    preliminary = "" if results.get("default_sizes") else " Sizes differ from the defaults (a short run): see the report."
    if busy(results):
        preliminary += " Other work shared the CPU during the run (see the load average): the figures are rough."
    lines.append(
        f"Measured by `nanogpt-mlx bench` on {hw} ({results['device']}, {results['machine']['blas']} BLAS), {date}, load average "
        f"{load(results.get('load_average_before'))} before, {load(results.get('load_average_after'))} after; "
        f"full report with every figure, spread, peer and plot: [{link}]({link}).{preliminary}"
    )
    lines.append("")
    if results.get("inference", {}).get("ours"):
        rows = []
        for r in card_rows(results):
            summ = r["ours"]
            if not summ or not summ.get("n"):
                continue
            value = summ.get(r.get("stat", "median"))
            rows.append([r["figure"].strip(), num(value, 1), num(r["card"], 1) if r["card"] is not None else "–"])
        tr = results.get("training")
        if tr:
            rows.append(["size on disk, fp32 / fp16 (MB)", f"{tr['size_fp32_mb']:.0f} / {tr['size_fp16_mb']:.0f}", "–"])
        lines += [table(["the card's figures (median)", f"ours ({hw})", f"card ({card['hardware']})"], rows), ""]
    srv = results.get("server")
    if srv:
        names = list(srv["servers"])
        rows = []
        for c in srv["levels"]:
            row = [str(c)]
            for n in names:
                lv = srv["servers"][n]["levels"].get(str(c))
                if not lv:
                    row.append("–")
                    continue
                md = lv["median"]
                cell = f"{num(md['output_tok_s'], 1)} tok/s, TTFT p95 {num(1e3 * md['ttft_p95_s'])} ms"
                if n != "nanogpt-mlx":
                    cell += f" ({ratio(srv['ratios'][n][str(c)]['output_tok_s'])})"
                row.append(cell)
            rows.append(row)
        lines += [
            f"Streaming server, {srv['max_tokens']}-token completions, unique prompts (peers: × our throughput):",
            "",
            table(["clients"] + names, rows),
            "",
        ]
    lim = results.get("limits")
    if lim and lim.get("figures"):
        pick = {r["figure"]: r for r in lim["figures"] if r["who"] == "ours"}
        parts = [
            f"{r['figure']} {r['pct_of_bandwidth'] if r['kind'] == 'decode' else r['pct_of_compute']:.0f} % of "
            f"{'bandwidth' if r['kind'] == 'decode' else 'GEMM peak'}"
            for r in pick.values()
        ]
        lines += [
            f"Limits measured here: {lim['bandwidth_gb_s']:.0f} GB/s read bandwidth, {lim['gemm_gflops']:.0f} GFLOP/s fp32 GEMM; ours: "
            + "; ".join(parts)
            + ".",
            "",
        ]
    lines.append(END)
    return "\n".join(lines)


def update_readme(results_path: Path, readme: Path = README) -> Path:
    """Rewrite the text between the markers in `readme` from `results_path`."""
    results_path = Path(results_path)
    results = json.loads(results_path.read_text())
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{readme} needs exactly one {BEGIN} ... {END} pair")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text(readme, head + readme_section(results, results_path.resolve(), readme.resolve()) + tail)
    return readme


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="nanogpt-mlx bench report",
        description="Redo report.md and the plots from a results.json; optionally rewrite README.md's generated performance section.",
    )
    p.add_argument("--results", type=Path, help="a results.json (default: the newest full run under benchmarks/results/)")
    p.add_argument("--update-readme", action="store_true", help=f"rewrite the README's text between {BEGIN} and {END}")
    p.add_argument("--readme", type=Path, default=README, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from nanogpt_mlx.errors import UserError

    try:
        path = args.results or latest_results()
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from exc
    write_outputs(results, Path(path).parent)
    print(f"wrote {Path(path).parent}/report.md and plots")
    if args.update_readme:
        try:
            update_readme(Path(path), args.readme)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        print(f"updated {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
