"""The host decode path (model/cpu/host_decode.py): whole decode steps of a few rows in one C call.

It must compute what MLX computes, over the same KV cache: logits equal MLX's forward within
float tolerance for 1-8 rows at different lengths (also past a context bucket), its cache writes
are the ones MLX reads afterwards (and the other way round), greedy generation through the runner
is the MLX path's token for token, and NANOGPT_MLX_HOST_DECODE=0 restores the MLX path.
"""

from __future__ import annotations

import gc
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from nanogpt_mlx.model import ops
from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.cpu import host_decode
from nanogpt_mlx.model.cpu.ops import HOST_MAX_ROWS
from nanogpt_mlx.model.generate import generate_tokens
from nanogpt_mlx.model.runner import CONTEXT_BUCKET, ModelRunner

# Odd sizes on purpose: head_dim 12 (not a multiple of the C code's vectors), outputs that are
# not a multiple of its panels, a vocabulary that is not either.
ODD_CONFIG = ModelConfig(n_layer=3, n_head=4, n_embd=48, n_inner=136, block_size=160, vocab_size=1003)
RELATIVE = 1e-4

pytestmark = pytest.mark.skipif(host_decode.load_library() is None, reason=f"host decode library not built: {host_decode.failure()}")


@pytest.fixture(autouse=True)
def _on_the_cpu():
    if mx.default_device() != mx.cpu:
        pytest.skip("the host path serves the CPU device")


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) <= RELATIVE * max(1.0, float(np.abs(b).max()))


