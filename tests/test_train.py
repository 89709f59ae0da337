"""The trainer: schedule, learning, exact resume, checkpoints that survive crashes and full
disks, clear errors, and the real `nanogpt-mlx train` / `eval` commands.

Everything runs a tiny model (2 layers, 32 wide, the real 50,257-token vocabulary) on shards
prepared from synthetic text in tmp_path.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from nanogpt_mlx.cli import main as cli_main
from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.training import checkpointing as ckpt
from nanogpt_mlx.training.losses import cross_entropy
from nanogpt_mlx.training.optim import lr_schedule
from nanogpt_mlx.training.prepare import prepare_data
from nanogpt_mlx.training.recipe import OptimSection, Recipe, TrainingError
from nanogpt_mlx.training.train import Trainer

TINY_MODEL = {"n_layer": 2, "n_head": 4, "n_embd": 32, "n_inner": 64, "block_size": 64}
WORDS = ("the king said unto his people that a river of light shall come over the hills and all men rejoice in the morning "
         "while dogs bark at night").split()


def synthetic_docs(n: int, seed: int) -> list[str]:
    """Sentences from a small vocabulary with a strong word-order pattern (learnable fast)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.integers(3, 8)):
            start = rng.integers(0, len(WORDS) - 8)
            sentences.append(" ".join(WORDS[start : start + rng.integers(4, 9)]).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


def write_shards(root: Path, n_train: int = 400, n_val: int = 40) -> Path:
    src = root / "src"
    src.mkdir(parents=True)
    (src / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_docs(n_train, 0)))
    (src / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_docs(n_val, 1)))
    out = root / "shards"
    prepare_data([src / "train.jsonl"], out, val_inputs=[src / "val.jsonl"], progress=False)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("data"))


def tiny_recipe(**sections) -> Recipe:
    raw = {
        "model": dict(TINY_MODEL),
        "data": {"seq_len": 32, "batch_size": 4, "eval_batches": 2},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"max_steps": 6, "eval_interval": 3, "log_interval": 1, "save_interval_steps": 3, "keep_last": 2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Recipe.from_dict(raw)


def weights_of(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def assert_same_tree(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k], dtype=np.float64), np.asarray(b[k], dtype=np.float64), atol=atol, rtol=0, err_msg=k)


# --- schedule and loss ---------------------------------------------------------------------------
def test_warmup_then_cosine_to_floor():
    o = OptimSection(lr=3e-4, min_lr=1.5e-5, warmup_steps=2000)
    sched = lr_schedule(o, max_steps=35000)
    lr = lambda s: float(sched(mx.array(s)).item())  # noqa: E731
    assert lr(0) == pytest.approx(3e-4 / 2000, rel=1e-3)
    assert lr(1000) == pytest.approx(3e-4 * 1001 / 2000, rel=1e-2)
    assert lr(2000) == pytest.approx(3e-4, rel=1e-5)
    assert lr(2000 + 16500) == pytest.approx((3e-4 + 1.5e-5) / 2, rel=1e-3)  # cosine midpoint
    assert lr(35000) == pytest.approx(1.5e-5, rel=1e-4)
    values = [lr(s) for s in range(2000, 35001, 500)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_fast_cross_entropy_matches_reference():
    import mlx.nn as nn

    rng = np.random.default_rng(0)
    logits = mx.array((4 * rng.standard_normal((2, 5, 3000))).astype(np.float32))
    targets = mx.array(rng.integers(0, 3000, (2, 5)))
    ref = lambda l: nn.losses.cross_entropy(l, targets).mean()  # noqa: E731
    ours = lambda l: cross_entropy(l, targets)  # noqa: E731
    assert ours(logits).item() == pytest.approx(ref(logits).item(), rel=1e-6)
    np.testing.assert_allclose(np.array(mx.grad(ours)(logits)), np.array(mx.grad(ref)(logits)), rtol=2e-5, atol=1e-9)
    compiled = mx.compile(mx.value_and_grad(ours))(logits)
    assert compiled[0].item() == pytest.approx(ref(logits).item(), rel=1e-6)
    np.testing.assert_allclose(np.array(compiled[1]), np.array(mx.grad(ref)(logits)), rtol=2e-5, atol=1e-9)
    # huge logits do not overflow (the max is subtracted before exp)
    big = logits * 1000
    assert math.isfinite(ours(big).item()) and ours(big).item() == pytest.approx(ref(big).item(), rel=1e-5)


# --- learning and exact resume -------------------------------------------------------------------
def test_training_lowers_the_loss(shards, tmp_path):
    recipe = tiny_recipe(optim={"lr": 1e-2, "min_lr": 1e-3}, train={"max_steps": 40, "eval_interval": 40, "save_interval_steps": 0})
    trainer = Trainer(recipe, str(shards), str(tmp_path / "run"), progress=False)
    summary = trainer.fit()
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in log if "loss" in r]
    assert train[0] > 10.0  # ~ln(50257) at random init
    # uniform over the vocabulary is ln(50257) = 10.8; the text uses ~40 distinct tokens
    assert summary["best_val_loss"] < 6.0, summary
    assert len(train) == 40 and all("tok_per_s" in r and "lr" in r for r in log if "loss" in r)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        # accumulation, and a sequence-length phase change that happens *after* the resume point
        {"data": {"grad_accum": 2, "seq_len_schedule": [[0, 16, 4], [4, 32, 2]]}},
    ],
    ids=["plain", "accum+phases"],
)
def test_resume_continues_exactly(shards, tmp_path, overrides):
    n = 3
    recipe = tiny_recipe(train={"max_steps": 2 * n, "save_interval_steps": n, "eval_interval": 0}, **overrides)
    straight = Trainer(recipe, str(shards), str(tmp_path / "straight"), progress=False)
    straight.fit()

    # First half: the same 2n-step recipe (same schedule), stopped after n steps as if killed.
    Trainer(recipe, str(shards), str(tmp_path / "resumed"), progress=False).fit(stop_at=n)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "resumed")] == [n]

    resumed = Trainer(recipe, str(shards), str(tmp_path / "resumed"), resume=True, progress=False)
    assert resumed.step == n
    resumed.fit()
    assert resumed.step == 2 * n
    assert_same_tree(weights_of(straight.model), weights_of(resumed.model))
    assert_same_tree(dict(tree_flatten(straight.optimizer.state)), dict(tree_flatten(resumed.optimizer.state)))
    # and the resumed run did not simply copy: the weights moved since the step-n checkpoint
    at_n = load_model(tmp_path / "resumed" / "checkpoints" / ckpt.step_dir_name(n))
    assert max(np.abs(weights_of(at_n)[k] - weights_of(resumed.model)[k]).max() for k in weights_of(at_n)) > 1e-4


