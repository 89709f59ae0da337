"""Losses for training, evaluation and distillation.

All take logits (B, T, V) and return a scalar mean over the B*T positions. The cross-entropy and
log-softmax are the model's (model/ops.py: on the CPU written out for MLX's JIT, with a
hand-written gradient); this module adds the distillation terms.
"""

from __future__ import annotations

import mlx.core as mx

from nanogpt_mlx.model.ops import cross_entropy, log_softmax, token_cross_entropy

__all__ = ["cross_entropy", "token_cross_entropy", "distill_kl_full", "distill_kl_topk", "distillation_loss"]


def distill_kl_full(student_logits: mx.array, teacher_logits: mx.array, temperature: float) -> mx.array:
    """KL(teacher_T || student_T) over the whole vocabulary, mean over positions."""
    t = temperature
    log_p = log_softmax(teacher_logits.astype(mx.float32) / t)
    log_q = log_softmax(student_logits.astype(mx.float32) / t)
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
    log_q_all = log_softmax(student_logits.astype(mx.float32) / t)
    log_q = mx.take_along_axis(log_q_all, topk_ids.astype(mx.int32), axis=-1)
    per_position = (p * (mx.where(valid, log_p, 0.0) - log_q)).sum(axis=-1)
    return per_position.mean()


def distillation_loss(ce: mx.array, kl: mx.array, alpha: float, temperature: float) -> mx.array:
    """alpha * CE + (1 - alpha) * T^2 * KL (T^2 keeps the soft-target gradients' scale, Hinton et al.)."""
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl
