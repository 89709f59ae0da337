"""`nanogpt-mlx bench`: the card's table, the engine, the server under load, the peers and the machine's limits, in one run.

    nanogpt-mlx bench                                   # everything at the default sizes
    nanogpt-mlx bench --only card,engine --runs 30      # some sections
    nanogpt-mlx bench --only server,peers --levels 1 8 32 --rounds 3
    nanogpt-mlx bench --smoke --out /tmp/b              # seconds: a tiny model, every code path
    nanogpt-mlx bench --device gpu                      # Metal / CUDA; peers that do not exist there are skipped

Writes `results.json` (every figure, the raw timings behind the card's, the machine, the sizes),
`report.md` and PNG plots into `benchmarks/results/<machine-id>/` (or `--out`). Each measurement
runs in a fresh subprocess (workloads.py, peer_torch.py) or against a server process
(servers.py); ours and the peers alternate round by round (ours, peers, then the peers in reverse,
then ours) so the drift of a shared machine falls on all alike. Every peer figure is also given
as a ratio to ours (peer / ours). A peer that is missing, or does not exist on the device, is
recorded as skipped with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from nanogpt_mlx.benchmarks import stats
from nanogpt_mlx.benchmarks.machine import describe_machine, load_average, machine_id

HERE = Path(__file__).resolve().parent
RESULTS_ROOT = HERE / "results"
SECTIONS = ("card", "engine", "server", "prefix-cache", "peers", "limits")
PEERS = ("llama-server", "mlx-lm", "transformers")
GREEDY_PROMPTS = ("The meaning of life is", "In the beginning God created", "Once upon a time, in a small village,")
SCHEMA = 1

# The original model card's figures (Apple M2 Pro), decoded in ../shared/README.md: its forward
# pass had dropout on, and its generation used no KV cache. Sizes and evaluation speed it did not give.
CARD = {
    "hardware": "Apple M2 Pro",
    "params": 53_000_000,
    "forward_tok_s": 25_476,
    "forward_latency_ms": {"mean": 161, "p95": 172, "p99": 179},
    "generation_tok_s": 157.5,
    "train_tok_s": 7_000,
    "notes": "forward 8x512 with dropout on (train mode); generation 50 + 100 greedy tokens without a KV cache",
}

CARD_MODEL = {"vocab_size": 50257, "block_size": 512, "n_layer": 8, "n_head": 8, "n_embd": 384, "n_inner": 1536, "tie_embeddings": False}
SMOKE_MODEL = {"vocab_size": 50257, "block_size": 128, "n_layer": 2, "n_head": 2, "n_embd": 64, "n_inner": 256, "tie_embeddings": False}


@dataclass
class Sizes:
    """How much each section measures; the defaults are the card's definitions."""

    runs: int = 20  # timed runs of each card figure (after warm-up), split over the rounds
    warmup: int = 2
    rounds: int = 2  # alternations of ours and the peers
    forward_batch: int = 8
    forward_seq: int = 512
    prompt_tokens: int = 50
    gen_tokens: int = 100
    prefill_tokens: int = 512
    train_batch: int = 12
    train_seq: int = 512
    train_steps: int = 20
    eval_batch: int = 8
    eval_seq: int = 512
    eval_runs: int = 20
    decode_rows: list[int] = field(default_factory=lambda: [1, 8, 32])
    decode_position: int = 100
    decode_steps: int = 30
    batched_prefill_rows: int = 32
    batched_prefill_tokens: int = 41
    levels: list[int] = field(default_factory=lambda: [1, 4, 16, 32, 64])
    max_tokens: int = 128
    requests_per_client: int = 2
    min_requests: int = 8  # per level: low concurrency sends more requests per client to reach it
    greedy_tokens: int = 32
    # prefix-cache workloads (benchmarks/prefix_cache.py) on the bundled checkpoint, cache on vs off
    prefix_concurrency: int = 8
    prefix_documents: int = 8
    prefix_sessions: int = 8
    prefix_turns: int = 4
    prefix_unique_requests: int = 32
    bandwidth_n: int = 8192  # an n x n fp32 matrix streamed by a matrix-vector product (256 MiB)
    gemm_sizes: list[int] = field(default_factory=lambda: [1024, 2048])
    limit_runs: int = 5
    model: dict = field(default_factory=lambda: dict(CARD_MODEL))

    @classmethod
    def smoke(cls) -> Sizes:
        """Every code path in seconds: a tiny model, 2-3 runs of everything."""
        return cls(
            runs=2,
            warmup=1,
            rounds=1,
            forward_batch=2,
            forward_seq=32,
            prompt_tokens=8,
            gen_tokens=8,
            prefill_tokens=32,
            train_batch=2,
            train_seq=32,
            train_steps=2,
            eval_batch=2,
            eval_seq=32,
            eval_runs=2,
            decode_rows=[1, 4],
            decode_position=16,
            decode_steps=3,
            batched_prefill_rows=4,
            batched_prefill_tokens=8,
            levels=[1, 2],
            max_tokens=8,
            requests_per_client=1,
            min_requests=2,
            greedy_tokens=8,
            prefix_concurrency=2,
            prefix_documents=1,
            prefix_sessions=1,
            prefix_turns=2,
            prefix_unique_requests=2,
            bandwidth_n=1024,
            gemm_sizes=[256],
            limit_runs=2,
            model=dict(SMOKE_MODEL),
        )


