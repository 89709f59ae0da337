"""`nanogpt-mlx` through real subprocesses: generate, --help everywhere, exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from nanogpt_mlx.cli import build_parser
from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.model.generate import generate_tokens
from nanogpt_mlx.model.sampling import SamplingParams
from nanogpt_mlx.model.tokenizer import EOT_ID, get_tokenizer

from conftest import cli_command, cli_env

PROMPT = "Once upon a time"


def library_text(model_dir, prompt: str, max_tokens: int, params: SamplingParams) -> str:
    """What `generate` should print after the prompt, computed with the library directly."""
    model = load_model(model_dir)
    tok = get_tokenizer(model_dir)
    out = []
    for t in generate_tokens(model, tok.encode(prompt), max_tokens, params, stop_tokens=frozenset({EOT_ID})):
        if t == EOT_ID:
            break
        out.append(t)
    return tok.decode(out)


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


# --- --help -----------------------------------------------------------------------------------------
def test_help_of_every_subcommand(run_cli):
    commands = subcommands()
    assert {"info", "generate", "convert"} <= set(commands)
    top = run_cli("--help")
    assert top.returncode == 0 and "usage: nanogpt-mlx" in top.stdout
    for command in commands:
        proc = run_cli(command, "--help", timeout=120)
        assert proc.returncode == 0, (command, proc.stderr)
        assert f"usage: nanogpt-mlx {command}" in proc.stdout, (command, proc.stdout)
        assert "Traceback" not in proc.stderr


def test_version_and_no_command(run_cli):
    from nanogpt_mlx import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"nanogpt-mlx {__version__}"
    proc = run_cli()
    assert proc.returncode == 2 and "usage:" in proc.stdout


def test_module_entry_point(tiny_checkpoint):
    import sys

    proc = subprocess.run([sys.executable, "-m", "nanogpt_mlx", "--version"], capture_output=True, text=True, env=cli_env())
    assert proc.returncode == 0 and proc.stdout.startswith("nanogpt-mlx ")


def test_generate_help_lists_the_flags(run_cli):
    out = run_cli("generate", "--help").stdout
    for flag in ("--model", "--prompt", "--max-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--device"):
        assert flag in out


# --- generate -----------------------------------------------------------------------------------------
def test_greedy_generate_matches_the_library(run_cli, tiny_checkpoint):
    proc = run_cli("generate", "--model", tiny_checkpoint, "--prompt", PROMPT, "--max-tokens", "40", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    expected = library_text(tiny_checkpoint, PROMPT, 40, SamplingParams(temperature=0.0))
    assert len(expected) > 0
    assert proc.stdout == PROMPT + expected + "\n"


def test_greedy_generate_full_size(run_cli, full_checkpoint):
    proc = run_cli("generate", "--model", full_checkpoint, "--prompt", PROMPT, "--max-tokens", "12", "--temperature", "0", "--stats")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMPT + library_text(full_checkpoint, PROMPT, 12, SamplingParams(temperature=0.0)) + "\n"
    assert re.search(r"\d+ tokens in [\d.]+ s: [\d.]+ tok/s", proc.stderr), proc.stderr


def test_seed_reproducibility_and_filters(run_cli, tiny_checkpoint):
    def gen(seed: int, *extra: str) -> str:
        proc = run_cli(
            "generate",
            "--model",
            tiny_checkpoint,
            "--prompt",
            PROMPT,
            "--max-tokens",
            "30",
            "--temperature",
            "1.0",
            "--seed",
            str(seed),
            *extra,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    a, b, c = gen(7), gen(7), gen(8)
    assert a == b and a != c
    filtered = gen(7, "--top-k", "20", "--top-p", "0.9")
    assert filtered == gen(7, "--top-k", "20", "--top-p", "0.9")
    expected = library_text(tiny_checkpoint, PROMPT, 30, SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7))
    assert filtered == PROMPT + expected + "\n"


def test_max_tokens_is_capped_by_the_context(run_cli, tiny_checkpoint):
    prompt = " word" * 100  # 100 tokens; the tiny context is 128
    assert len(get_tokenizer().encode(prompt)) == 100
    proc = run_cli("generate", "--model", tiny_checkpoint, "--prompt", prompt, "--max-tokens", "1000", "--temperature", "0", "--stats")
    assert proc.returncode == 0, proc.stderr
    n = int(re.search(r"(\d+) tokens in", proc.stderr).group(1))
    assert 1 <= n <= 28


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--max-tokens", "0"], "--max-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-3"], "--top-k"),
    ],
)
def test_generate_rejects_bad_values(run_cli, tiny_checkpoint, flags, fragment):
    proc = run_cli("generate", "--model", tiny_checkpoint, "--prompt", "hi", *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and fragment in proc.stderr


def test_generate_prompt_longer_than_context(run_cli, tiny_checkpoint):
    proc = run_cli("generate", "--model", tiny_checkpoint, "--prompt", " word" * 200)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "context" in proc.stderr


def test_generate_unknown_flag_and_missing_prompt(run_cli, tiny_checkpoint):
    assert run_cli("generate", "--model", tiny_checkpoint, "--prompt", "x", "--bogus").returncode == 2
    assert run_cli("generate", "--model", tiny_checkpoint).returncode == 2


def test_generate_device_gpu_without_gpu_is_a_clean_error(run_cli, tiny_checkpoint):
    import mlx.core as mx

    if mx.is_available(mx.gpu):
        pytest.skip("this machine has a GPU")
    proc = run_cli("generate", "--model", tiny_checkpoint, "--prompt", "x", "--device", "gpu")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_generate_on_cpu_device_flag(run_cli, tiny_checkpoint):
    proc = run_cli("generate", "--model", tiny_checkpoint, "--prompt", PROMPT, "--max-tokens", "5", "--temperature", "0", "--device", "cpu")
    assert proc.returncode == 0 and proc.stdout.startswith(PROMPT)


def test_generate_streams_before_it_finishes(full_checkpoint):
    """Generated text reaches the pipe while the process is still generating (not block-buffered)."""
    proc = subprocess.Popen(
        [
            *cli_command(),
            "generate",
            "--model",
            str(full_checkpoint),
            "--prompt",
            PROMPT,
            "--max-tokens",
            "400",
            "--temperature",
            "1",
            "--seed",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    try:
        received = b""
        deadline = time.monotonic() + 180
        while len(received) < len(PROMPT) + 20 and time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            received += chunk
        still_running = proc.poll() is None
        assert received.startswith(PROMPT.encode())
        assert len(received) >= len(PROMPT) + 20, received
        assert still_running, "all output arrived only when the process exited"
    finally:
        proc.kill()
        proc.wait()
