"""Softmax, cross-entropy and GELU written out for MLX's CPU JIT, with their gradients.

On CPU, MLX's primitive `exp` (inside `mx.softmax`, `mx.logsumexp`, ...) and `erf` are scalar and
single-threaded. The same max / exp / sum written out as separate ops and traced by `mx.compile`
becomes one JIT-fused, vectorized kernel several times faster (attention softmax, the
cross-entropy over 50,257 logits, the MLP's GELU; measured in benchmarks/README.md). Autodiff
through the written-out forms would keep extra (N, V) temporaries alive, so each function is an
`mx.custom_function` whose backward pass is one fused kernel as well:

- `softmax(x)` over the last axis: backward y * (g - sum(g * y));
- `cross_entropy(logits, targets)`: backward softmax - onehot, from the forward's saved exps;
- `gelu(x)`, exact erf form with erf as a rational function (Phi within 5e-7 of libm's), written
  so the JIT vectorizes it: backward Phi(x) + x phi(x).

They are what the CPU ops (ops.py) use. On a GPU (Metal, CUDA) MLX's native kernels are fast and
the portable ops (model/ops.py) use those. `set_fast_ops(False)` makes these functions fall back
to MLX's ops, so benchmarks can compare side by side (benchmarks/fast_ops.py).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

_enabled = True


def set_fast_ops(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def use_fast_ops() -> bool:
    """The written-out kernels pay on CPU only."""
    return _enabled and mx.default_device() == mx.cpu


# --- softmax over the last axis --------------------------------------------------------------
@mx.compile
def _softmax_forward(x: mx.array) -> mx.array:
    e = mx.exp(x - x.max(axis=-1, keepdims=True))
    return e * (1.0 / e.sum(axis=-1, keepdims=True))


@mx.compile
def _softmax_backward(y: mx.array, cotangent: mx.array) -> mx.array:
    return y * (cotangent - (cotangent * y).sum(axis=-1, keepdims=True))


@mx.custom_function
def _softmax(x: mx.array) -> mx.array:
    return _softmax_forward(x)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return _softmax_backward(output, cotangent)


def softmax(x: mx.array) -> mx.array:
    return _softmax(x) if use_fast_ops() else mx.softmax(x, axis=-1, precise=True)


def log_softmax(x: mx.array) -> mx.array:
    """x - logsumexp(x) over the last axis, written out (plain autodiff; distillation uses it)."""
    m = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return x - (m + mx.log(mx.exp(x - m).sum(axis=-1, keepdims=True)))


# --- cross-entropy ---------------------------------------------------------------------------
@mx.custom_function
def _cross_entropy_rows(logits: mx.array, targets: mx.array):
    """(N, V) logits, (N,) targets -> (per-row loss, exp(logits - max) (N, V), 1 / row sums (N, 1)).

    The exponentials are an output so that the backward pass reuses them instead of computing
    N x V exps again, at the same peak memory (the (N, V) array exists either way).
    """
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = mx.exp(logits - m)
    s = e.sum(axis=-1, keepdims=True)
    target_logit = mx.take_along_axis(logits, targets[:, None], axis=-1)
    return (m + mx.log(s) - target_logit)[:, 0], e, 1.0 / s


@_cross_entropy_rows.vjp
def _cross_entropy_rows_vjp(primals, cotangents, outputs):
    logits, targets = primals
    _, e, inv_sum = outputs
    # softmax - onehot from the saved exponentials: one fused pass, one (N, V) output, no exp.
    onehot = mx.arange(logits.shape[-1]) == targets[:, None]
    grad = (e * inv_sum - onehot) * cotangents[0][:, None]
    return grad, mx.zeros_like(targets)


def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position -log p(target): logits (..., V), targets (...) -> (...)."""
    *lead, vocab = logits.shape
    flat_logits = logits.astype(mx.float32).reshape(-1, vocab)
    flat_targets = targets.astype(mx.int32).reshape(-1)
    if use_fast_ops():
        rows = _cross_entropy_rows(flat_logits, flat_targets)[0]
    else:
        rows = nn.losses.cross_entropy(flat_logits, flat_targets, reduction="none")
    return rows.reshape(lead)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy (nats)."""
    return token_cross_entropy(logits, targets).mean()


# --- exact (erf) GELU ------------------------------------------------------------------------
# GELU(x) = x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2. erf(z) = z P(z^2) / Q(z^2) on |z| <= 4
# (erf(4) = 1 - 1.5e-8, so clamping there is exact in fp32), fitted for this project by weighted
# least squares (Sanathanan-Koerner iterations) on [0, 4]; in fp32 Phi is within 5e-7 of libm's.
_ERF_P = (2.102735795705968e-06, 0.000283793050490061, 0.0036242040595860416, 0.052309324090278816,
          0.1868178224210773, 1.1283791459523744)  # highest power first
_ERF_Q = (3.858614179573505e-05, 0.0011323900517232772, 0.014680654220713907, 0.11265852257385571,
          0.49889591943481076, 1.0)

# Written for MLX's CPU JIT, which fuses at most ~11 dependent ops into one kernel and does not
# vectorize a kernel holding a min/max: with `clip` and Horner's rule the GELU ran as 7 scalar
# kernels, this form as 2 vectorized ones (measured in benchmarks/README.md).
# - The clamp is |x + c| - |x - c| = 2 clamp(x, -c, c), c = 4 sqrt 2: abs vectorizes, min/max not.
# - P and Q are evaluated in w^2 (coefficients rescaled) by Estrin's scheme: depth 4, not 10.
_CLAMP = 4.0 * math.sqrt(2.0)
_W2_PER_Z2 = 8.0  # w = 2 clamp(x) = 2 sqrt 2 z, so w^2 = 8 z^2


def _in_w2(coefficients: tuple[float, ...]) -> tuple[float, ...]:
    """Coefficients of a polynomial in z^2 (highest first) as one in w^2 = 8 z^2."""
    degree = len(coefficients) - 1
    return tuple(c / _W2_PER_Z2 ** (degree - i) for i, c in enumerate(coefficients))


_PHI_P, _PHI_Q = _in_w2(_ERF_P), _in_w2(_ERF_Q)


def _estrin5(s: mx.array, s2: mx.array, c: tuple[float, ...]) -> mx.array:
    """c[0] s^5 + c[1] s^4 + ... + c[5], as three pairs combined by powers of s^2."""
    return ((c[0] * s + c[1]) * s2 + (c[2] * s + c[3])) * s2 + (c[4] * s + c[5])


def _normal_cdf(x: mx.array) -> mx.array:
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2, branch-free (see above)."""
    w = mx.abs(x + _CLAMP) - mx.abs(x - _CLAMP)  # 2 clamp(x), so z = w / (2 sqrt 2)
    s = w * w
    s2 = s * s
    # erf(z) / 2 = z P / (2 Q) = w P / (4 sqrt 2 Q)
    return 0.5 + (w * (_INV_SQRT2 / 4.0)) * (_estrin5(s, s2, _PHI_P) / _estrin5(s, s2, _PHI_Q))


@mx.compile
def _gelu_forward(x: mx.array) -> mx.array:
    return x * _normal_cdf(x)


@mx.compile
def _gelu_backward(x: mx.array, cotangent: mx.array) -> mx.array:
    # d/dx [x Phi(x)] = Phi(x) + x phi(x)
    pdf = _INV_SQRT_2PI * mx.exp(-0.5 * x * x)
    return cotangent * (_normal_cdf(x) + x * pdf)


@mx.custom_function
def _gelu(x: mx.array) -> mx.array:
    return _gelu_forward(x)


@_gelu.vjp
def _gelu_vjp(primals, cotangent, output):
    # A single-input custom_function gets its primal as is, not in a tuple.
    return _gelu_backward(primals, cotangent)


def gelu(x: mx.array) -> mx.array:
    return _gelu(x) if use_fast_ops() else nn.gelu(x)