class WorkerError(RuntimeError):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the suite (`nanogpt-mlx bench` with no NAME, or `bench suite`)")
    g.add_argument("--only", help=f"comma-separated sections to run ({','.join(SECTIONS)}; default: all)")
    g.add_argument("--skip", help="comma-separated sections to leave out")
    g.add_argument("--peers", help=f"comma-separated peers to include ({','.join(PEERS)}; default: all that are installed)")
    g.add_argument("--device", choices=["auto", "cpu", "gpu"], default="cpu", help="where MLX runs (gpu: Metal / CUDA)")
    g.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<machine-id>/)")
    g.add_argument("--smoke", action="store_true", help="a tiny model and 2 runs of everything: checks the suite, measures nothing")
    g.add_argument(
        "--cache", type=Path, help="where the random weights and GGUF files are kept between runs (default: ~/.cache/nanogpt-mlx/bench)"
    )
    g.add_argument(
        "--checkpoint", type=Path, help="the trained checkpoint the peers' greedy output is checked on (default: the bundled one)"
    )
    g.add_argument(
        "--weights",
        choices=("random", "checkpoint"),
        default="random",
        help="what every figure runs on: random weights of the card's shape (the default), or the --checkpoint "
        "(the bundled one by default; llama-server gets it as GGUF, mlx-lm as its own variant)",
    )
    g.add_argument(
        "--update-readme", action="store_true", help="afterwards, rewrite README.md's generated performance section from these results"
    )
    for f in fields(Sizes):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("decode_rows", "levels", "gemm_sizes"):
            g.add_argument(flag, type=int, nargs="+", help=f"default {Sizes().__getattribute__(f.name)}")
        else:
            g.add_argument(flag, type=int, help=f"default {Sizes().__getattribute__(f.name)}")


def sizes_from_args(args) -> Sizes:
    sizes = Sizes.smoke() if args.smoke else Sizes()
    for f in fields(Sizes):
        value = getattr(args, f.name, None)
        if f.name != "model" and value is not None:
            setattr(sizes, f.name, value)
    for name in ("runs", "rounds", "gen_tokens", "prefill_tokens", "max_tokens"):
        if getattr(sizes, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if sizes.prompt_tokens + sizes.gen_tokens > sizes.model["block_size"]:
        raise ValueError(f"--prompt-tokens + --gen-tokens exceed the context ({sizes.model['block_size']})")
    for name in ("forward_seq", "prefill_tokens", "train_seq", "eval_seq"):
        if getattr(sizes, name) > sizes.model["block_size"]:
            raise ValueError(f"--{name.replace('_', '-')} exceeds the context ({sizes.model['block_size']})")
    return sizes


def parse_list(text: str | None, allowed: tuple[str, ...], what: str) -> list[str] | None:
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in items if x not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}: choose from {', '.join(allowed)}")
    return items


