"""Losses for training, evaluation and distillation.

All take logits (B, T, V) and return a scalar mean over the B*T positions. On CPU the exp
inside a softmax over a 50,257-token vocabulary is a large share of a training step
(12x512x50257 = 309M exps, ~4 s through `mx.logsumexp` + autodiff), so the cross-entropy is
written out for the JIT and given its own gradient.
"""

from __future__ import annotations

import mlx.core as mx


@mx.custom_function
def _ce_rows(logits: mx.array, targets: mx.array):
    """(N, V) logits, (N,) targets -> (per-row loss, logsumexp), with a hand-written gradient.

    `mx.logsumexp` is a primitive with its own scalar exp (~75 M elements/s on this CPU); the
    same max / exp / sum written out inside `mx.compile` becomes a JIT-fused, vectorised kernel
    several times faster. Autodiff would then keep extra (N, V) temporaries; the gradient
    softmax - onehot, computed from the returned logsumexp, is one fused pass and one (N, V)
    output.
    """
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = m + mx.log(mx.exp(logits - m).sum(axis=-1, keepdims=True))
    target_logit = mx.take_along_axis(logits, targets[:, None], axis=-1)
    return (lse - target_logit)[:, 0], lse


@_ce_rows.vjp
def _ce_rows_vjp(primals, cotangents, outputs):
    logits, targets = primals
    onehot = mx.arange(logits.shape[-1]) == targets[:, None]
    grad = (mx.exp(logits - outputs[1]) - onehot) * cotangents[0][:, None]
    return grad, mx.zeros_like(targets)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean next-token cross-entropy (nats)."""
    return token_cross_entropy(logits, targets).mean()


def token_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Per-position cross-entropy (B, T): logsumexp(logits) - logits[target]."""
    *lead, vocab = logits.shape
    rows = _ce_rows(logits.astype(mx.float32).reshape(-1, vocab), targets.astype(mx.int32).reshape(-1))[0]
    return rows.reshape(lead)


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
    # Written out rather than mx.logsumexp, for the JIT-fused exp (see _ce_rows).
    m = mx.stop_gradient(x.max(axis=-1, keepdims=True))
    return x - (m + mx.log(mx.exp(x - m).sum(axis=-1, keepdims=True)))
