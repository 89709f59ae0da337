"""`nanogpt-mlx bench`: the suite's smoke run through the real CLI, its outputs, the README section, the GGUF writer.

The smoke run measures nothing (a tiny model, two runs of everything); it proves that every
section runs end to end and writes what the issue asks for. llama-server is pointed at a path
that does not exist, so it must be recorded as skipped with the reason; transformers (a test
dependency) runs as a real peer.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from nanogpt_mlx.benchmarks.machine import machine_id

from conftest import cli_env

SECTIONS = ["card", "engine", "server", "prefix-cache", "peers", "limits"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, run_cli):
    out = tmp_path_factory.mktemp("bench-out")
    cache = tmp_path_factory.mktemp("bench-cache")
    missing = tmp_path_factory.mktemp("nothing") / "llama-server"
    env = cli_env(NANOGPT_MLX_LLAMA_SERVER=str(missing))
    proc = run_cli("bench", "--smoke", "--out", out, "--cache", cache, "--peers", "transformers,llama-server", env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text()), proc


def test_smoke_writes_json_markdown_and_plots(smoke_run):
    out, results, proc = smoke_run
    assert "results.json" in proc.stdout
    for name in ("results.json", "report.md", "card.png", "server_throughput.png", "server_latency.png", "limits.png"):
        assert (out / name).is_file(), name
    for name in ("card.png", "server_throughput.png", "server_latency.png", "limits.png"):
        head = (out / name).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", head[16:24])
        assert width > 200 and height > 200
    assert sorted(results["plots"]) == sorted(["card.png", "server_throughput.png", "server_latency.png", "limits.png"])
    report = (out / "report.md").read_text()
    for heading in ("## Machine", "## Peers", "## The card's table", "## Engine", "## Server under load", "## Prefix cache", "## Limits",
                    "**Smoke run**"):
        assert heading in report
    assert "card (Apple M2 Pro)" in report and "25,476" in report


def test_smoke_results_hold_the_machine_and_every_section(smoke_run):
    _, r, _ = smoke_run
    assert r["smoke"] is True and r["sections"] == SECTIONS and r["device"] == "cpu"
    m = r["machine"]
    for key in ("cpu", "cores", "cpu_flags", "memory_gb", "blas", "libraries", "git"):
        assert key in m, key
    assert m["libraries"]["mlx"]
    assert len(r["load_average_before"]) == 3 and len(r["load_average_after"]) == 3
    assert r["machine_id"] == machine_id("cpu") and str(m["cores"]) + "c" in r["machine_id"]

    card = r["inference"]["ours"]
    for key in ("forward_tok_s", "forward_latency_ms", "generation_tok_s", "prefill_tok_s"):
        assert card[key]["n"] == r["sizes"]["runs"] and card[key]["median"] > 0
        assert card[key]["min"] <= card[key]["median"] <= card[key]["max"]
    lat = card["forward_latency_ms"]
    assert lat["p95"] <= lat["p99"] <= lat["max"] + 1e-9
    tr = r["training"]
    assert tr["train_tok_s"]["median"] > 0 and tr["eval_tok_s"]["median"] > 0
    assert tr["size_fp16_mb"] * 1.9 < tr["size_fp32_mb"] < tr["size_fp16_mb"] * 2.1
    assert r["card_reference"]["forward_tok_s"] == 25476 and r["card_reference"]["generation_tok_s"] == 157.5

    eng = r["engine"]
    assert sorted(eng["decode"]) == sorted(str(n) for n in r["sizes"]["decode_rows"])
    assert eng["prefill"]["tok_s"]["median"] > 0 and eng["batched_prefill"]["tok_s"]["median"] > 0

    srv = r["server"]
    ours = srv["servers"]["nanogpt-mlx"]["levels"]
    assert sorted(ours, key=int) == [str(c) for c in r["sizes"]["levels"]]
    for level in ours.values():
        assert level["errors"] == 0 and level["requests"] >= r["sizes"]["min_requests"]
        md = level["median"]
        assert md["output_tok_s"] > 0 and 0 < md["ttft_p50_s"] <= md["ttft_p95_s"] and md["e2e_p95_s"] > 0
        assert len(level["ttft_ms_quantiles"]) == 101 and len(level["itl_ms_quantiles"]) == 101

    pc = r["prefix_cache"]
    assert sorted(pc["summary"]) == sorted(["lmeval", "fewshot", "chat", "unique"])
    for workload, entry in pc["summary"].items():
        assert all(sum(rnd[workload][mode]["errors"] for rnd in pc["rounds"]) == 0 for mode in ("on", "off")), workload
        assert entry["on"]["requests_per_s"] > 0 and entry["off"]["requests_per_s"] > 0
        assert entry["off"]["prefix_cache_hit_rate"] is None  # the server without the cache reports none
    assert pc["summary"]["lmeval"]["on"]["prefix_cache_hit_rate"] > 0  # 4 choices share one context

    lim = r["limits"]
    assert lim["bandwidth_gb_s"] > 0 and lim["gemm_gflops"] > 0
    figures = {(f["figure"], f["who"]) for f in lim["figures"]}
    assert any(who == "ours" and fig.startswith("generation") for fig, who in figures)
    assert all(f["pct_of_bandwidth"] > 0 and f["pct_of_compute"] > 0 for f in lim["figures"])


def test_smoke_records_missing_peers_as_skipped_and_measures_transformers(smoke_run):
    _, r, _ = smoke_run
    llama = r["peers"]["llama-server"]
    assert llama["status"] == "skipped" and "NANOGPT_MLX_LLAMA_SERVER" in llama["reason"]
    assert r["peers"]["mlx-lm"] == {"status": "skipped", "reason": "not selected (--peers)"}
    assert any("llama-server skipped" in n for n in r["notes"])
    assert r["peers"]["transformers"]["status"] == "ready"
    ratios = r["inference_ratios"]["transformers"]
    assert set(ratios) == {"forward_tok_s", "forward_latency_ms", "generation_tok_s", "prefill_tok_s"}
    assert all(v > 0 for v in ratios.values())
    # transformers computes the same function (exact GELU): its greedy tokens are ours.
    check = r["greedy_check"]["peers"]["transformers"]
    assert check["all_agree"], check
    assert "llama-server" not in r["greedy_check"]["peers"]


def test_report_rewrites_only_the_readme_section(smoke_run, run_cli, tmp_path):
    out, _, _ = smoke_run
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n<!-- bench:begin -->\nold figures\n<!-- bench:end -->\nafter\n")
    proc = run_cli("bench", "report", "--results", out / "results.json", "--update-readme", "--readme", readme)
    assert proc.returncode == 0, proc.stderr
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n<!-- bench:begin -->") and text.endswith("<!-- bench:end -->\nafter\n")
    assert "old figures" not in text
    assert "report.md" in text and "card (Apple M2 Pro)" in text and "nanogpt-mlx" in text
    again = readme.read_text()
    assert run_cli("bench", "report", "--results", out / "results.json", "--update-readme", "--readme", readme).returncode == 0
    assert readme.read_text() == again  # idempotent

    readme.write_text("no markers here\n")
    proc = run_cli("bench", "report", "--results", out / "results.json", "--update-readme", "--readme", readme)
    assert proc.returncode == 2 and "bench:begin" in proc.stderr


def test_bench_rejects_unknown_sections(run_cli, tmp_path):
    proc = run_cli("bench", "--only", "card,warp-drive", "--out", tmp_path)
    assert proc.returncode == 2 and "warp-drive" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_weights_checkpoint_runs_the_servers_on_it_and_refuses_another_shape(run_cli, random_model, tmp_path):
    """`--weights checkpoint`: the figures run on the given checkpoint (said in results and report);
    one of another shape than the sizes' model is refused before anything runs."""
    from nanogpt_mlx.benchmarks.suite import SMOKE_MODEL
    from nanogpt_mlx.model.checkpoint import save_checkpoint
    from nanogpt_mlx.model.config import ModelConfig

    shape = {k: v for k, v in SMOKE_MODEL.items() if k != "tie_embeddings"}
    checkpoint = save_checkpoint(random_model(ModelConfig(**shape), seed=5), tmp_path / "smoke-shaped")
    out = tmp_path / "out"
    proc = run_cli("bench", "--smoke", "--only", "server", "--weights", "checkpoint", "--checkpoint", checkpoint, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["weights"] == {"checkpoint": {"dir": str(checkpoint)}}
    assert results["server"]["servers"]["nanogpt-mlx"]["levels"]["1"]["median"]["output_tok_s"] > 0
    assert "runs the checkpoint `smoke-shaped`" in (out / "report.md").read_text()

    wrong = random_model(ModelConfig(**{**shape, "n_layer": 1}), seed=5)
    other = save_checkpoint(wrong, tmp_path / "other-shape")
    proc = run_cli("bench", "--smoke", "--only", "server", "--weights", "checkpoint", "--checkpoint", other, "--out", tmp_path / "o2")
    assert proc.returncode == 2 and "n_layer" in proc.stderr and "--weights checkpoint" in proc.stderr
    assert not (tmp_path / "o2" / "results.json").exists()


def test_existing_scripts_still_dispatch(run_cli):
    proc = run_cli("bench", "serve", "--help")
    assert proc.returncode == 0 and "--concurrency" in proc.stdout
    proc = run_cli("bench", "build-llama-server", "--help")
    assert proc.returncode == 0 and "--cuda" in proc.stdout
    proc = run_cli("bench", "generate", "--help")
    assert proc.returncode == 0 and "--weights" in proc.stdout


def test_gguf_writer_follows_llama_cpp_gpt2_layout(tiny_checkpoint, tmp_path):
    gguf = pytest.importorskip("gguf")
    from safetensors.numpy import load_file

    from nanogpt_mlx.benchmarks.gguf_export import write_gguf

    path = write_gguf(tiny_checkpoint, tmp_path / "gguf")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    hf = load_file(str(tiny_checkpoint / "model.safetensors"))
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert len(tensors) == len(hf)  # every tensor, the separate head as output.weight
    for i in range(config["n_layer"]):
        for hf_name, g_name in (
            ("attn.c_attn", "attn_qkv"),
            ("attn.c_proj", "attn_output"),
            ("mlp.c_fc", "ffn_up"),
            ("mlp.c_proj", "ffn_down"),
        ):
            data = np.asarray(tensors[f"blk.{i}.{g_name}.weight"].data).reshape(hf[f"transformer.h.{i}.{hf_name}.weight"].T.shape)
            np.testing.assert_array_equal(data, hf[f"transformer.h.{i}.{hf_name}.weight"].T)  # Conv1D (in, out) -> (out, in)
        np.testing.assert_array_equal(np.asarray(tensors[f"blk.{i}.attn_norm.bias"].data), hf[f"transformer.h.{i}.ln_1.bias"])
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data).reshape(hf["lm_head.weight"].shape), hf["lm_head.weight"])
    np.testing.assert_array_equal(
        np.asarray(tensors["token_embd.weight"].data).reshape(hf["transformer.wte.weight"].shape), hf["transformer.wte.weight"]
    )

    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "gpt2"
    assert int(fields["gpt2.block_count"].parts[-1][0]) == config["n_layer"]
    assert int(fields["gpt2.context_length"].parts[-1][0]) == config["n_positions"]
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
    assert int(fields["tokenizer.ggml.eos_token_id"].parts[-1][0]) == 50256
    token = fields["tokenizer.ggml.tokens"]
    assert bytes(token.parts[token.data[50256]]).decode() == "<|endoftext|>"