# --- workers ------------------------------------------------------------------------------------
def run_worker(name: str, params: dict, torch_peer: bool = False) -> dict:
    """Run one workload in a fresh process and return its JSON result (WorkerError with its stderr if it fails)."""
    if torch_peer:
        command = [sys.executable, str(HERE / "peer_torch.py"), name, json.dumps(params)]
    else:
        command = [sys.executable, "-m", "nanogpt_mlx.benchmarks.workloads", name, json.dumps(params)]
    proc = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise WorkerError(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


# --- peers ----------------------------------------------------------------------------------------
def check_peers(wanted: list[str], device: str) -> dict[str, dict]:
    """Which peers can run here: {name: {"status": "ready"|"skipped", "reason"/"how", "version"}}."""
    from nanogpt_mlx.benchmarks.llama_cpp import binary_version, find_llama_server
    from nanogpt_mlx.benchmarks.machine import library_versions

    versions = library_versions()
    out: dict[str, dict] = {}
    for name in PEERS:
        if name not in wanted:
            out[name] = {"status": "skipped", "reason": "not selected (--peers)"}
        elif name == "llama-server":
            binary, how = find_llama_server()
            if binary is None:
                out[name] = {"status": "skipped", "reason": how}
                continue
            entry = {"status": "ready", "binary": str(binary), "how": how, "version": binary_version(binary)}
            if device == "gpu":
                listed = subprocess.run([str(binary), "--list-devices"], capture_output=True, text=True, timeout=60)
                if not any(k in listed.stdout + listed.stderr for k in ("CUDA", "Metal", "MTL")):
                    entry = {
                        "status": "skipped",
                        "reason": "this llama-server was built without Metal / CUDA (rebuild: bench build-llama-server --cuda)",
                    }
            out[name] = entry
        elif name == "mlx-lm":
            if importlib.util.find_spec("mlx_lm") is None:
                out[name] = {"status": "skipped", "reason": "mlx-lm is not installed (pip install 'nanogpt-mlx[bench]')"}
            else:
                out[name] = {
                    "status": "ready",
                    "version": versions.get("mlx-lm", "?"),
                    "how": "with nanogpt-mlx's CPU runtime prepared (BLAS, FTZ/DAZ, malloc); its GPT-2 ties the LM head to the embedding",
                }
        elif name == "transformers":
            missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
            if missing:
                out[name] = {"status": "skipped", "reason": f"{' and '.join(missing)} not installed (pip install torch transformers)"}
                continue
            out[name] = {
                "status": "ready",
                "version": f"transformers {versions.get('transformers', '?')}, torch {versions.get('torch', '?')}",
                "how": "a plain process (no nanogpt-mlx runtime), fp32, torch's default threads",
            }
            if device == "gpu":
                probe = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        "import torch; print(torch.cuda.is_available() or "
                        "(getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available()))",
                    ],
                    capture_output=True,
                    text=True,
                )
                if probe.stdout.strip() != "True":
                    out[name] = {"status": "skipped", "reason": "torch has no CUDA or MPS device here"}
    return out


