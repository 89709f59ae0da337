"""Losses for training, evaluation and distillation.

All take logits (B, T, V) and return a scalar mean over the B*T positions (the sparse KL: over
the positions the teacher answered). The cross-entropy and log-softmax are the model's
(model/ops.py: on the CPU written out for MLX's JIT, with a hand-written gradient); this module
adds the distillation terms.
"""

from __future__ import annotations

import mlx.core as mx

from nanogpt_mlx.model.ops import cross_entropy, log_softmax, token_cross_entropy

__all__ = ["cross_entropy", "token_cross_entropy", "distill_kl_full", "distill_kl_topk", "distillation_loss", "SPARSE_KL_FORMS"]

# How a KL is formed from a teacher's top-k log-probabilities (training/README.md, "The sparse KL").
SPARSE_KL_FORMS = ("bucket", "renorm")


def distill_kl_full(student_logits: mx.array, teacher_logits: mx.array, temperature: float) -> mx.array:
    """KL(teacher_T || student_T) over the whole vocabulary, mean over positions."""
    t = temperature
    log_p = log_softmax(teacher_logits.astype(mx.float32) / t)
    log_q = log_softmax(student_logits.astype(mx.float32) / t)
    return (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()


def distill_kl_topk(student_logits: mx.array, topk_ids: mx.array, topk_logprobs: mx.array, temperature: float,
                    form: str = "renorm") -> mx.array:
    """KL from the teacher's top-k log-probabilities (what an HTTP teacher returns), mean over the
    positions it answered (a position whose k log-probs are all -inf has no teacher: CE only).

    topk_logprobs are the teacher's untempered log-probabilities over the whole vocabulary, read
    at topk_ids (missing entries -inf). Two forms:

    * "bucket": both distributions coarsened to k + 1 outcomes, the k tokens and one bucket for
      the rest of the vocabulary (teacher: 1 - sum of its k probabilities; student: 1 - sum of
      its probabilities at those ids), then tempered (log-probs / T, renormalised over the k + 1)
      and compared. A true KL between two distributions; the student keeps the teacher's mass
      outside the top k.
    * "renorm": the teacher's tempered k log-probs renormalised over the k tokens, against the
      student's tempered full-vocabulary log-probs at those ids. It asks the student to put all
      its mass on the teacher's top k.
    """
    if form not in SPARSE_KL_FORMS:
        raise ValueError(f"unknown sparse KL form {form!r}; known: {', '.join(SPARSE_KL_FORMS)}")
    t = temperature
    ids = topk_ids.astype(mx.int32)
    teacher = topk_logprobs.astype(mx.float32)
    finite = mx.isfinite(teacher)
    answered = finite.any(axis=-1)  # (B, T): positions with a teacher distribution
    teacher = mx.where(finite, teacher, -1e30)
    if form == "renorm":
        log_p = teacher / t
        log_p = log_p - mx.logsumexp(log_p, axis=-1, keepdims=True)
        log_q = mx.take_along_axis(log_softmax(student_logits.astype(mx.float32) / t), ids, axis=-1)
        per_position = (mx.where(finite, mx.exp(log_p), 0.0) * (mx.where(finite, log_p, 0.0) - log_q)).sum(axis=-1)
    else:
        log_q_k = mx.take_along_axis(log_softmax(student_logits.astype(mx.float32)), ids, axis=-1)
        log_q_k = mx.where(finite, log_q_k, -1e30)  # a padded id is not one of the k outcomes
        # Clamped so that log() stays finite when the k tokens hold (almost) all of the mass.
        teacher_rest = mx.log(mx.maximum(1.0 - mx.exp(teacher).sum(axis=-1, keepdims=True), 1e-6))
        student_rest = mx.log(mx.maximum(1.0 - mx.exp(log_q_k).sum(axis=-1, keepdims=True), 1e-6))
        log_p = mx.concatenate([teacher, teacher_rest], axis=-1) / t
        log_q = mx.concatenate([log_q_k, student_rest], axis=-1) / t
        log_p = log_p - mx.logsumexp(log_p, axis=-1, keepdims=True)
        log_q = log_q - mx.logsumexp(log_q, axis=-1, keepdims=True)
        p = mx.exp(log_p)
        per_position = (p * (log_p - log_q)).sum(axis=-1)
    per_position = mx.where(answered, per_position, 0.0)
    return per_position.sum() / mx.maximum(answered.sum(), 1).astype(mx.float32)


def distillation_loss(ce: mx.array, kl: mx.array, alpha: float, temperature: float) -> mx.array:
    """alpha * CE + (1 - alpha) * T^2 * KL (T^2 keeps the soft-target gradients' scale, Hinton et al.)."""
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl
