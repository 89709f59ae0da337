"""One checkpoint format, a HF GPT-2 directory (issue 3, item 5).

Round trips in fp32 and fp16, transformers loads both, `nanogpt-mlx convert --from-npz` imports
the original project's layout exactly, errors are clear (exit code 2, `error:`, no traceback),
and writes are atomic.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from nanogpt_mlx.model import checkpoint as ckpt
from nanogpt_mlx.model.checkpoint import CheckpointError, import_npz, load_model, save_checkpoint
from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.gpt import GPT

HF_FILES = {"config.json", "model.safetensors", "vocab.json", "merges.txt"}


def params(model: GPT) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in nn.utils.tree_flatten(model.parameters())}


def probe_logits(model: GPT, n: int = 24) -> np.ndarray:
    toks = np.random.default_rng(99).integers(0, model.config.vocab_size, (2, n)).astype(np.int32)
    return np.array(model(mx.array(toks)))


def leftovers(parent: Path) -> list[str]:
    """Temporary or set-aside directories a save may have left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") or ".tmp" in p.name or ".old" in p.name)


# --- round trips -----------------------------------------------------------------------------------
def test_fp32_round_trip_is_exact(tmp_path, random_model, tiny_config):
    model = random_model(tiny_config, seed=1)
    out = save_checkpoint(model, tmp_path / "ck")
    assert HF_FILES <= {p.name for p in out.iterdir()}
    loaded = load_model(out)
    assert loaded.config == model.config
    a, b = params(model), params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == np.float32 and np.array_equal(a[k], b[k]), k
    assert np.array_equal(probe_logits(model), probe_logits(loaded))