# --- checkpoints ---------------------------------------------------------------------------------
def test_checkpoints_keep_last_k_and_best(shards, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(train={"max_steps": 5, "save_interval_steps": 1, "keep_last": 2, "eval_interval": 1})
    Trainer(recipe, str(shards), str(run), progress=False).fit()
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 5]
    latest = run / "checkpoints" / ckpt.step_dir_name(5)
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "optimizer.safetensors", "trainer_state.json"):
        assert (latest / name).is_file(), name
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["tokens_seen"] == 5 * 4 * 32
    assert state["sampler"]["state"]["step"] == 5  # data position: 5 batches drawn
    load_model(latest)  # servable HF directory
    vals = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines() if "val_loss" in l]
    best_state = json.loads((run / "best" / "trainer_state.json").read_text())
    assert best_state["val_loss"] == pytest.approx(min(v["val_loss"] for v in vals))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_skips_partial_and_damaged_checkpoints(shards, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tiny_recipe(train={"max_steps": 4, "save_interval_steps": 2, "eval_interval": 0})
    Trainer(recipe, str(shards), str(run), progress=False).fit()
    partial = run / "checkpoints" / ".step_00000006.partial-999"  # the name earlier versions used
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    staging = run / "checkpoints" / ".step_00000008.tmp-abc123"  # a killed atomic_dir
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"half")
    damaged = run / "checkpoints" / ckpt.step_dir_name(4) / "optimizer.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])  # torn write
    resumed = Trainer(recipe.override(["train.max_steps=6"]), str(shards), str(run), resume=True, progress=False)
    assert resumed.step == 2
    assert not partial.exists() and not staging.exists()
    assert "skipping damaged checkpoint" in capsys.readouterr().err


def test_out_of_disk_keeps_previous_checkpoint(shards, tmp_path, monkeypatch):
    run = tmp_path / "run"
    recipe = tiny_recipe(train={"max_steps": 4, "save_interval_steps": 2, "eval_interval": 0})
    trainer = Trainer(recipe, str(shards), str(run), progress=False)
    real_save = mx.save_safetensors
    calls = {"n": 0}

    def full_disk(path, arrays, metadata=None):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (model + optimizer) fits, then the disk is full
            Path(path).write_bytes(b"\0" * 1000)
            raise RuntimeError("[write] Unable to write 8 bytes to file.")  # what MLX raises on ENOSPC
        return real_save(path, arrays, metadata) if metadata is not None else real_save(path, arrays)

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    with pytest.raises(TrainingError, match="out of disk space") as info:
        trainer.fit()
    assert "step_00000002" in str(info.value) and "intact" in str(info.value)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(mx, "save_safetensors", real_save)
    resumed = Trainer(recipe, str(shards), str(run), resume=True, progress=False)
    assert resumed.step == 2


