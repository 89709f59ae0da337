"""The written-out softmax / cross-entropy / GELU (model/cpu/fast_ops.py) against MLX's own ops.

Values and gradients must agree, eagerly and under `mx.compile` (where the training step runs
them), including masked (-inf) attention scores; switching fast ops off must give MLX's ops.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from nanogpt_mlx.model.cpu import fast_ops


@pytest.fixture
def scores():
    x = mx.random.normal((3, 4, 17, 17), key=mx.random.key(0)) * 4
    mask = nn.MultiHeadAttention.create_additive_causal_mask(17)
    return x + mask


def close(a, b, tol):
    return float(np.abs(np.array(a) - np.array(b)).max()) <= tol


def test_softmax_value_and_gradient_with_a_causal_mask(scores):
    g = mx.random.normal(scores.shape, key=mx.random.key(1))
    ours = lambda x: (fast_ops._softmax(x) * g).sum()  # noqa: E731
    ref = lambda x: (mx.softmax(x, axis=-1, precise=True) * g).sum()  # noqa: E731
    assert close(fast_ops._softmax(scores), mx.softmax(scores, axis=-1, precise=True), 1e-6)
    assert close(mx.grad(ours)(scores), mx.grad(ref)(scores), 1e-5)
    assert close(mx.compile(mx.grad(ours))(scores), mx.grad(ref)(scores), 1e-5)
    assert float(fast_ops._softmax(scores)[0, 0, 0, 1]) == 0.0  # a masked score gets exactly 0


def test_cross_entropy_value_and_gradient():
    logits = mx.random.normal((2, 9, 300), key=mx.random.key(2)) * 3
    targets = mx.random.randint(0, 300, (2, 9), key=mx.random.key(3))
    ref = lambda l: nn.losses.cross_entropy(l.reshape(-1, 300), targets.reshape(-1)).mean()  # noqa: E731
    ours = lambda l: fast_ops.cross_entropy(l, targets)  # noqa: E731
    assert abs(float(ours(logits)) - float(ref(logits))) <= 1e-5
    assert close(fast_ops.token_cross_entropy(logits, targets), nn.losses.cross_entropy(logits, targets), 1e-5)
    assert close(mx.grad(ours)(logits), mx.grad(ref)(logits), 1e-6)
    assert close(mx.compile(mx.grad(ours))(logits), mx.grad(ref)(logits), 1e-6)


def test_gelu_is_the_exact_erf_form_with_its_gradient():
    x = mx.linspace(-8, 8, 1001)
    g = mx.random.normal(x.shape, key=mx.random.key(4))
    assert close(fast_ops._gelu(x), nn.gelu(x), 2e-6)  # erf as a rational function
    v = np.linspace(-12, 12, 240001, dtype=np.float32)
    reference = np.array([0.5 * (1.0 + math.erf(a / math.sqrt(2.0))) for a in v.astype(np.float64)])
    assert np.abs(np.array(fast_ops._normal_cdf(mx.array(v))) - reference).max() <= 5e-7
    assert not close(fast_ops._gelu(x), nn.gelu_approx(x), 1e-4)  # the tanh form would be caught
    ours = lambda x: (fast_ops._gelu(x) * g).sum()  # noqa: E731
    ref = lambda x: (nn.gelu(x) * g).sum()  # noqa: E731
    assert close(mx.grad(ours)(x), mx.grad(ref)(x), 1e-5)


def test_switching_fast_ops_off_uses_mlx_ops(scores):
    try:
        fast_ops.set_fast_ops(False)
        assert not fast_ops.use_fast_ops()
        assert close(fast_ops.softmax(scores), mx.softmax(scores, axis=-1, precise=True), 0.0)
        assert close(fast_ops.gelu(scores[0, 0]), nn.gelu(scores[0, 0]), 0.0)
    finally:
        fast_ops.set_fast_ops(True)
    assert fast_ops.use_fast_ops()  # on this machine's CPU
