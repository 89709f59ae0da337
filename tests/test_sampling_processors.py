"""The logits processors behind vLLM's sampling fields: min_p, repetition_penalty (checked against
transformers' own processors), allowed_token_ids and min_tokens, alone and through choose_token."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from nanogpt_mlx.model.sampling import (
    SamplingParams,
    apply_allowed_tokens,
    apply_min_tokens,
    apply_repetition_penalty,
    choose_token,
    min_p_filter,
    softmax,
)

VOCAB = 64


def random_logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, VOCAB).astype(np.float32)


def test_repetition_penalty_equals_transformers():
    torch = pytest.importorskip("torch")
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = random_logits(1)
    prompt, generated = (3, 7, 7, 12), [12, 40, 41, 40]
    ours = apply_repetition_penalty(logits.copy(), prompt, Counter(generated), 1.7)
    ids = torch.tensor([list(prompt) + generated])
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(ids, torch.tensor(logits)[None].clone())[0].numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert not np.array_equal(ours, logits)
    # Each penalized token lost probability, whatever the sign of its logit.
    seen = sorted(set(prompt) | set(generated))
    assert (softmax(ours.astype(np.float64))[seen] < softmax(logits.astype(np.float64))[seen]).all()


def test_repetition_penalty_one_changes_nothing():
    logits = random_logits(2)
    assert np.array_equal(apply_repetition_penalty(logits.copy(), (1, 2), Counter([3]), 1.0), logits)


def test_min_p_equals_transformers():
    torch = pytest.importorskip("torch")
    from transformers import MinPLogitsWarper

    for min_p in (0.01, 0.1, 0.5):
        logits = random_logits(3)
        ours = min_p_filter(logits.copy(), min_p)
        theirs = MinPLogitsWarper(min_p, min_tokens_to_keep=1)(None, torch.tensor(logits)[None].clone())[0].numpy()
        assert np.array_equal(np.isfinite(ours), np.isfinite(theirs)), min_p
        kept = np.isfinite(ours)
        assert 1 <= kept.sum() < VOCAB
        probs = softmax(logits.astype(np.float64))
        assert probs[kept].min() >= min_p * probs.max() > probs[~kept].max()


def test_allowed_token_ids_restrict_every_draw():
    logits = random_logits(4)
    out = apply_allowed_tokens(logits.copy(), (5, 9, 33))
    assert set(np.flatnonzero(np.isfinite(out))) == {5, 9, 33}
    assert np.array_equal(out[[5, 9, 33]], logits[[5, 9, 33]])
    params = SamplingParams(temperature=1.0, seed=0, allowed_token_ids=(5, 9, 33))
    rng = params.make_rng()
    drawn = {choose_token(random_logits(s), params, rng) for s in range(200)}
    assert drawn == {5, 9, 33}


def test_min_tokens_masks_stop_tokens_until_reached():
    logits = np.full(VOCAB, -5.0, dtype=np.float32)
    logits[10] = 50.0  # the "EOS" dominates
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(10, 11))
    counts: Counter[int] = Counter()
    chosen = []
    for _ in range(5):
        token = choose_token(logits.copy(), params, params.make_rng(), counts)
        counts[token] += 1
        chosen.append(token)
    assert 10 not in chosen[:3] and 11 not in chosen[:3]
    assert chosen[3:] == [10, 10]
    assert np.array_equal(apply_min_tokens(logits.copy(), 3, 3, (10,)), logits)


def test_choose_token_order_min_p_after_temperature():
    # Two tokens at logits 0 and log(0.2): min_p 0.3 drops the second at temperature 1 (ratio 0.2)
    # but keeps it at temperature 3 (ratio 0.2 ** (1/3) ~ 0.58), as vLLM applies min_p after temperature.
    logits = np.full(VOCAB, -1e9, dtype=np.float32)
    logits[0], logits[1] = 0.0, np.log(0.2)
    for temperature, expected in ((1.0, {0}), (3.0, {0, 1})):
        params = SamplingParams(temperature=temperature, min_p=0.3, seed=1)
        rng = params.make_rng()
        assert {choose_token(logits.copy(), params, rng) for _ in range(300)} == expected
