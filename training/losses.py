"""Losses for training, evaluation and distillation.

All take logits (B, T, V) and return a scalar mean over the B*T positions. On CPU the exp
inside a softmax over a 50,257-token vocabulary is a large share of a training step
(12x512x50257 = 309M exps, ~4 s with MLX's native exp), so these functions compute each
log-softmax once and reuse it.
"""

from __future__ import annotations

import mlx.core as mx


# Cody-Waite range reduction: exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, with
# ln 2 split in a high part (few mantissa bits, so n * LN2_HI is exact) and a low part.
_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06
# Taylor coefficients of exp(r) to degree 7 (truncation error < 2e-8 relative for |r| <= 0.347),
# highest first for Horner's scheme.
_EXP_COEFFS = (1 / 5040, 1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0)


def fast_exp(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 88 from multiplies and adds (relative error < 4e-6 over [-87, 0]).

    MLX's CPU exp runs at ~75 M elements/s, single-threaded; inside `mx.compile` this fuses
    into one kernel that is several times faster. Inputs below -87 return exp(-87) ~ 1.6e-38
    (instead of denormals or 0): negligible next to the row maximum's exp(0) = 1.
    """
    x = mx.maximum(x, -87.0)
    n = mx.floor(x * _LOG2E + 0.5)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = mx.array(_EXP_COEFFS[0], dtype=mx.float32)
    for c in _EXP_COEFFS[1:]:
        p = p * r + c
    two_to_n = mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)  # IEEE-754 exponent field
    return p * two_to_n


@mx.custom_function
def _ce_rows(logits: mx.array, targets: mx.array):
    """(per-position loss, logsumexp) with a hand-written gradient: softmax - onehot.

    Autodiff through logsumexp would run a second full-vocabulary exp pass plus its own
    bookkeeping; returning the logsumexp lets the backward pass compute the softmax with
    exactly one more exp per logit.
    """
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = m + mx.log(fast_exp(logits - m).sum(axis=-1, keepdims=True))
    target_logit = mx.take_along_axis(logits, targets[..., None], axis=-1)
    return (lse - target_logit)[..., 0], lse


@_ce_rows.vjp
def _ce_rows_vjp(primals, cotangents, outputs):
    logits, targets = primals
    lse = outputs[1]
    onehot = mx.arange(logits.shape[-1]) == targets[..., None]
    grad = (fast_exp(logits - lse) - onehot) * cotangents[0][..., None]
    return grad, mx.zeros_like(targets)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy (nats)."""
    return token_cross_entropy(logits, targets).mean()


def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy (B, T): logsumexp(logits) - logits[target]."""
    return _ce_rows(logits.astype(mx.float32), targets.astype(mx.int32))[0]


def distill_kl_full(student_logits: mx.array, teacher_logits: mx.array, temperature: float) -> mx.array:
    """KL(teacher_T || student_T) over the whole vocabulary, mean over positions."""
    t = temperature
    log_p = _log_softmax(teacher_logits.astype(mx.float32) / t)
    log_q = _log_softmax(student_logits.astype(mx.float32) / t)
    return (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()


def distill_kl_topk(student_logits: mx.array, topk_ids: mx.array, topk_logprobs: mx.array, temperature: float) -> mx.array:
    """KL over the teacher's top-k tokens only (an HTTP teacher returns no more than that).

    The teacher's k log-probabilities are tempered and renormalised over the k tokens; the
    student's tempered log-probabilities are normalised over the full vocabulary and read at
    those k ids. Positions where the teacher gave nothing (all log-probs -inf) count zero.
    """
    t = temperature
    teacher = topk_logprobs.astype(mx.float32) / t
    valid = mx.isfinite(teacher)
    teacher = mx.where(valid, teacher, -1e30)
    log_p = teacher - mx.logsumexp(teacher, axis=-1, keepdims=True)
    p = mx.where(valid, mx.exp(log_p), 0.0)
    log_q_all = _log_softmax(student_logits.astype(mx.float32) / t)
    log_q = mx.take_along_axis(log_q_all, topk_ids.astype(mx.int32), axis=-1)
    per_position = (p * (mx.where(valid, log_p, 0.0) - log_q)).sum(axis=-1)
    return per_position.mean()


def distillation_loss(ce: mx.array, kl: mx.array, alpha: float, temperature: float) -> mx.array:
    """alpha * CE + (1 - alpha) * T^2 * KL (T^2 keeps the soft-target gradients' scale, Hinton et al.)."""
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


def _log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)
