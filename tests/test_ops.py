"""The seam (model/ops.py): MLX's portable ops and the CPU's tuned ones (model/cpu/ops.py) agree.

Op by op, on inputs shaped like the model's (masked attention scores, wide decode steps that split
their heads over CPU streams, the LM head's row counts), and for the whole model: logits, cached
prefill and decode run once with each set of ops give the same numbers.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from nanogpt_mlx.model import ops
from nanogpt_mlx.model.cpu import blas
from nanogpt_mlx.model.cpu import ops as cpu_ops
from nanogpt_mlx.model.cpu import streams as cpu_streams
from nanogpt_mlx.model.runner import ModelRunner, PrefillChunk

PORTABLE = ops.Ops()
CPU = cpu_ops.CpuOps()


def diff(a: mx.array, b: mx.array) -> float:
    return float(np.abs(np.array(a) - np.array(b)).max())


def normal(seed: int, shape, scale: float = 1.0) -> mx.array:
    return mx.array((scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32))


@pytest.fixture
def two_streams(monkeypatch):
    """Split work over CPU streams even on a 1-core machine."""
    monkeypatch.setattr(cpu_streams.os, "cpu_count", lambda: 2)


def test_current_is_the_cpu_ops_on_the_cpu_and_using_overrides_it():
    assert mx.default_device() == mx.cpu
    assert isinstance(ops.current(), cpu_ops.CpuOps) and ops.current() is ops.current()
    with ops.using(PORTABLE):
        assert ops.current() is PORTABLE
        with ops.using(CPU):
            assert ops.current() is CPU
        assert ops.current() is PORTABLE
    assert isinstance(ops.current(), cpu_ops.CpuOps)


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    layer = nn.Linear(48, 80, bias=bias)
    layer.update({"weight": normal(1, (80, 48)), **({"bias": normal(2, (80,))} if bias else {})})
    x = normal(3, (3, 7, 48))
    assert diff(PORTABLE.linear(layer, x), CPU.linear(layer, x)) <= 1e-5
    assert diff(PORTABLE.linear(layer, x), layer(x)) == 0.0


def test_elementwise_ops_and_losses():
    x = normal(4, (4, 33, 96), scale=3.0)
    assert diff(PORTABLE.gelu(x), CPU.gelu(x)) <= 2e-6
    scores = x + nn.MultiHeadAttention.create_additive_causal_mask(96)[:33]
    assert diff(PORTABLE.softmax(scores), CPU.softmax(scores)) <= 1e-6
    assert diff(PORTABLE.log_softmax(x), CPU.log_softmax(x)) <= 1e-5
    logits, targets = normal(5, (2, 9, 500), scale=4.0), mx.array(np.random.default_rng(6).integers(0, 500, (2, 9)))
    assert diff(PORTABLE.token_cross_entropy(logits, targets), CPU.token_cross_entropy(logits, targets)) <= 1e-5
    assert abs(ops.cross_entropy(logits, targets).item() - PORTABLE.token_cross_entropy(logits, targets).mean().item()) <= 1e-5


@pytest.mark.parametrize("B,T,context", [(2, 9, 9), (3, 1, 64), (cpu_ops.SPLIT_MIN_ROWS + 4, 1, 128)],
                         ids=["prefill", "narrow-decode", "wide-decode"])
def test_attention(B, T, context, two_streams):
    """Masked as the cache view masks it; the wide decode step takes the head-split path."""
    H, D = 8, 16
    q, k, v = normal(7, (B, H, T, D)), normal(8, (B, H, context, D)), normal(9, (B, H, context, D))
    positions = np.random.default_rng(10).integers(0, context - T + 1, (B, 1)) + np.arange(T)
    allowed = np.arange(context)[None, None, None, :] <= positions[:, None, :, None]
    mask = mx.array(np.where(allowed, 0.0, -np.inf).astype(np.float32))
    calls = []
    original = ops.Ops.attention
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ops.Ops, "attention", lambda self, q, *rest: (calls.append(q.shape[1]), original(self, q, *rest))[1])
        got = CPU.attention(q, k, v, mask, D**-0.5)
    want = original(PORTABLE, q, k, v, mask, D**-0.5)
    assert got.shape == want.shape == (B, H, T, D)
    assert diff(got, want) <= 1e-5
    split = T == 1 and B >= cpu_ops.SPLIT_MIN_ROWS
    assert calls == ([H // 2, H // 2] if split else [H])


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 13])
def test_logits_heads(rows):
    head = normal(11, (32, 300))
    hidden = normal(12, (rows, 32))
    device, host = PORTABLE.logits_head(head), CPU.logits_head(head)
    assert isinstance(device, ops.DeviceHead) and isinstance(host, cpu_ops.HostHead)
    got, want = host(hidden), device(hidden)
    assert got.shape == want.shape == (rows, 300) and got.dtype == want.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5


def test_prefill_parts(two_streams):
    assert [(lo, hi) for lo, hi, _ in PORTABLE.prefill_parts(7)] == [(0, 7)]
    parts = CPU.prefill_parts(7)
    assert [(lo, hi) for lo, hi, _ in parts] == [(0, 3), (3, 7)]
    assert [(lo, hi) for lo, hi, _ in CPU.prefill_parts(1)] == [(0, 1)]
    outputs = []
    for lo, hi, where in parts:
        with where:
            outputs.append(mx.arange(lo, hi) * 2)
    threads = blas.threads()
    CPU.eval_parts(outputs)
    assert blas.threads() == threads
    assert np.array_equal(np.concatenate([np.array(o) for o in outputs]), np.arange(7) * 2)
    cpu_streams.set_enabled(False)
    try:
        assert [(lo, hi) for lo, hi, _ in CPU.prefill_parts(7)] == [(0, 7)]
    finally:
        cpu_streams.set_enabled(True)


def test_the_whole_model_agrees_under_both_sets_of_ops(random_model, tiny_config, two_streams):
    """Training forward and loss, a batched prefill (in parts on the CPU) and a wide decode step
    (heads split on the CPU), each run once with the portable ops and once with the CPU's."""
    model = random_model(tiny_config, seed=21)
    rng = np.random.default_rng(22)
    toks = mx.array(rng.integers(0, tiny_config.vocab_size, (3, 40)).astype(np.int32))
    rows = cpu_ops.SPLIT_MIN_ROWS
    prompts = [rng.integers(0, tiny_config.vocab_size, 5 + 3 * r).tolist() for r in range(rows)]
    results = {}
    for name, chosen in (("portable", PORTABLE), ("cpu", CPU)):
        with ops.using(chosen) if name == "portable" else contextlib.nullcontext():
            # MLX's step (not the C one), uncompiled: a compiled step keeps its first trace
            runner = ModelRunner(model, max_rows=rows, compile=False, host_decode=False)
            prefill = runner.prefill_many([PrefillChunk(r, p, 0, all_logits=(r == 2)) for r, p in enumerate(prompts)])
            step = runner.decode(np.arange(rows), np.array([len(p) for p in prompts]))
            results[name] = (np.array(model(toks)), model.loss(toks[:, :-1], toks[:, 1:]).item(), prefill, step)
    portable, cpu = results["portable"], results["cpu"]
    assert np.abs(portable[0] - cpu[0]).max() <= 1e-5
    assert abs(portable[1] - cpu[1]) <= 1e-5
    for a, b in zip(portable[2], cpu[2]):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5
    assert np.abs(portable[3] - cpu[3]).max() <= 1e-5


@pytest.mark.parametrize("module", ["gpt.py", "kv_cache.py", "ops.py"])
def test_the_maths_does_not_import_the_cpu_package_at_module_level(module):
    """The model reaches the CPU's machinery only through ops.current()."""
    tree = ast.parse((Path(ops.__file__).parent / module).read_text())
    imported = [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    assert imported and not any(name.startswith("nanogpt_mlx.model.cpu") for name in imported), imported