def test_device_gpu_without_one_is_a_clear_error(run_cli, tmp_path):
    import mlx.core as mx

    if mx.is_available(mx.gpu):
        pytest.skip("this machine has a GPU: `--device gpu` would run")
    proc = run_cli("bench", "--device", "gpu", "--smoke", "--out", tmp_path)
    assert proc.returncode == 2 and "no Metal or CUDA device" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_limits_arithmetic_for_the_card_shape(full_config):
    from nanogpt_mlx.benchmarks.report import derive_limits, model_costs
    from nanogpt_mlx.benchmarks.suite import CARD_MODEL, Sizes

    costs = model_costs(CARD_MODEL)
    params = 52_990_464
    embeddings = full_config.vocab_size * full_config.n_embd + full_config.block_size * full_config.n_embd
    assert costs["weight_bytes"] == 4 * (params - embeddings)  # what a decode step reads: everything but the gathered embeddings
    sizes = Sizes()
    summary = {"n": 1, "median": 100.0}
    results = {
        "sizes": {**sizes.__dict__},
        "limits": {"bandwidth_gb_s": 20.0, "gemm_gflops": 100.0},
        "inference": {"ours": {"generation_tok_s": summary, "forward_tok_s": summary}},
    }
    rows = {r["figure"]: r for r in derive_limits(results)}
    gen = rows["generation 50+100, batch 1"]
    kv = 2 * 8 * 100 * 384 * 4  # keys and values of 100 positions, 8 layers, fp32
    assert gen["bytes_per_token"] == costs["weight_bytes"] + kv
    assert gen["pct_of_bandwidth"] == pytest.approx(100 * 100.0 * gen["bytes_per_token"] / 20e9)
    fwd = rows["forward 8x512"]
    matmuls = 8 * (4 * 384 * 384 + 2 * 384 * 1536) + 384 * 50257
    assert fwd["flops_per_token"] == pytest.approx(2 * matmuls + 4 * 8 * 384 * 512)
    assert fwd["bound"] == "compute" and gen["bound"] == "memory"
