"""Constrained decoding side by side: the per-step cost of token masks for GPT-2's 50,257-token
vocabulary with llguidance, xgrammar and outlines-core, at 1 and 32 rows.

    python -m nanogpt_mlx.benchmarks.structured_mask                 # 3 rounds, a minute or two
    python -m nanogpt_mlx.benchmarks.structured_mask --rows 1 8 32 --steps 200 --rounds 5
    python -m nanogpt_mlx.benchmarks.structured_mask --libraries llguidance xgrammar

A benchmark, not a test (CI does not run it). Each library gets its tokenizer description from the
server's own offline tiktoken encoding (model/tokenizer.py) and compiles the same JSON schemas
(flat and nested objects, arrays, enums, bounded numbers, optional fields, `$ref`). Each row walks
a valid instance of its schema token by token (compact JSON as GPT-2 tokenizes it, then
<|endoftext|>, then it starts over with a fresh matcher); the rows start at different schemas and
offsets, so a step mixes grammar states as a real batch does. One step, timed in three parts:

- mask:    the library fills each row's bitmask (one int32 word per 32 tokens) for the next token;
- apply:   each bitmask is applied to its float32 logits row (the server's own
           `apply_token_bitmask`, the same for every library);
- advance: each row's matcher takes the row's token.

With more than one row, libraries with a batch call (llguidance's `LLExecutor`, xgrammar's
`BatchGrammarMatcher`, both on a thread pool) are also timed that way ("batched"). Reports per
library and row count the mean of each part per step in process CPU time (median over rounds;
on a shared machine CPU time is what other processes do not inflate), the whole step per row, and
the step's wall time; plus the one-off costs: the tokenizer description and the schemas' compile
times.
The libraries alternate within each round, so a noisy machine hits them alike.

Writes `structured_mask.json` (every figure, the machine, the load average before and after) and
`structured_mask.md` (the table) into `benchmarks/results/<machine-id>/` (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from nanogpt_mlx.atomic import write_json, write_text
from nanogpt_mlx.benchmarks.machine import describe_machine, machine_id
from nanogpt_mlx.model.tokenizer import EOT_ID, get_tokenizer
from nanogpt_mlx.server.structured import JSON_WHITESPACE, apply_token_bitmask

LIBRARIES = ("llguidance", "xgrammar", "outlines-core")

# (schema, a valid instance): what the rows walk through.
WORKLOAD: list[tuple[dict, object]] = [
    (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36},
    ),
    (
        {
            "type": "object",
            "properties": {
                "id": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
                "status": {"enum": ["draft", "published", "archived"]},
            },
            "required": ["id", "tags", "status"],
            "additionalProperties": False,
        },
        {"id": 48213, "tags": ["science", "history", "mathematics"], "status": "published"},
    ),
    (
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                    "required": ["x", "y"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}, "label": {"type": "string"}},
            "required": ["start", "end"],
            "additionalProperties": False,
        },
        {"start": {"x": 1.5, "y": -2.25}, "end": {"x": 10, "y": 3.125}, "label": "diagonal"},
    ),
    (
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 40},
                "rating": {"type": "number", "minimum": 0, "maximum": 5},
                "reviews": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"user": {"type": "string"}, "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
                        "required": ["user", "stars"],
                        "additionalProperties": False,
                    },
                },
                "in_stock": {"type": "boolean"},
            },
            "required": ["title", "rating", "reviews", "in_stock"],
            "additionalProperties": False,
        },
        {
            "title": "The Structure of Scientific Revolutions",
            "rating": 4.5,
            "reviews": [{"user": "kuhnfan", "stars": 5}, {"user": "popper", "stars": 2}],
            "in_stock": True,
        },
    ),
    (
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "country": {"type": "string", "enum": ["France", "Japan", "Brazil", "Kenya"]},
                "population": {"type": "integer", "minimum": 0},
                "coordinates": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2},
                "nickname": {"type": ["string", "null"]},
            },
            "required": ["city", "country", "population", "coordinates", "nickname"],
            "additionalProperties": False,
        },
        {"city": "Kyoto", "country": "Japan", "population": 1463723, "coordinates": [35.0116, 135.7681], "nickname": None},
    ),
    (
        {
            "type": "object",
            "properties": {
                "order": {
                    "type": "object",
                    "properties": {
                        "items": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                                "required": ["sku", "qty"],
                                "additionalProperties": False,
                            },
                        },
                        "total": {"type": "number"},
                    },
                    "required": ["items", "total"],
                    "additionalProperties": False,
                },
                "note": {"type": "string"},
            },
            "required": ["order"],
            "additionalProperties": False,
        },
        {"order": {"items": [{"sku": "A-1001", "qty": 2}, {"sku": "B-77", "qty": 1}], "total": 59.9}, "note": "leave at the door"},
    ),
]


def instance_tokens(encoding, instance) -> list[int]:
    return encoding.encode(json.dumps(instance, separators=(",", ":"))) + [EOT_ID]


# --- one adapter per library: build(schema) -> compiled; matcher(compiled) -> m; fill(m, mask row); advance(m, token)
class Llguidance:
    name = "llguidance"

    def __init__(self, encoding, vocab_size: int):
        import llguidance
        from llguidance.tiktoken import lltokenizer_from_encoding

        self.llg = llguidance
        self.tokenizer = lltokenizer_from_encoding(encoding, n_vocab=vocab_size, eos_token=EOT_ID)
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_WHITESPACE})
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, bitmask: np.ndarray, row: int) -> None:
        matcher.unsafe_compute_mask_ptr(bitmask[row].ctypes.data, bitmask.shape[1] * 4)

    def fill_batch(self, matchers, bitmask: np.ndarray) -> None:
        rows = [(m, i) for i, m in enumerate(matchers)]
        self.executor.unsafe_compute_mask_ptr(rows, bitmask.ctypes.data, bitmask.shape[1] * 4, len(bitmask))

    def advance(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, encoding, vocab_size: int):
        import torch
        import xgrammar

        self.xgr, self.torch = xgrammar, torch
        vocab = [encoding.decode_single_token_bytes(t) for t in range(encoding.n_vocab)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[EOT_ID])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=os.cpu_count() or 1, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, max_whitespace_cnt=20)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask: np.ndarray, row: int) -> None:
        matcher.fill_next_token_bitmask(self.torch.from_numpy(bitmask), row)

    def fill_batch(self, matchers, bitmask: np.ndarray) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, self.torch.from_numpy(bitmask))

    def advance(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)


class OutlinesCore:
    name = "outlines-core"
    fill_batch = None

    def __init__(self, encoding, vocab_size: int):
        import outlines_core

        self.oc = outlines_core
        tokens: dict[bytes, list[int]] = {}
        for t in range(encoding.n_vocab):
            if t != EOT_ID:
                tokens.setdefault(encoding.decode_single_token_bytes(t), []).append(t)
        self.vocabulary = outlines_core.Vocabulary(EOT_ID, tokens)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, bitmask: np.ndarray, row: int) -> None:
        matcher.write_mask_into(bitmask[row].ctypes.data, bitmask.shape[1], 4)

    def advance(self, matcher, token: int) -> None:
        if token == EOT_ID and matcher.is_finished():  # its final states have no transition on EOS
            return
        matcher.advance(token, return_tokens=False)


ADAPTERS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}


class Rows:
    """`rows` matchers walking the workload's instances, each from its own schema and offset."""

    def __init__(self, lib, compiled: list, walks: list[list[int]], rows: int):
        self.lib, self.compiled, self.walks = lib, compiled, walks
        self.which = [r % len(walks) for r in range(rows)]
        self.pos = [0] * rows
        self.matchers = [lib.matcher(compiled[w]) for w in self.which]
        for r in range(rows):  # desynchronize: row r starts some tokens into its instance
            for _ in range((r // len(walks)) * 3 % (len(walks[self.which[r]]) - 1)):
                self._step_row(r)

    def tokens(self) -> list[int]:
        return [self.walks[w][p] for w, p in zip(self.which, self.pos)]

    def _step_row(self, r: int) -> None:
        walk = self.walks[self.which[r]]
        self.lib.advance(self.matchers[r], walk[self.pos[r]])
        self.pos[r] += 1
        if self.pos[r] == len(walk):  # the instance and its EOS are done: the next one
            self.which[r] = (self.which[r] + 1) % len(self.walks)
            self.pos[r] = 0
            self.matchers[r] = self.lib.matcher(self.compiled[self.which[r]])

    def advance_all(self) -> None:
        for r in range(len(self.matchers)):
            self._step_row(r)


PARTS = ("mask", "apply", "advance")


def measure(lib, compiled, walks, rows: int, steps: int, vocab_size: int, batched: bool, seed: int) -> dict[str, float]:
    """Mean seconds per step of each part over `steps` steps: process CPU time (`mask`, `apply`,
    `advance`: what another process sharing the cores does not inflate; a thread pool's workers
    count too) and the wall time of the whole step (`wall`)."""
    state = Rows(lib, compiled, walks, rows)
    bitmask = np.full((rows, (vocab_size + 31) // 32), -1, dtype=np.int32)
    logits = np.random.default_rng(seed).standard_normal((rows, vocab_size)).astype(np.float32)
    work = np.empty_like(logits)
    totals = dict.fromkeys((*PARTS, "wall"), 0.0)
    for _ in range(steps):
        np.copyto(work, logits)
        expected = state.tokens()
        w0, c0 = time.perf_counter(), time.process_time()
        if batched:
            lib.fill_batch(state.matchers, bitmask)
        else:
            for r, m in enumerate(state.matchers):
                lib.fill(m, bitmask, r)
        c1 = time.process_time()
        for r in range(rows):
            apply_token_bitmask(work[r], bitmask[r])
        c2 = time.process_time()
        state.advance_all()
        c3, w3 = time.process_time(), time.perf_counter()
        for r, token in enumerate(expected):  # each row's walk is what its mask allows
            assert np.isfinite(work[r, token]), f"{lib.name}: token {token} masked out on row {r}"
        totals["mask"] += c1 - c0
        totals["apply"] += c2 - c1
        totals["advance"] += c3 - c2
        totals["wall"] += w3 - w0
    return {k: v / steps for k, v in totals.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    p.add_argument("--rows", nargs="+", type=int, default=[1, 32])
    p.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results/<machine-id>/)")
    args = p.parse_args(argv)
    out_dir = args.out or Path(__file__).resolve().parent / "results" / machine_id()
    load_before = os.getloadavg()

    encoding = get_tokenizer()
    vocab_size = encoding.n_vocab
    walks = [instance_tokens(encoding, instance) for _, instance in WORKLOAD]
    lengths = [len(w) for w in walks]
    print(f"vocabulary {vocab_size} tokens, {len(WORKLOAD)} schemas, walks of {lengths} tokens; load {os.getloadavg()[0]:.2f}")

    libs, one_off = {}, {}
    for name in list(args.libraries):
        t0 = time.perf_counter()
        try:
            lib = ADAPTERS[name](encoding, vocab_size)
        except ImportError as exc:
            print(f"{name:14s} skipped: {exc} (pip install -e .[structured-bench])")
            args.libraries.remove(name)
            continue
        t1 = time.perf_counter()
        compile_times, compiled = [], []
        for schema, _ in WORKLOAD:
            c0 = time.perf_counter()
            compiled.append(lib.compile(schema))
            compile_times.append(time.perf_counter() - c0)
        libs[name] = (lib, compiled)
        median, worst = 1e3 * statistics.median(compile_times), 1e3 * max(compile_times)
        one_off[name] = {"tokenizer_s": t1 - t0, "compile_ms_median": median, "compile_ms_max": worst}
        print(f"{name:14s} tokenizer {t1 - t0:.2f} s; schema compile median {median:.1f} ms, max {worst:.1f} ms (wall)")

    modes = [(name, rows, False) for rows in args.rows for name in args.libraries]
    modes += [(name, rows, True) for rows in args.rows if rows > 1 for name in args.libraries if ADAPTERS[name].fill_batch is not None]
    results: dict[tuple, list[dict]] = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        order = modes if round_ % 2 == 0 else modes[::-1]
        for name, rows, batched in order:
            lib, compiled = libs[name]
            results[(name, rows, batched)].append(measure(lib, compiled, walks, rows, args.steps, vocab_size, batched, seed=round_))

    print(f"\nmicroseconds per step: CPU time of each part and of the step, wall time of the step; "
          f"means of {args.steps} steps, median of {args.rounds} rounds; load {os.getloadavg()[0]:.2f}")
    header = ("mask", "apply", "advance", "step CPU", "per row", "step wall")
    print(f"{'library':14s} {'rows':>4s} {'mode':>8s} " + " ".join(f"{h:>9s}" for h in header))
    table = []
    for name, rows, batched in modes:
        figures = {k: 1e6 * statistics.median(r[k] for r in results[(name, rows, batched)]) for k in (*PARTS, "wall")}
        step = sum(figures[k] for k in PARTS)
        mode = "batched" if batched else "per-row"
        table.append({"library": name, "rows": rows, "mode": mode, **figures, "step_cpu": step, "per_row_cpu": step / rows})
        cells = " ".join(f"{v:9.1f}" for v in (figures["mask"], figures["apply"], figures["advance"], step, step / rows, figures["wall"]))
        print(f"{name:14s} {rows:4d} {mode:>8s} {cells}")
    machine = describe_machine()
    results = {"command": "python -m nanogpt_mlx.benchmarks.structured_mask " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine, "load_before": load_before, "load_after": os.getloadavg(),
               "rounds": args.rounds, "steps": args.steps, "one_off": one_off, "per_step_us": table}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "structured_mask.json", results)
    write_text(out_dir / "structured_mask.md", markdown(results))
    print(f"\nwrote {out_dir / 'structured_mask.json'} and structured_mask.md")
    return 0


def markdown(results: dict) -> str:
    """The report: one row per library, the per-row mask at 1 and at the widest row count, the
    whole step, and the cost per token of a 50-token output with the schema compile spread over it."""
    machine, table = results["machine"], results["per_step_us"]
    widest = max(r["rows"] for r in table)
    load = " / ".join(f"{x:.1f}" for x in results["load_before"]), " / ".join(f"{x:.1f}" for x in results["load_after"])
    lines = [
        "# Structured output: token-mask cost per step",
        "",
        f"`{results['command'].strip()}` on {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; "
        f"load average {load[0]} before, {load[1]} after. {results['rounds']} rounds of {results['steps']} steps; "
        "CPU time in µs, means of the steps, medians of the rounds (the step's wall time in the JSON).",
        "",
        f"| library | token trie (s) | schema compile, median / max (ms) | mask, 1 row | mask, {widest} rows | "
        f"step (mask + apply + advance), 1 / {widest} rows | per token of a 50-token output, compile included |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, once in results["one_off"].items():
        one, wide = (
            next((r for r in table if (r["library"], r["rows"], r["mode"]) == (name, rows, "per-row")), None) for rows in (1, widest)
        )
        if one is None or wide is None:
            continue
        per_token = one["step_cpu"] + 1e3 * once["compile_ms_median"] / 50
        lines.append(
            f"| {name} | {once['tokenizer_s']:.1f} | {once['compile_ms_median']:.1f} / {once['compile_ms_max']:.1f} | "
            f"{one['mask']:.0f} | {wide['mask']:.0f} ({wide['mask'] / widest:.0f} a row) | "
            f"{one['step_cpu']:.0f} / {wide['step_cpu']:.0f} | {per_token:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