def test_fp16_round_trip_loads_as_fp32(tmp_path, random_model, tiny_config):
    model = random_model(tiny_config, seed=2)
    out = save_checkpoint(model, tmp_path / "ck16", dtype="float16")
    stored = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in stored.values()} == {mx.float16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert (out / "model.safetensors").stat().st_size < 0.6 * (
        save_checkpoint(model, tmp_path / "ck32") / "model.safetensors"
    ).stat().st_size
    loaded = load_model(out)
    a, b = params(model), params(loaded)
    for k in a:
        assert b[k].dtype == np.float32, k
        assert np.array_equal(b[k], a[k].astype(np.float16).astype(np.float32)), k
    assert np.abs(probe_logits(model) - probe_logits(loaded)).max() < 1e-2


def test_config_json_is_a_gpt2_config(tiny_checkpoint, tiny_config):
    d = json.loads((tiny_checkpoint / "config.json").read_text())
    assert d["model_type"] == "gpt2" and d["architectures"] == ["GPT2LMHeadModel"]
    assert d["activation_function"] == "gelu"
    assert (d["n_layer"], d["n_embd"], d["n_head"], d["n_inner"], d["n_positions"]) == (2, 32, 4, 64, 128)
    assert ModelConfig.load(tiny_checkpoint) == tiny_config


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_transformers_loads_both_dtypes(tmp_path, random_model, tiny_config, dtype):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = random_model(tiny_config, seed=3)
    out = save_checkpoint(model, tmp_path / dtype, dtype=dtype)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    hf = hf.float().eval()
    toks = np.random.default_rng(99).integers(0, 50257, (2, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    ours = probe_logits(load_model(out))
    assert np.abs(ours - ref).max() <= 1e-4


def test_transformers_saved_checkpoint_loads_in_mlx(tmp_path, tiny_checkpoint):
    """A directory written by transformers' save_pretrained (HF names, maybe extra buffers) loads too."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    toks = np.random.default_rng(99).integers(0, 50257, (2, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    assert np.abs(probe_logits(ours) - ref).max() <= 1e-4


def test_convert_from_dir_changes_dtype(tmp_path, tiny_checkpoint, run_cli):
    proc = run_cli("convert", "--from-dir", tiny_checkpoint, "--out", tmp_path / "half", "--dtype", "float16")
    assert proc.returncode == 0, proc.stderr
    assert {v.dtype for v in mx.load(str(tmp_path / "half" / "model.safetensors")).values()} == {mx.float16}
    assert np.abs(probe_logits(load_model(tiny_checkpoint)) - probe_logits(load_model(tmp_path / "half"))).max() < 1e-2


# --- atomic writes ---------------------------------------------------------------------------------
def test_save_replaces_an_existing_checkpoint_and_leaves_nothing_behind(tmp_path, random_model, tiny_config):
    first = save_checkpoint(random_model(tiny_config, seed=4), tmp_path / "ck")
    (first / "stale.txt").write_text("from the previous checkpoint")
    second_model = random_model(tiny_config, seed=5)
    save_checkpoint(second_model, tmp_path / "ck")
    assert not (tmp_path / "ck" / "stale.txt").exists()
    assert np.array_equal(probe_logits(load_model(tmp_path / "ck")), probe_logits(second_model))
    assert leftovers(tmp_path) == []
    assert (tmp_path / "ck").stat().st_mode & 0o755 == 0o755


def test_failed_save_keeps_the_old_checkpoint(tmp_path, random_model, tiny_config, monkeypatch):
    model = random_model(tiny_config, seed=6)
    save_checkpoint(model, tmp_path / "ck")
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.mx, "save_safetensors", fail)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(random_model(tiny_config, seed=7), tmp_path / "ck")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    assert np.array_equal(probe_logits(load_model(tmp_path / "ck")), probe_logits(model))
    assert leftovers(tmp_path) == []


def test_unknown_dtype_is_a_checkpoint_error(tmp_path, random_model, tiny_config):
    with pytest.raises(CheckpointError, match="dtype"):
        save_checkpoint(random_model(tiny_config), tmp_path / "ck", dtype="int8")


# --- the original project's .npz -------------------------------------------------------------------
def original_layout(model: GPT) -> dict[str, np.ndarray]:
    """The original nanoGPT-MLX names (see ../shared/README.md); Linear weights are out x in."""
    p = params(model)
    out = {
        "token_embedding.weight": p["wte.weight"],
        "position_embedding.weight": p["wpe.weight"],
        "ln_f.weight": p["ln_f.weight"],
        "ln_f.bias": p["ln_f.bias"],
        "lm_head.weight": p["lm_head.weight"],
    }
    for i in range(model.config.n_layer):
        ours = {
            "ln1": "ln_1",
            "ln2": "ln_2",
            "attn.qkv_proj": "attn.c_attn",
            "attn.out_proj": "attn.c_proj",
            "ff.fc1": "mlp.c_fc",
            "ff.fc2": "mlp.c_proj",
        }
        for orig, mine in ours.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{orig}.{kind}"] = p[f"h.{i}.{mine}.{kind}"]
    assert len(out) == len(p)
    return out


def write_original(folder: Path, model: GPT, iteration: int = 1200, meta_config: dict | None = None, arrays: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    c = model.config
    config = {
        "n_layers": c.n_layer,
        "n_heads": c.n_head,
        "d_model": c.n_embd,
        "d_ff": c.n_inner,
        "context_length": c.block_size,
        "vocab_size": c.vocab_size,
        "dropout": 0.1,
        "batch_size": 12,
        "learning_rate": 3e-4,
        "max_iters": 5000,
    }
    config.update(meta_config or {})
    npz = folder / f"checkpoint_{iteration}.npz"
    np.savez(npz, **(arrays if arrays is not None else original_layout(model)))
    meta = {"iteration": iteration, "loss": 4.321, "config": config}
    (folder / f"checkpoint_{iteration}_meta.json").write_text(json.dumps(meta))
    return npz


def test_original_layout_shapes_are_out_by_in(random_model, tiny_config):
    arrays = original_layout(random_model(tiny_config))
    assert arrays["blocks.0.attn.qkv_proj.weight"].shape == (3 * 32, 32)
    assert arrays["blocks.0.ff.fc1.weight"].shape == (64, 32)
    assert arrays["lm_head.weight"].shape == (50257, 32)


def test_convert_from_npz_gives_identical_logits(tmp_path, random_model, tiny_config, run_cli):
    model = random_model(tiny_config, seed=8)
    npz = write_original(tmp_path / "orig", model)
    proc = run_cli("convert", "--from-npz", npz, "--out", tmp_path / "converted")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    converted = load_model(tmp_path / "converted")
    assert converted.config == tiny_config
    # "directly": the same arrays loaded by name into a fresh module, no converter involved
    direct = GPT(tiny_config)
    arrays = dict(np.load(npz))
    direct.load_weights([(name, mx.array(value)) for name, value in _by_our_names(arrays, tiny_config.n_layer).items()])
    assert np.array_equal(probe_logits(converted), probe_logits(direct))
    assert np.array_equal(probe_logits(converted), probe_logits(model))


def _by_our_names(arrays: dict[str, np.ndarray], n_layer: int) -> dict[str, np.ndarray]:
    out = {
        "wte.weight": arrays["token_embedding.weight"],
        "wpe.weight": arrays["position_embedding.weight"],
        "ln_f.weight": arrays["ln_f.weight"],
        "ln_f.bias": arrays["ln_f.bias"],
        "lm_head.weight": arrays["lm_head.weight"],
    }
    names = {
        "ln_1": "ln1",
        "ln_2": "ln2",
        "attn.c_attn": "attn.qkv_proj",
        "attn.c_proj": "attn.out_proj",
        "mlp.c_fc": "ff.fc1",
        "mlp.c_proj": "ff.fc2",
    }
    for i in range(n_layer):
        for mine, orig in names.items():
            for kind in ("weight", "bias"):
                out[f"h.{i}.{mine}.{kind}"] = arrays[f"blocks.{i}.{orig}.{kind}"]
    return out


def test_converted_npz_loads_in_transformers(tmp_path, random_model, tiny_config):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = random_model(tiny_config, seed=9)
    out = import_npz(write_original(tmp_path / "orig", model), tmp_path / "converted", dtype="float16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    toks = np.random.default_rng(99).integers(0, 50257, (2, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(toks)).logits.numpy()
    assert np.abs(probe_logits(load_model(out)) - ref).max() <= 1e-4


def test_convert_uses_folder_config_json_without_meta(tmp_path, random_model, tiny_config):
    model = random_model(tiny_config, seed=10)
    npz = write_original(tmp_path / "orig", model)
    meta = npz.with_name(npz.stem + "_meta.json")
    (npz.parent / "config.json").write_text(json.dumps(json.loads(meta.read_text())["config"]))
    meta.unlink()
    out = import_npz(npz, tmp_path / "converted")
    assert np.array_equal(probe_logits(load_model(out)), probe_logits(model))


# --- clear errors ----------------------------------------------------------------------------------
def assert_clean_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") or "\nerror: " in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


def test_convert_missing_npz(tmp_path, run_cli):
    proc = run_cli("convert", "--from-npz", tmp_path / "checkpoint_1.npz", "--out", tmp_path / "out")
    assert_clean_error(proc, "checkpoint_1.npz")
    assert not (tmp_path / "out").exists()


def test_convert_npz_without_meta(tmp_path, random_model, tiny_config, run_cli):
    npz = write_original(tmp_path / "orig", random_model(tiny_config))
    npz.with_name(npz.stem + "_meta.json").unlink()
    assert_clean_error(run_cli("convert", "--from-npz", npz, "--out", tmp_path / "out"), "meta")


def test_convert_meta_missing_a_key(tmp_path, random_model, tiny_config, run_cli):
    npz = write_original(tmp_path / "orig", random_model(tiny_config))
    meta = npz.with_name(npz.stem + "_meta.json")
    d = json.loads(meta.read_text())
    del d["config"]["d_ff"]
    meta.write_text(json.dumps(d))
    assert_clean_error(run_cli("convert", "--from-npz", npz, "--out", tmp_path / "out"), "d_ff")


def test_convert_wrong_shape(tmp_path, random_model, tiny_config, run_cli):
    model = random_model(tiny_config)
    arrays = original_layout(model)
    arrays["blocks.1.ff.fc1.weight"] = arrays["blocks.1.ff.fc1.weight"].T.copy()  # in x out by mistake
    npz = write_original(tmp_path / "orig", model, arrays=arrays)
    proc = run_cli("convert", "--from-npz", npz, "--out", tmp_path / "out")
    assert_clean_error(proc, "h.1.mlp.c_fc.weight", "(32, 64)", "(64, 32)")
    assert not (tmp_path / "out").exists()


def test_convert_config_that_does_not_match(tmp_path, random_model, tiny_config, run_cli):
    # the meta says 3 layers; the arrays hold 2
    npz = write_original(tmp_path / "orig", random_model(tiny_config), meta_config={"n_layers": 3})
    assert_clean_error(run_cli("convert", "--from-npz", npz, "--out", tmp_path / "out"), "does not match", "missing")
    # the meta says 64 wide; the arrays are 32 wide
    npz = write_original(tmp_path / "orig2", random_model(tiny_config), meta_config={"d_model": 64})
    assert_clean_error(run_cli("convert", "--from-npz", npz, "--out", tmp_path / "out"), "shape")
    assert not (tmp_path / "out").exists()


def test_convert_not_an_npz(tmp_path, random_model, tiny_config, run_cli):
    npz = write_original(tmp_path / "orig", random_model(tiny_config))
    npz.write_bytes(b"this is not a zip file")
    assert_clean_error(run_cli("convert", "--from-npz", npz, "--out", tmp_path / "out"), "npz")


def test_load_missing_directory_and_files(tmp_path, tiny_checkpoint, run_cli):
    proc = run_cli("generate", "--model", tmp_path / "nowhere", "--prompt", "hi", "--max-tokens", "2")
    assert_clean_error(proc, "nowhere")
    for missing in ("config.json", "model.safetensors"):
        broken = tmp_path / f"no-{missing}"
        broken.mkdir()
        for f in tiny_checkpoint.iterdir():
            if f.name != missing:
                (broken / f.name).write_bytes(f.read_bytes())
        assert_clean_error(run_cli("convert", "--from-dir", broken, "--out", tmp_path / "out"), missing)
        with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
            load_model(broken)


def test_load_config_that_does_not_match_weights(tmp_path, tiny_checkpoint, run_cli):
    broken = tmp_path / "mismatch"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["n_inner"] = 128
    (broken / "config.json").write_text(json.dumps(config))
    proc = run_cli("generate", "--model", broken, "--prompt", "hi", "--max-tokens", "2")
    assert_clean_error(proc, "c_fc", "shape")
    config["n_inner"], config["n_layer"] = 64, 3
    (broken / "config.json").write_text(json.dumps(config))
    assert_clean_error(run_cli("generate", "--model", broken, "--prompt", "hi", "--max-tokens", "2"), "does not match")


def test_load_damaged_files(tmp_path, tiny_checkpoint):
    broken = tmp_path / "damaged"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(broken)
    (broken / "config.json").write_text(json.dumps({**ModelConfig().to_hf_dict(), "activation_function": "gelu_new"}))
    with pytest.raises(CheckpointError, match="activation_function"):
        load_model(broken)