def prompts(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("config_name", ["tiny", "odd"])
@pytest.mark.parametrize("B", [1, 2, 5, 8])
def test_host_step_equals_mlx_step(random_model, tiny_config, config_name, B):
    """Two runners over the same weights and prompts, one decoding in C and one in MLX: same logits
    and same cache contents, step after step, rows at different lengths (some crossing a bucket)."""
    config = tiny_config if config_name == "tiny" else ODD_CONFIG
    model = random_model(config, seed=B)
    host = ModelRunner(model, max_rows=8)
    plain = ModelRunner(model, max_rows=8, host_decode=False)
    assert host.decoder is not None and plain.decoder is None
    # lengths just below a bucket boundary, so the steps cross it
    lengths = [CONTEXT_BUCKET - 2, 3, 17, CONTEXT_BUCKET + 1, 40, 100, 9, 1][:B]
    for row, seq in enumerate(prompts(B, lengths, config.vocab_size)):
        for runner in (host, plain):
            runner.prefill(row, seq, 0)
    positions = np.array(lengths, dtype=np.int32)
    rng = np.random.default_rng(100 + B)
    for _ in range(4):
        toks = rng.integers(0, config.vocab_size, B).astype(np.int32)
        got = host.decode(toks, positions)
        want = plain.decode(toks, positions)
        assert got.shape == want.shape == (B, config.vocab_size) and got.dtype == np.float32
        assert close(got, want), float(np.abs(got - want).max())
        positions = positions + 1
    for layer in range(config.n_layer):
        for mine, theirs in ((host.cache.keys[layer], plain.cache.keys[layer]), (host.cache.values[layer], plain.cache.values[layer])):
            assert close(np.array(mine[:B]), np.array(theirs[:B]))


def test_host_step_equals_the_uncached_forward(random_model, tiny_config):
    """Against the plain full-sequence forward: prefill in MLX, then every step in C."""
    model = random_model(tiny_config, seed=7)
    runner = ModelRunner(model, max_rows=2)
    seq = prompts(3, [90], tiny_config.vocab_size)[0]
    reference = np.array(model(mx.array(np.asarray(seq, dtype=np.int32)[None, :])))[0]
    runner.prefill(0, seq[:50], 0)
    for pos in range(50, 90):
        step = runner.decode(np.array([seq[pos]], dtype=np.int32), np.array([pos], dtype=np.int32))
        assert close(step[0], reference[pos]), pos


def test_cache_is_shared_both_ways(random_model, tiny_config):
    """Keys written by a C step are what an MLX step attends to next, and the other way round,
    and the cache arrays keep their memory (MLX never reallocates them)."""
    model = random_model(tiny_config, seed=3)
    mixed = ModelRunner(model, max_rows=3)
    plain = ModelRunner(model, max_rows=3, host_decode=False)
    seqs = prompts(5, [20, 33, 70], tiny_config.vocab_size)
    for row, seq in enumerate(seqs):
        mixed.prefill(row, seq, 0)
        plain.prefill(row, seq, 0)
    addresses = [np.asarray(a).__array_interface__["data"][0] for a in mixed.cache.state()]
    decoder, positions = mixed.decoder, np.array([20, 33, 70], dtype=np.int32)
    rng = np.random.default_rng(0)
    for step in range(6):
        toks = rng.integers(0, tiny_config.vocab_size, 3).astype(np.int32)
        mixed.decoder = decoder if step % 2 == 0 else None  # alternate C and MLX steps
        assert close(mixed.decode(toks, positions), plain.decode(toks, positions)), step
        positions = positions + 1
    mixed.move_row(2, 0)  # an MLX copy of what C wrote
    plain.move_row(2, 0)
    mixed.decoder = decoder
    toks = np.array([5, 6], dtype=np.int32)
    assert close(mixed.decode(toks, positions[[2, 1]]), plain.decode(toks, positions[[2, 1]]))
    assert [np.asarray(a).__array_interface__["data"][0] for a in mixed.cache.state()] == addresses


class Counting:
    """A decoder that counts the rows of the steps it serves."""

    def __init__(self, decoder):
        self.decoder, self.max_rows, self.calls = decoder, decoder.max_rows, []

    def __call__(self, tokens, *rest):
        self.calls.append(len(tokens))
        return self.decoder(tokens, *rest)


def test_runner_uses_the_host_path_up_to_its_rows(random_model, tiny_config):
    model = random_model(tiny_config, seed=1)
    runner = ModelRunner(model, max_rows=HOST_MAX_ROWS + 2)
    assert runner.decoder.max_rows == HOST_MAX_ROWS
    runner.decoder = counting = Counting(runner.decoder)
    for B in (1, HOST_MAX_ROWS, HOST_MAX_ROWS + 1):
        runner.decode(np.zeros(B, dtype=np.int32), np.zeros(B, dtype=np.int32))
    assert counting.calls == [1, HOST_MAX_ROWS]


def test_greedy_generation_equals_the_mlx_path(random_model, full_config):
    """`generate_tokens` (nanogpt-mlx generate) at the card's shape: host path == MLX path, token for token."""
    model = random_model(full_config, seed=11)
    prompt = prompts(2, [50], full_config.vocab_size)[0]
    host = list(generate_tokens(model, prompt, 40))
    with ops.using(ops.PORTABLE):  # MLX's own ops offer no host path
        plain = list(generate_tokens(model, prompt, 40))
    assert host == plain


def test_steps_are_bitwise_reproducible_across_models_and_decoders(full_checkpoint, full_config):
    """The same checkpoint loaded anew, each with a fresh decoder and thread pool: every step's
    logits identical to the bit. A worker that ran a chunk of the next phase before it was
    published (a race in the pool's hand-over between phases) made some instances differ from
    the first step on, by whole logits."""
    prompt = prompts(5, [5], full_config.vocab_size)[0]
    runs = []
    for _ in range(8):
        runner = ModelRunner(load_model(full_checkpoint), max_rows=1)
        token = int(runner.prefill(0, prompt, 0).argmax())
        steps = []
        for i in range(24):
            logits = runner.decode(np.array([token], dtype=np.int32), np.array([len(prompt) + i], dtype=np.int32))[0]
            steps.append(logits.copy())
            token = int(logits.argmax())
        runs.append(steps)
        del runner
        gc.collect()
    for steps in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(steps, runs[0]))


def test_weights_are_packed_once_per_model_and_again_after_a_change(random_model, tiny_config):
    model = random_model(tiny_config, seed=2)
    first = ModelRunner(model, max_rows=1).decoder.weights
    assert ModelRunner(model, max_rows=1).decoder.weights is first
    model.update({"ln_f": {"weight": model.ln_f.weight * 2, "bias": model.ln_f.bias}})
    runner = ModelRunner(model, max_rows=1)
    plain = ModelRunner(model, max_rows=1, host_decode=False)
    assert runner.decoder.weights is not first
    seq = prompts(9, [12], tiny_config.vocab_size)[0]
    runner.prefill(0, seq, 0)
    plain.prefill(0, seq, 0)
    toks, pos = np.array([3], dtype=np.int32), np.array([12], dtype=np.int32)
    assert close(runner.decode(toks, pos), plain.decode(toks, pos))


