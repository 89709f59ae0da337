"""Crash-safe training for real: `nanogpt-mlx train` killed with SIGKILL again and again.

A small run is killed at random moments — some right after a random step, some while a
checkpoint is being written — and resumed with `--resume` each time. After every kill the
published checkpoints must all be complete (each one loads: weights, optimizer, trainer state),
the resume must start from the newest of them, and at the end the weights must equal those of
a run that was never interrupted. Nothing here waits on the clock: each kill is triggered by an
event seen on disk (a log line, a checkpoint being staged).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import cli_command, cli_env

MAX_STEPS = 16
RECIPE = f"""
[model]
n_layer = 2
n_head = 4
n_embd = 32
n_inner = 64
block_size = 64

[data]
seq_len = 32
batch_size = 4

[optim]
lr = 3e-3
min_lr = 3e-4
warmup_steps = 2

[train]
max_steps = {MAX_STEPS}
eval_interval = 0
log_interval = 1
save_interval_steps = 1
keep_last = 3
seed = 7
"""
STEP_DIR = re.compile(r"^step_(\d+)$")
RESUMED = re.compile(r"resuming from (\S+) \(step (\d+)")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("crash-data")
    words = "the river of light shall come over the hills and all men rejoice in the morning".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=40)) for _ in range(300)]
    (root / "corpus.txt").write_text("\n\n".join(lines))
    out = root / "shards"
    proc = subprocess.run([*cli_command(), "prepare-data", str(root / "corpus.txt"), "--out", str(out)],
                          capture_output=True, text=True, env=cli_env(), timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return out


def train_command(recipe: Path, shards: Path, run: Path, resume: bool) -> list[str]:
    return [*cli_command(), "train", "--config", str(recipe), "--data", str(shards), "--out", str(run),
            "--no-progress", *(["--resume"] if resume else [])]


def published(run: Path) -> dict[int, Path]:
    root = run / "checkpoints"
    if not root.is_dir():
        return {}
    return {int(m.group(1)): e for e in root.iterdir() if (m := STEP_DIR.match(e.name)) and e.is_dir()}


def staging_entries(run: Path) -> list[str]:
    """Hidden entries of the checkpoint folder: a checkpoint being written (or a crash's leftover)."""
    try:
        return [e.name for e in os.scandir(run / "checkpoints") if e.name.startswith(".")]
    except FileNotFoundError:
        return []


def logged_steps(run: Path) -> list[int]:
    try:
        text = (run / "log.jsonl").read_text()
    except FileNotFoundError:
        return []
    steps = []
    for line in text.splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            pass  # a line being written right now
    return steps


def load_complete(path: Path) -> dict[str, np.ndarray]:
    """Every file of a published checkpoint, read in full; returns its weights."""
    weights = {k: np.array(v) for k, v in mx.load(str(path / "model.safetensors")).items()}
    mx.load(str(path / "optimizer.safetensors"))
    state = json.loads((path / "trainer_state.json").read_text())
    assert int(state["step"]) == int(STEP_DIR.match(path.name).group(1))
    json.loads((path / "config.json").read_text())
    return weights


def run_until_killed(cmd: list[str], trigger, log_path: Path) -> tuple[bool, str]:
    """Start the trainer, SIGKILL it as soon as `trigger()` is true; (killed, stderr)."""
    with open(log_path, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=cli_env(), stdin=subprocess.DEVNULL)
        killed = False
        try:
            while proc.poll() is None:
                if trigger():
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
                time.sleep(0.0005)
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return killed, log_path.read_text()


@pytest.mark.timeout(1800)
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(shards, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)

    straight = tmp_path / "straight"
    proc = subprocess.run(train_command(recipe, shards, straight, resume=False), capture_output=True, text=True,
                          env=cli_env(), timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    expected = load_complete(published(straight)[MAX_STEPS])

    run = tmp_path / "crashed"
    rng = np.random.default_rng(2026)
    kills = {"after-step": 0, "mid-write": 0}
    resumes_checked = 0
    for round_no in range(16):
        before = published(run)
        done = max(before) if before else 0
        if done >= MAX_STEPS - 1:
            break
        # Alternate the two kinds of moment; keep trying mid-write kills until one lands.
        want_mid_write = round_no % 2 == 1 or (kills["after-step"] >= 3 and kills["mid-write"] == 0)
        if want_mid_write:
            old = set(staging_entries(run))  # a previous crash's leftovers (the resume removes them)
            trigger = lambda old=old: any(name not in old for name in staging_entries(run))  # noqa: E731
        else:
            target = int(rng.integers(done + 1, MAX_STEPS))
            trigger = lambda target=target: any(step >= target for step in published(run))  # noqa: E731
        killed, stderr = run_until_killed(train_command(recipe, shards, run, resume=True), trigger,
                                          tmp_path / f"round{round_no}.log")
        assert "Traceback" not in stderr, stderr
        assert "skipping damaged checkpoint" not in stderr, stderr
        if before and (m := RESUMED.search(stderr)):  # the resume started from the newest complete checkpoint
            assert int(m.group(2)) == done and Path(m.group(1)).name == before[done].name, (stderr, sorted(before))
            resumes_checked += 1
        if not killed:
            break
        if want_mid_write and set(staging_entries(run)) - old:
            kills["mid-write"] += 1
        elif not want_mid_write:
            kills["after-step"] += 1
        for path in published(run).values():  # whatever was published is complete
            load_complete(path)

    assert kills["after-step"] >= 2, kills
    assert kills["mid-write"] >= 1, kills
    assert resumes_checked >= 2, resumes_checked

    before = published(run)
    final = subprocess.run(train_command(recipe, shards, run, resume=True), capture_output=True, text=True,
                           env=cli_env(), timeout=900, stdin=subprocess.DEVNULL)
    assert final.returncode == 0, final.stderr
    m = RESUMED.search(final.stderr)
    assert m is not None and int(m.group(2)) == max(before), final.stderr
    assert not staging_entries(run), "a crash's leftovers were not cleaned on resume"
    got = load_complete(published(run)[MAX_STEPS])
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert logged_steps(run) == logged_steps(straight)  # each step logged exactly once
