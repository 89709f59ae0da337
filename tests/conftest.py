"""Shared fixtures for the whole test suite.

`nanogpt_mlx` is imported here, before anything imports `mlx.core`, so the test process gets the
same optimized runtime (MKL, FTZ/DAZ, malloc) as the CLI. Keep this file general: fixtures that
only one test file needs belong in that file.

Fixtures
  tiny_config        a 2-layer, 32-wide ModelConfig with the real vocabulary (fast)
  full_config        the card's default shape (52,990,464 parameters)
  random_model       factory: random_model(config, seed) -> GPT with *every* tensor random
                     (biases and LayerNorm parameters too, so a misplaced tensor cannot hide)
  tiny_checkpoint    session-scoped HF GPT-2 directory of a random tiny model (fp32)
  http, sdk          httpx and the openai SDK on the module's own `server` fixture
  full_checkpoint    session-scoped HF GPT-2 directory of a random full-size model (fp32)
  run_cli            run `nanogpt-mlx ...` in a real subprocess; returns CompletedProcess
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nanogpt_mlx  # noqa: F401  (must precede mlx.core: prepares BLAS / FTZ / malloc)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from nanogpt_mlx.model.checkpoint import save_checkpoint
from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.gpt import GPT

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_CONFIG = ModelConfig(n_layer=2, n_head=4, n_embd=32, n_inner=64, block_size=128)
FULL_CONFIG = ModelConfig()


def randomize(model: GPT, seed: int = 0, std: float = 0.05) -> GPT:
    """Give every parameter of `model` seeded random values (weights, biases, LayerNorms)."""
    rng = np.random.default_rng(seed)
    new = []
    for name, p in sorted(nn.utils.tree_flatten(model.parameters())):
        if (".ln_" in name or name.startswith("ln_f")) and name.endswith("weight"):
            value = 1.0 + 0.1 * rng.standard_normal(p.shape)
        elif name.endswith("bias"):
            value = 0.1 * rng.standard_normal(p.shape)
        else:
            value = std * rng.standard_normal(p.shape)
        new.append((name, mx.array(value.astype(np.float32))))
    model.load_weights(new)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return TINY_CONFIG


@pytest.fixture(scope="session")
def full_config() -> ModelConfig:
    return FULL_CONFIG


@pytest.fixture(scope="session")
def random_model():
    def make(config: ModelConfig = TINY_CONFIG, seed: int = 0, std: float = 0.05) -> GPT:
        return randomize(GPT(config), seed=seed, std=std)

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, random_model) -> Path:
    """A random tiny model saved as a HF GPT-2 directory (read-only for tests: copy to modify)."""
    return save_checkpoint(random_model(TINY_CONFIG, seed=1), tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def full_checkpoint(tmp_path_factory, random_model) -> Path:
    """A random model of the card's full shape saved as a HF GPT-2 directory (read-only)."""
    return save_checkpoint(random_model(FULL_CONFIG, seed=2), tmp_path_factory.mktemp("ckpt") / "full")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def cli_command() -> list[str]:
    """The installed `nanogpt-mlx` console script of this interpreter, else `python -m nanogpt_mlx`."""
    script = Path(sys.executable).with_name("nanogpt-mlx")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "nanogpt_mlx"]


@pytest.fixture(scope="session")
def run_cli():
    """Run `nanogpt-mlx ARGS...` as a real subprocess (the installed console script)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300, check: bool = False) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*cli_command(), *map(str, args)],
            capture_output=True,
            text=True,
            encoding="utf-8",
            env=env or cli_env(),
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"nanogpt-mlx {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stderr}")
        return proc

    return run


# --- clients of a module's `server` fixture (each server test module defines its own `server`:
# a ThreadedServer with the settings it tests) ------------------------------------------------------
@pytest.fixture(scope="module")
def http(server):
    """httpx on the module's server."""
    import httpx

    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(server):
    """The `openai` SDK on the module's server."""
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