def test_out_of_disk_on_a_real_small_filesystem(shards, tmp_path):
    """A 70 MB tmpfs: the first checkpoint (~40 MB) fits, the second does not. Needs mount rights."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=70m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        recipe = tiny_recipe(train={"max_steps": 4, "save_interval_steps": 2, "eval_interval": 0})
        trainer = Trainer(recipe, str(shards), str(mnt / "run"), progress=False)
        with pytest.raises(TrainingError, match="out of disk space"):
            trainer.fit()
        assert [s for s, _ in ckpt.list_checkpoints(mnt / "run")] == [2]
        assert Trainer(recipe, str(shards), str(mnt / "run"), resume=True, progress=False).step == 2
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# --- clear errors (in-process CLI: exit code 2, a message, no traceback) -----------------------------
def write_recipe(tmp_path: Path, **sections) -> Path:
    lines = []
    recipe = tiny_recipe(**sections).to_dict()
    for section in ("model", "data", "optim", "train"):
        lines.append(f"[{section}]")
        for k, v in recipe[section].items():
            lines.append(f"{k} = {json.dumps(v)}")
    path = tmp_path / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_main(args, capsys) -> tuple[int, str]:
    code = cli_main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_error_missing_data(tmp_path, capsys):
    code, err = run_main(["train", "--config", write_recipe(tmp_path),
                          "--data", tmp_path / "nope", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "not found" in err


def test_error_empty_or_too_small_shards(shards, tmp_path, capsys):
    # shards whose train split holds 0 tokens (a manifest and file that agree)
    empty = tmp_path / "empty"
    shutil.copytree(shards, empty)
    manifest = json.loads((empty / "manifest.json").read_text())
    manifest["splits"]["train"]["tokens"] = 0
    manifest["splits"]["train"]["shards"] = [{"file": "train_000.bin", "tokens": 0}]
    (empty / "manifest.json").write_text(json.dumps(manifest))
    (empty / "train_000.bin").write_bytes(b"")
    code, err = run_main(["train", "--config", write_recipe(tmp_path),
                          "--data", empty, "--out", tmp_path / "run"], capsys)
    assert code == 2 and "empty" in err
    # a train split shorter than one window
    small = tmp_path / "small.txt"
    small.write_text("Hi there.")
    prepare_data([small], tmp_path / "small", val_inputs=[small], progress=False)
    code, err = run_main(["train", "--config", write_recipe(tmp_path),
                          "--data", tmp_path / "small", "--out", tmp_path / "run"], capsys)
    assert code == 2 and "fewer than seq_len + 1" in err


def test_error_config_contradicts_model(shards, tmp_path, capsys):
    code, err = run_main(["train", "--config", write_recipe(tmp_path),
                          "--data", shards, "--out", tmp_path / "run", "--seq-len", "128"], capsys)
    assert code == 2 and "exceeds the model's context" in err
    code, err = run_main(["train", "--config", write_recipe(tmp_path),
                          "--data", shards, "--out", tmp_path / "run", "--set", "model.n_head=5"], capsys)
    assert code == 2 and "multiple of n_head" in err
    code, err = run_main(["train", "--config", write_recipe(tmp_path),
                          "--data", shards, "--out", tmp_path / "run", "--set", "optim.lrr=1"], capsys)
    assert code == 2 and "unknown key optim.lrr" in err


def test_error_init_from_contradicts_recipe(shards, tmp_path, capsys, tiny_checkpoint):
    # tiny_checkpoint has block_size 128; the recipe says 64
    code, err = run_main(["train", "--config", write_recipe(tmp_path),
                          "--data", shards, "--out", tmp_path / "run", "--init-from", tiny_checkpoint], capsys)
    assert code == 2 and "block_size" in err and "--init-from" in err


def test_error_resume_incompatible_checkpoint(shards, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, train={"max_steps": 2, "save_interval_steps": 2, "eval_interval": 0})
    assert run_main(["train", "--config", recipe, "--data", shards, "--out", run, "--no-progress"], capsys)[0] == 0
    code, err = run_main(["train", "--config", recipe, "--data", shards, "--out", run, "--resume", "--set", "model.n_layer=3"], capsys)
    assert code == 2 and "cannot resume" in err and "n_layer: checkpoint 2, recipe 3" in err
    code, err = run_main(["train", "--config", recipe, "--data", shards, "--out", run, "--resume",
                          "--batch-size", "3", "--max-steps", "4"], capsys)
    assert code == 2 and "data position" in err
    code, err = run_main(["train", "--config", recipe, "--data", shards, "--out", run], capsys)
    assert code == 2 and "--resume" in err  # never silently overwrite a run


# --- the real commands ---------------------------------------------------------------------------
def test_cli_train_then_eval(shards, tmp_path, run_cli):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, train={"max_steps": 4, "save_interval_steps": 2, "eval_interval": 2})
    proc = run_cli("train", "--config", recipe, "--data", shards, "--out", run, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 4 and summary["tok_per_s"] > 0
    assert "train:" in proc.stderr and ("step/s" in proc.stderr or "s/step" in proc.stderr)  # tqdm bar
    assert (run / "best" / "model.safetensors").is_file() and (run / "loss.png").is_file()

    proc = run_cli("eval", "--model", run / "best", "--data", shards, "--seq-len", "32", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert result["tokens"] > 0 and result["tok_per_s"] > 0
    best = json.loads((run / "best" / "trainer_state.json").read_text())["val_loss"]
    assert result["loss"] == pytest.approx(best, rel=0.05)  # eval sees all val windows, training 2 batches

    proc = run_cli("eval", "--model", run / "best", "--data", tmp_path / "missing", timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