def test_env_switch_turns_the_host_path_off():
    """NANOGPT_MLX_HOST_DECODE=0: no decoder, every step in MLX (a fresh process: read at runner creation)."""
    code = (
        "import nanogpt_mlx, mlx.core as mx\n"
        "from nanogpt_mlx.model.config import ModelConfig\n"
        "from nanogpt_mlx.model.gpt import GPT\n"
        "from nanogpt_mlx.model.runner import ModelRunner\n"
        "m = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_inner=32, block_size=32, vocab_size=50))\n"
        "print(ModelRunner(m, max_rows=1).decoder is None)\n"
    )
    for value, expected in (("0", "True"), ("1", "False")):
        env = {**__import__("os").environ, "NANOGPT_MLX_HOST_DECODE": value}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == expected


def test_bad_input_is_rejected_not_read_out_of_bounds(random_model, tiny_config):
    model = random_model(tiny_config, seed=4)
    runner = ModelRunner(model, max_rows=2)
    cache = (runner.cache.keys, runner.cache.values)
    with pytest.raises(ValueError):
        runner.decoder(np.array([tiny_config.vocab_size], dtype=np.int32), np.array([0], dtype=np.int32), *cache)
    with pytest.raises(ValueError):
        runner.decoder(np.array([1], dtype=np.int32), np.array([-1], dtype=np.int32), *cache)


def float64_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation computed in float64 NumPy from the model's weights (a KV cache of lists)."""
    from math import erf, sqrt

    from mlx.utils import tree_flatten

    w = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(model.parameters())}
    c = model.config
    H, D = c.n_head, c.head_dim
    gelu = np.vectorize(lambda u: 0.5 * u * (1.0 + erf(u / sqrt(2.0))))

    def norm(x, name):
        mu, var = x.mean(), x.var()
        return (x - mu) / np.sqrt(var + c.layer_norm_eps) * w[f"{name}.weight"] + w[f"{name}.bias"]

    cache = [([], []) for _ in range(c.n_layer)]

    def step(token, pos):
        x = w["wte.weight"][token] + w["wpe.weight"][pos]
        for i in range(c.n_layer):
            p = f"h.{i}"
            qkv = w[f"{p}.attn.c_attn.weight"] @ norm(x, f"{p}.ln_1") + w[f"{p}.attn.c_attn.bias"]
            q, k, v = (t.reshape(H, D) for t in np.split(qkv, 3))
            cache[i][0].append(k)
            cache[i][1].append(v)
            K, V = np.stack(cache[i][0], axis=1), np.stack(cache[i][1], axis=1)  # (H, T, D)
            s = np.einsum("hd,htd->ht", q, K) / np.sqrt(D)
            a = np.exp(s - s.max(axis=1, keepdims=True))
            y = np.einsum("ht,htd->hd", a / a.sum(axis=1, keepdims=True), V).reshape(-1)
            x = x + w[f"{p}.attn.c_proj.weight"] @ y + w[f"{p}.attn.c_proj.bias"]
            h = gelu(w[f"{p}.mlp.c_fc.weight"] @ norm(x, f"{p}.ln_2") + w[f"{p}.mlp.c_fc.bias"])
            x = x + w[f"{p}.mlp.c_proj.weight"] @ h + w[f"{p}.mlp.c_proj.bias"]
        return w["lm_head.weight"] @ norm(x, "ln_f")

    for pos, token in enumerate(prompt[:-1]):
        step(token, pos)
    out, token = [], prompt[-1]
    for pos in range(len(prompt) - 1, len(prompt) - 1 + n):
        token = int(np.argmax(step(token, pos)))
        out.append(token)
    return out


def test_greedy_generation_equals_the_float64_reference_on_the_bundled_checkpoint():
    """The trained weights (real margins between tokens): host-path greedy == float64 greedy."""
    from nanogpt_mlx.model.checkpoint import load_model
    from nanogpt_mlx.model.cli import DEFAULT_CHECKPOINT
    from nanogpt_mlx.model.tokenizer import get_tokenizer

    model = load_model(DEFAULT_CHECKPOINT)
    tokenizer = get_tokenizer(DEFAULT_CHECKPOINT)
    for text in ("The history of the city begins", "In 1998, the company announced that"):
        prompt = tokenizer.encode(text)
        assert list(generate_tokens(model, prompt, 24)) == float64_greedy(model, prompt, 24), text