# --- the run --------------------------------------------------------------------------------------
class Suite:
    def __init__(self, args, sizes: Sizes, sections: list[str], peers: dict[str, dict], device: str, out_dir: Path):
        self.args = args
        self.sizes = sizes
        self.sections = sections
        self.peers = peers
        self.device = device
        self.out_dir = out_dir
        self.cache = args.cache or cache_dir()
        self.results: dict = {}
        self.progress = None

    # progress ---------------------------------------------------------------------------------
    def step(self, label: str):
        if self.progress is not None:
            self.progress.set_postfix_str(label)
        return _Step(self, label)

    def note(self, text: str) -> None:
        self.results.setdefault("notes", []).append(text)
        if self.progress is not None:
            self.progress.write(f"note: {text}")

    def ready(self, peer: str) -> bool:
        return self.peers[peer]["status"] == "ready"

    def peer_failed(self, peer: str, exc: Exception) -> None:
        self.peers[peer] = {**self.peers[peer], "status": "failed", "reason": str(exc)[-1500:]}
        self.note(f"{peer} failed: {stats.one_line(str(exc))}")

    # the weights ------------------------------------------------------------------------------
    def prepare_weights(self) -> None:
        s = self.sizes
        if getattr(self.args, "weights", "random") == "checkpoint":
            from dataclasses import asdict

            from nanogpt_mlx.errors import UserError
            from nanogpt_mlx.model.checkpoint import load_config

            hf, base = self.greedy_checkpoint()
            with self.step("checkpoint weights"):
                config = asdict(load_config(hf))
                differs = {k: config[k] for k, v in s.model.items() if config[k] != v}
                if differs:
                    raise UserError(f"{hf} is not of the sizes' model shape ({differs}); --weights checkpoint needs one that is")
        else:
            with self.step("random weights"):
                hf, base = random_weights(self.cache, s.model)
        self.model_dir = hf
        self.gguf = self.mlx_lm_dir = None
        peers = "peers" in self.sections
        if peers and self.ready("llama-server"):
            with self.step("GGUF"):
                try:
                    self.gguf = ensure_gguf(hf, base / "gguf-f32")
                except WorkerError as exc:
                    self.peer_failed("llama-server", exc)
        if peers and self.ready("mlx-lm"):
            with self.step("mlx-lm weights"):
                try:
                    self.mlx_lm_dir = ensure_mlx_lm_variant(hf, base / "mlx-lm")
                except WorkerError as exc:
                    self.peer_failed("mlx-lm", exc)
        if getattr(self.args, "weights", "random") == "checkpoint":
            self.results["weights"] = {"checkpoint": {"dir": str(hf)}}
        else:
            self.results["weights"] = {"random": {"config": s.model, "seed": 0, "dir": str(hf)}}

    # sections ---------------------------------------------------------------------------------
    def inference_rounds(self) -> None:
        """The card's inference figures for ours, alternating with the in-process peers."""
        s = self.sizes
        impls = ["ours"]
        if "peers" in self.sections:
            impls += [p for p in ("transformers", "mlx-lm") if self.ready(p)]
        per_round = max(1, math.ceil(s.runs / s.rounds))
        common = {k: getattr(s, k) for k in ("warmup", "forward_batch", "forward_seq", "prompt_tokens", "gen_tokens", "prefill_tokens")}
        common.update(runs=per_round, device=self.device, vocab_size=s.model["vocab_size"])
        raw: dict[str, dict[str, list[float]]] = {impl: {} for impl in impls}
        for r in range(s.rounds):
            order = impls if r % 2 == 0 else [*impls[:0:-1], impls[0]] if len(impls) > 1 else impls
            for impl in order:
                if impl != "ours" and not self.ready(impl):
                    continue
                with self.step(f"inference {impl} (round {r + 1}/{s.rounds})"):
                    try:
                        if impl == "ours":
                            out = run_worker("ours_inference", {**common, "model_dir": str(self.model_dir)})
                        elif impl == "transformers":
                            out = run_worker("inference", {**common, "model_dir": str(self.model_dir)}, torch_peer=True)
                        else:
                            out = run_worker("mlx_lm_inference", {**common, "model_dir": str(self.mlx_lm_dir)})
                    except WorkerError as exc:
                        if impl == "ours":
                            raise
                        self.peer_failed(impl, exc)
                        continue
                for k in ("forward_s", "generation_s", "prefill_s"):
                    raw[impl].setdefault(k, []).extend(out[k])
        figures = {}
        tokens_fwd = s.forward_batch * s.forward_seq
        for impl, samples in raw.items():
            if not samples:
                continue
            figures[impl] = {
                "forward_tok_s": stats.rate_summary(tokens_fwd, samples["forward_s"]),
                "forward_latency_ms": stats.summarize([1e3 * t for t in samples["forward_s"]]),
                "generation_tok_s": stats.rate_summary(s.gen_tokens, samples["generation_s"]),
                "prefill_tok_s": stats.rate_summary(s.prefill_tokens, samples["prefill_s"]),
            }
        self.results["inference"] = figures
        ours = figures["ours"]
        self.results["inference_ratios"] = {
            impl: {k: f[k]["median"] / ours[k]["median"] for k in f} for impl, f in figures.items() if impl != "ours"
        }

    def training(self) -> None:
        s = self.sizes
        with self.step("training and evaluation"):
            out = run_worker(
                "ours_training",
                {
                    "model_dir": str(self.model_dir),
                    "device": self.device,
                    "warmup": min(s.warmup, 1) if s.train_steps else 0,
                    "train_batch": s.train_batch,
                    "train_seq": s.train_seq,
                    "train_steps": s.train_steps,
                    "eval_batch": s.eval_batch,
                    "eval_seq": s.eval_seq,
                    "eval_runs": s.eval_runs,
                },
            )
        self.results["training"] = {
            "params": out["params"],
            "size_fp32_mb": out["size_float32_bytes"] / 1e6,
            "size_fp16_mb": out["size_float16_bytes"] / 1e6,
            "train_tok_s": stats.rate_summary(s.train_batch * s.train_seq, out.get("train_s", [])),
            "train_step_s": stats.summarize(out.get("train_s", [])),
            "train_peak_memory_gb": out.get("train_peak_memory_gb"),
            "eval_tok_s": stats.rate_summary(s.eval_batch * s.eval_seq, out.get("eval_s", [])),
        }

    def engine(self) -> None:
        s = self.sizes
        with self.step("engine (ModelRunner)"):
            out = run_worker(
                "ours_engine",
                {
                    "model_dir": str(self.model_dir),
                    "device": self.device,
                    "warmup": s.warmup,
                    "runs": s.runs,
                    "decode_rows": s.decode_rows,
                    "decode_position": s.decode_position,
                    "decode_steps": s.decode_steps,
                    "prefill_tokens": s.prefill_tokens,
                    "batched_prefill_rows": s.batched_prefill_rows,
                    "batched_prefill_tokens": s.batched_prefill_tokens,
                },
            )
        self.results["engine"] = {
            "decode": {
                rows: {"tok_s": stats.rate_summary(int(rows), t), "step_ms": stats.summarize([1e3 * x for x in t])}
                for rows, t in out["decode_s"].items()
            },
            "prefill": {
                "tok_s": stats.rate_summary(s.prefill_tokens, out["prefill_s"]),
                "ms": stats.summarize([1e3 * x for x in out["prefill_s"]]),
            },
            "batched_prefill": {
                "tok_s": stats.rate_summary(s.batched_prefill_rows * s.batched_prefill_tokens, out["batched_prefill_s"]),
                "ms": stats.summarize([1e3 * x for x in out["batched_prefill_s"]]),
            },
        }

    def limits(self) -> None:
        s = self.sizes
        with self.step("limits"):
            out = run_worker(
                "limits", {"device": self.device, "bandwidth_n": s.bandwidth_n, "gemm_sizes": s.gemm_sizes, "limit_runs": s.limit_runs}
            )
        bandwidth = {lib: out["bandwidth_bytes"] / min(t) / 1e9 for lib, t in out["gemv_s"].items()}
        gemm = {f"{lib} {n}": 2 * int(n) ** 3 / min(t) / 1e9 for n, by_lib in out["gemm_s"].items() for lib, t in by_lib.items()}
        self.results["limits"] = {
            "bandwidth_gb_s": max(bandwidth.values()),
            "bandwidth_gb_s_by_library": bandwidth,
            "gemm_gflops": max(gemm.values()),
            "gemm_gflops_by_size": gemm,
        }

    def prefix_cache(self) -> None:
        """The prefix-cache workloads (benchmarks/prefix_cache.py): lm-eval-like, few-shot,
        multi-turn chat and unique prompts on two servers, cache on and off, alternating, on the
        bundled checkpoint (its context holds the 300-token contexts; a smoke run sends few requests)."""
        from nanogpt_mlx.benchmarks import prefix_cache

        s = self.sizes
        model = prefix_cache.REPO_ROOT / "checkpoints" / "default"
        args = prefix_cache.parser().parse_args(
            ["--model", str(model), "--rounds", str(s.rounds), "--device", self.device, "--max-batch", str(max(s.levels)),
             "--concurrency", str(s.prefix_concurrency), "--documents", str(s.prefix_documents), "--sessions", str(s.prefix_sessions),
             "--turns", str(s.prefix_turns), "--unique-requests", str(s.prefix_unique_requests)]
        )
        with self.step("prefix cache"):
            out = prefix_cache.run(args, say=lambda line: None)
        self.results["prefix_cache"] = {"model": out["model"], "args": out["args"], "summary": out["summary"], "rounds": out["rounds"]}

    def servers(self) -> None:
        """Closed-loop streaming load at each level on every server, alternating, all started once."""
        from nanogpt_mlx.benchmarks import servers as srv
        from nanogpt_mlx.benchmarks.serve_load import run_level

        s = self.sizes
        slots = max(s.levels)
        specs = [srv.ours(self.model_dir, slots, self.device)]
        if "peers" in self.sections:
            if self.ready("llama-server") and self.gguf:
                specs.append(
                    srv.llama_server(Path(self.peers["llama-server"]["binary"]), self.gguf, slots, s.model["block_size"], self.device)
                )
            if self.ready("mlx-lm") and self.mlx_lm_dir:
                specs.append(srv.mlx_lm_server(self.mlx_lm_dir, slots))
        peer_of = {"llama-server": "llama-server", "mlx_lm.server": "mlx-lm"}
        results: dict = {"levels": s.levels, "max_tokens": s.max_tokens, "slots": slots, "servers": {}}
        with tempfile.TemporaryDirectory(prefix="bench-logs-") as logs, contextlib.ExitStack() as stack:
            running = []
            for spec in specs:
                with self.step(f"start {spec.name}"):
                    try:
                        running.append(stack.enter_context(srv.running(spec, Path(logs))))
                    except RuntimeError as exc:
                        if spec.name == "nanogpt-mlx":
                            raise
                        self.peer_failed(peer_of[spec.name], exc)
            samples: dict = {srv_.spec.name: {} for srv_ in running}
            rounds: dict = {srv_.spec.name: {} for srv_ in running}
            for r in range(s.rounds):
                for c in s.levels:
                    order = running if r % 2 == 0 else [*running[:0:-1], running[0]] if len(running) > 1 else running
                    per_client = max(s.requests_per_client, math.ceil(s.min_requests / c))
                    for server in order:
                        name = server.spec.name
                        with self.step(f"{name} c={c} (round {r + 1}/{s.rounds})"):
                            level = asyncio.run(run_level(server.base_url, c, per_client, s.max_tokens, 1.0, keep_samples=True))
                        if server.process.poll() is not None:
                            raise RuntimeError(f"{name} exited during the load; its log ends:\n{server.log_tail()}")
                        pooled = samples[name].setdefault(str(c), {"ttft_s": [], "itl_s": [], "e2e_s": []})
                        for k, v in level.pop("samples").items():
                            pooled[k].extend(v)
                        rounds[name].setdefault(str(c), []).append(level)
                        if level["errors"]:
                            self.note(
                                f"{name} at {c} clients: {level['errors']} of {level['requests']} requests failed "
                                f"(e.g. {level['error_examples'][:1]})"
                            )
        for name, by_level in rounds.items():
            entry = {"levels": {}}
            for c, runs in by_level.items():
                keys = ("output_tok_s", "ttft_p50_s", "ttft_p95_s", "itl_p50_s", "itl_p95_s", "e2e_p95_s", "tpot_mean_s")
                pooled = samples[name][c]
                entry["levels"][c] = {
                    "median": {k: _median([run[k] for run in runs]) for k in keys},
                    "errors": sum(run["errors"] for run in runs),
                    "requests": sum(run["requests"] for run in runs),
                    "rounds": runs,
                    # quantiles 0, 1, ..., 100 of all rounds pooled: enough to redraw the distributions
                    "ttft_ms_quantiles": [1e3 * stats.percentile(pooled["ttft_s"], q) for q in range(101)],
                    "itl_ms_quantiles": [1e3 * stats.percentile(pooled["itl_s"], q) for q in range(101)],
                    "e2e_ms_quantiles": [1e3 * stats.percentile(pooled["e2e_s"], q) for q in range(101)],
                }
            results["servers"][name] = entry
        ours = results["servers"]["nanogpt-mlx"]["levels"]
        results["ratios"] = {
            name: {c: {k: _ratio(lv["median"][k], ours[c]["median"][k]) for k in lv["median"]} for c, lv in entry["levels"].items()}
            for name, entry in results["servers"].items()
            if name != "nanogpt-mlx"
        }
        self.results["server"] = results

    def greedy_check(self) -> None:
        """Do the peers continue the check prompts as ours does (greedy, same weights)? Token by token agreement."""
        from nanogpt_mlx.benchmarks import servers as srv

        s = self.sizes
        check_dir = self.check_dir
        params = {"model_dir": str(check_dir), "device": self.device, "prompts": list(GREEDY_PROMPTS), "greedy_tokens": s.greedy_tokens}
        with self.step("greedy check: ours"):
            reference = run_worker("ours_greedy", params)["continuations"]
        checks: dict = {"checkpoint": str(check_dir), "tokens": s.greedy_tokens, "peers": {}}
        if self.ready("transformers"):
            with self.step("greedy check: transformers"):
                try:
                    theirs = run_worker("greedy", params, torch_peer=True)["continuations"]
                    checks["peers"]["transformers"] = compare_tokens(reference, theirs)
                except WorkerError as exc:
                    self.peer_failed("transformers", exc)
        if self.ready("mlx-lm"):
            with self.step("greedy check: mlx-lm"):
                try:
                    variant = ensure_mlx_lm_variant(check_dir, self.check_cache / "mlx-lm")
                    tied = {**params, "model_dir": str(variant)}
                    ours_tied = run_worker("ours_greedy", tied)["continuations"]
                    theirs = run_worker("mlx_lm_greedy", tied)["continuations"]
                    checks["peers"]["mlx-lm"] = {
                        **compare_tokens(ours_tied, theirs),
                        "note": "on the checkpoint with its LM head tied to the embedding (mlx-lm's GPT-2), ours on the same",
                    }
                except WorkerError as exc:
                    self.peer_failed("mlx-lm", exc)
        if self.ready("llama-server"):
            with self.step("greedy check: llama-server"):
                try:
                    gguf = ensure_gguf(check_dir, self.check_cache / "gguf-f32")
                    spec = srv.llama_server(Path(self.peers["llama-server"]["binary"]), gguf, 1, s.model["block_size"], self.device)
                    with tempfile.TemporaryDirectory(prefix="bench-logs-") as logs, srv.running(spec, Path(logs)) as server:
                        texts = [srv.complete(server.base_url, c["prompt"], s.greedy_tokens) for c in reference]
                    checks["peers"]["llama-server"] = compare_text(reference, texts)
                except (WorkerError, RuntimeError, OSError) as exc:
                    self.peer_failed("llama-server", exc)
        self.results["greedy_check"] = checks

    # driver -----------------------------------------------------------------------------------
    def plan(self) -> int:
        """How many steps `run` will take, for the progress bar."""
        s, sections = self.sizes, set(self.sections)
        peers = "peers" in sections
        n = 1 + (peers and self.ready("llama-server")) + (peers and self.ready("mlx-lm"))  # the weights
        if {"card", "peers"} & sections:
            n += (1 + (sum(self.ready(p) for p in ("transformers", "mlx-lm")) if peers else 0)) * s.rounds
        n += ("card" in sections) + ("engine" in sections) + ("limits" in sections) + ("prefix-cache" in sections)
        if {"server", "peers"} & sections:
            servers = 1 + (sum(self.ready(p) for p in ("llama-server", "mlx-lm")) if peers else 0)
            n += servers + servers * s.rounds * len(s.levels)
        if peers:
            n += 1 + sum(self.ready(p) for p in PEERS)
        return n

    def run(self) -> dict:
        from tqdm import tqdm

        started = time.time()
        self.results.update(
            {
                "schema": SCHEMA,
                "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine_id": machine_id(self.device),
                "machine": describe_machine(),
                "device": self.device,
                "smoke": bool(self.args.smoke),
                "sections": self.sections,
                "sizes": asdict(self.sizes),
                "default_sizes": asdict(Sizes()) == asdict(self.sizes),
                "card_reference": CARD,
                "peers": self.peers,
                "load_average_before": load_average(),
            }
        )
        for name, peer in self.peers.items():
            if peer["status"] == "skipped" and "not selected" not in peer["reason"]:
                self.note(f"{name} skipped: {peer['reason']}")
        with tqdm(total=self.plan(), desc="bench", unit="step", file=sys.stderr, dynamic_ncols=True) as self.progress:
            self.prepare_weights()
            if {"card", "peers"} & set(self.sections):
                self.inference_rounds()
            if "card" in self.sections:
                self.training()
            if "engine" in self.sections:
                self.engine()
            if "limits" in self.sections:
                self.limits()
            if {"server", "peers"} & set(self.sections):
                self.servers()
            if "prefix-cache" in self.sections:
                self.prefix_cache()
            if "peers" in self.sections:
                self.check_dir, self.check_cache = self.greedy_checkpoint()
                self.greedy_check()
        self.progress = None
        from nanogpt_mlx.benchmarks.report import derive_limits

        if "limits" in self.results:
            self.results["limits"]["figures"] = derive_limits(self.results)
        self.results["peers"] = self.peers
        self.results["load_average_after"] = load_average()
        self.results["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.results["duration_s"] = round(time.time() - started, 1)
        return self.results

    def greedy_checkpoint(self) -> tuple[Path, Path]:
        """The trained checkpoint for the greedy check (smoke: the tiny random one) and its cache folder."""
        if self.args.checkpoint:
            check = self.args.checkpoint
        elif self.args.smoke:
            check = self.model_dir
        else:
            check = default_checkpoint()
        return check, checkpoint_cache(self.cache, check)


def random_weights(cache: Path, model: dict) -> tuple[Path, Path]:
    """Random weights of `model`'s shape (seed 0) as a HF directory, saved once: (that directory,
    its cache folder for the GGUF and mlx-lm variants)."""
    base = cache / "models" / ("random-" + "-".join(f"{k}{v}" for k, v in sorted(model.items())) + "-seed0")
    hf = base / "hf"
    if not (hf / "model.safetensors").is_file():
        run_worker("save_random", {"config": model, "seed": 0, "out_dir": str(hf)})
    return hf, base


def default_checkpoint() -> Path:
    """The bundled checkpoint, or NANOGPT_MLX_MODEL's (as `serve` and `generate` choose it)."""
    from nanogpt_mlx.model.cli import DEFAULT_CHECKPOINT

    return Path(os.environ.get("NANOGPT_MLX_MODEL") or DEFAULT_CHECKPOINT)


def checkpoint_cache(cache: Path, check: Path) -> Path:
    """The cache folder for a checkpoint's GGUF and mlx-lm variants, keyed by its weights file."""
    weights = check / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: pass --checkpoint DIR (a HF GPT-2 directory)")
    st = weights.stat()
    key = hashlib.sha1(f"{check.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache / "models" / f"check-{key}"


class _Step:
    def __init__(self, suite: Suite, label: str):
        self.suite, self.label = suite, label

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        suite = self.suite
        suite.results.setdefault("step_seconds", {})[self.label] = round(time.perf_counter() - self.start, 2)
        if suite.progress is not None:
            suite.progress.update(1)
        return False


def _median(values: list[float]) -> float:
    finite = [v for v in values if stats.finite(v)]
    return stats.percentile(finite, 50) if finite else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if stats.finite(a) and stats.finite(b) and b else float("nan")


def compare_tokens(reference: list[dict], theirs: list[dict]) -> dict:
    """Per prompt: how many leading greedy tokens agree."""
    prompts = []
    for ours, peer in zip(reference, theirs):
        agree = 0
        for a, b in zip(ours["tokens"], peer["tokens"]):
            if a != b:
                break
            agree += 1
        prompts.append({"prompt": ours["prompt"], "agree_tokens": agree, "of": len(ours["tokens"])})
    return {"prompts": prompts, "all_agree": all(p["agree_tokens"] == p["of"] for p in prompts)}


def compare_text(reference: list[dict], texts: list[str]) -> dict:
    """Per prompt: how many of our greedy tokens' text the peer's text starts with (peers that return only text)."""
    prompts = []
    for ours, text in zip(reference, texts):
        agree, prefix = 0, ""
        for piece in ours["pieces"]:
            if not text.startswith(prefix + piece):
                break
            prefix += piece
            agree += 1
        prompts.append(
            {"prompt": ours["prompt"], "agree_tokens": agree, "of": len(ours["pieces"]), "ours": "".join(ours["pieces"]), "theirs": text}
        )
    return {"prompts": prompts, "all_agree": all(p["agree_tokens"] == p["of"] for p in prompts)}


def cache_dir() -> Path:
    from nanogpt_mlx.benchmarks.llama_cpp import cache_root

    return cache_root() / "bench"


def ensure_gguf(model_dir: Path, out_dir: Path) -> Path:
    from nanogpt_mlx.benchmarks.gguf_export import gguf_file_name

    path = out_dir / gguf_file_name("f32")
    if not path.is_file():
        # its own process: the tensors' memory goes back to the system when it ends
        proc = subprocess.run(
            [sys.executable, "-m", "nanogpt_mlx.benchmarks.gguf_export", str(model_dir), str(out_dir)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise WorkerError(f"writing the GGUF failed: {proc.stderr[-2000:]}")
    return path


def ensure_mlx_lm_variant(model_dir: Path, out_dir: Path) -> Path:
    if not (out_dir / "model.safetensors").is_file():
        run_worker("mlx_lm_variant", {"model_dir": str(model_dir), "out_dir": str(out_dir)})
    return out_dir


def run_suite(args) -> Path:
    """Run the suite as the parsed `args` say; returns the results folder."""
    from nanogpt_mlx.benchmarks.internals import select_device
    from nanogpt_mlx.benchmarks.report import write_outputs
    from nanogpt_mlx.errors import UserError

    try:
        sizes = sizes_from_args(args)
        only = parse_list(args.only, SECTIONS, "section") or list(SECTIONS)
        skip = parse_list(args.skip, SECTIONS, "section") or []
        wanted_peers = parse_list(args.peers, PEERS, "peer")
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    sections = [x for x in SECTIONS if x in only and x not in skip]
    if not sections:
        raise UserError("no section left to run (--only / --skip)")
    try:
        device = select_device(args.device)
    except (RuntimeError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    peers = check_peers(wanted_peers if wanted_peers is not None else list(PEERS), device)
    if "peers" not in sections:
        peers = {name: {"status": "skipped", "reason": "the peers section was not run"} for name in PEERS}
    out_dir = args.out or RESULTS_ROOT / machine_id(device)
    results = Suite(args, sizes, sections, peers, device, out_dir).run()
    write_outputs(results, out_dir)
    if args.update_readme:
        from nanogpt_mlx.benchmarks.report import update_readme

        update_readme(out_dir / "results.json")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanogpt-mlx bench suite", description=__doc__.split("\n")[0])
    add_arguments(p)
    out = run_suite(p.parse_args(argv))
    print(f"wrote {out}/results.json, report.md and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
