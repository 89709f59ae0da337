"""Sampling (issue 3, item 7): greedy, temperature, top-k, top-p, seeds, logit_bias, penalties, logprobs.

Statistical tests draw from a seeded generator, so they are deterministic; each one also checks
that the same statistic rejects a wrong distribution, so it is able to fail.
"""

from __future__ import annotations

import numpy as np
import pytest

from nanogpt_mlx.model.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    choose_token,
    greedy,
    log_softmax,
    sample,
    softmax,
    top_k_filter,
    top_logprobs,
    top_p_filter,
)

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 1.5], dtype=np.float32)
N_DRAWS = 20_000
# chi-square critical values at p = 0.001
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def ref_probs(logits, temperature=1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z[np.isfinite(z)].max())
    return e / e.sum()


def draw(params: SamplingParams, logits=LOGITS, n=N_DRAWS) -> np.ndarray:
    rng = params.make_rng()
    counts = np.zeros(len(logits), dtype=np.int64)
    for _ in range(n):
        counts[choose_token(logits.copy(), params, rng)] += 1
    return counts


def chi2(counts: np.ndarray, expected_probs: np.ndarray) -> tuple[float, int]:
    support = expected_probs > 0
    assert counts[~support].sum() == 0, "drew a token of probability 0"
    exp = expected_probs[support] * counts.sum()
    return float(((counts[support] - exp) ** 2 / exp).sum()), int(support.sum() - 1)


def assert_fits(counts, probs, wrong_probs=None):
    """Chi-square goodness of fit (tokens outside the support must never be drawn).

    `wrong_probs`, a plausible wrong distribution over the same support, must be clearly
    rejected by the same samples: the test has power, it is not just loose.
    """
    stat, dof = chi2(counts, probs)
    assert stat < CHI2_CRIT[dof], f"chi2 {stat:.1f} with {dof} dof: samples do not follow the distribution"
    if wrong_probs is not None:
        wrong_stat, _ = chi2(counts, wrong_probs)
        assert wrong_stat > 10 * CHI2_CRIT[dof]


# --- greedy ------------------------------------------------------------------------------------------
def test_temperature_zero_is_argmax_and_consumes_no_randomness():
    rng = np.random.default_rng(0)
    for seed in range(20):
        logits = np.random.default_rng(seed).standard_normal(1000).astype(np.float32)
        assert choose_token(logits.copy(), SamplingParams(temperature=0.0, top_k=5, top_p=0.5), rng) == int(np.argmax(logits))
    assert rng.random() == np.random.default_rng(0).random()
    assert greedy(LOGITS) == 0


def test_greedy_sees_bias_and_penalties():
    params = SamplingParams(temperature=0.0, logit_bias={0: -100.0})
    assert choose_token(LOGITS.copy(), params, params.make_rng()) == 7  # next best: 1.5
    params = SamplingParams(temperature=0.0, frequency_penalty=0.4)
    assert choose_token(LOGITS.copy(), params, params.make_rng(), token_counts={0: 2}) == 7  # 2.0 - 0.8 < 1.5


# --- temperature -------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_distribution(temperature):
    counts = draw(SamplingParams(temperature=temperature, seed=123))
    wrong_t = 1.0 if temperature != 1.0 else 0.7
    assert_fits(counts, ref_probs(LOGITS, temperature), ref_probs(LOGITS, wrong_t))


def test_sample_is_inverse_cdf_with_one_uniform_draw():
    """One uniform number per token: seeded rows advance their generator the same alone or batched."""
    rng = np.random.default_rng(7)
    tok = sample(LOGITS.copy(), rng)
    u = np.random.default_rng(7).random()
    cdf = np.cumsum(ref_probs(LOGITS))
    assert tok == int(np.searchsorted(cdf / cdf[-1], u, side="right"))
    assert rng.random() == np.random.default_rng(7).random(2)[1]


def test_sample_never_picks_masked_tokens():
    logits = np.full(50257, -np.inf, dtype=np.float32)
    logits[[0, 100, 50256]] = [0.0, 1.0, 2.0]
    rng = np.random.default_rng(1)
    picked = {sample(logits.copy(), rng) for _ in range(2000)}
    assert picked == {0, 100, 50256}


# --- top-k --------------------------------------------------------------------------------------------
def test_top_k_filter_keeps_exactly_the_k_largest():
    logits = np.random.default_rng(2).standard_normal(50257).astype(np.float32)
    kept = np.flatnonzero(np.isfinite(top_k_filter(logits.copy(), 40)))
    assert set(kept) == set(np.argsort(-logits)[:40])
    assert np.array_equal(top_k_filter(logits.copy(), 0), logits)  # 0 = off
    assert np.array_equal(top_k_filter(logits.copy(), 50257), logits)


def test_top_k_keeps_ties_at_the_threshold():
    logits = np.array([3.0, 2.0, 2.0, 1.0], dtype=np.float32)
    assert np.isfinite(top_k_filter(logits.copy(), 2)).tolist() == [True, True, True, False]


def test_top_k_distribution():
    counts = draw(SamplingParams(temperature=1.0, top_k=3, seed=5))
    probs = ref_probs(LOGITS)
    keep = np.zeros_like(probs)
    keep[[0, 7, 1]] = 1
    # power: without the filter ~23% of draws would fall outside the support, which chi2() rejects;
    # within it, a flattened version of the right distribution is rejected
    assert_fits(counts, probs * keep / (probs * keep).sum(), keep / keep.sum())


# --- top-p --------------------------------------------------------------------------------------------
def nucleus_reference(logits: np.ndarray, p: float) -> set[int]:
    probs = ref_probs(logits)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    return set(order[: int(np.searchsorted(cum, p, side="left")) + 1].tolist())


@pytest.mark.parametrize("p, expected", [(0.3, {0}), (0.69, {0, 1}), (0.75, {0, 1, 2}), (0.95, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_exact_set_small(p, expected):
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1, 1e-9], dtype=np.float32))
    assert set(np.flatnonzero(np.isfinite(top_p_filter(logits.copy(), p)))) == expected


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_exact_set_full_vocab(scale, p):
    """Flat (scale 0.1: the nucleus spans most of the vocabulary, past the first candidate width) to peaked."""
    logits = (scale * np.random.default_rng(int(scale * 10) + int(p * 100)).standard_normal(50257)).astype(np.float32)
    kept = set(np.flatnonzero(np.isfinite(top_p_filter(logits.copy(), p))).tolist())
    assert kept == nucleus_reference(logits, p)


@pytest.mark.parametrize("p", [0.3, 0.5, 0.95])
def test_top_p_with_ties_keeps_the_lowest_ids_as_a_stable_sort(p):
    """Logits from only 7 distinct values: the nucleus boundary falls inside a run of equal
    probabilities, where the kept tokens must be the lowest ids of that run."""
    logits = np.random.default_rng(int(p * 100)).integers(0, 7, 50257).astype(np.float32) * 0.5
    kept = np.flatnonzero(np.isfinite(top_p_filter(logits.copy(), p)))
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = int(np.searchsorted(np.cumsum(probs[order]), p, side="left")) + 1
    assert set(kept.tolist()) == set(order[:keep].tolist())
    boundary = probs[order[keep - 1]]
    assert (probs[kept] == boundary).sum() < (probs == boundary).sum()  # the boundary really splits a tie


def test_top_p_distribution():
    # probs of LOGITS sorted: 0.38, 0.23, 0.14, 0.09, ... ; p = 0.7 keeps tokens 0, 7, 1 (0.75)
    probs = ref_probs(LOGITS)
    assert nucleus_reference(LOGITS, 0.7) == {0, 7, 1}
    counts = draw(SamplingParams(temperature=1.0, top_p=0.7, seed=9))
    keep = np.zeros_like(probs)
    keep[[0, 7, 1]] = 1
    assert_fits(counts, probs * keep / (probs * keep).sum(), keep / keep.sum())


def test_top_k_then_top_p_after_temperature():
    # temperature 0.5 sharpens; top-k 4 leaves {0, 7, 1, 2}; top-p 0.8 of those renormalized
    params = SamplingParams(temperature=0.5, top_k=4, top_p=0.8, seed=3)
    probs = ref_probs(LOGITS, 0.5)
    four = np.zeros_like(probs)
    four[[0, 7, 1, 2]] = 1
    renorm = probs * four / (probs * four).sum()
    order = np.argsort(-renorm)
    cum = np.cumsum(renorm[order])
    nucleus = order[: int(np.searchsorted(cum, 0.8)) + 1]
    keep = np.zeros_like(probs)
    keep[nucleus] = 1
    counts = draw(params)
    assert set(np.flatnonzero(counts)) == set(nucleus.tolist())
    t1 = ref_probs(LOGITS, 1.0) * keep
    assert_fits(counts, probs * keep / (probs * keep).sum(), t1 / t1.sum())


# --- seeds --------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(4).standard_normal(50257).astype(np.float32)

    def run(seed):
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        rng = params.make_rng()
        return [choose_token(logits.copy(), params, rng) for _ in range(50)]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_unseeded_sampling_varies():
    logits = np.zeros(50257, dtype=np.float32)
    params = SamplingParams(temperature=1.0)
    assert len({choose_token(logits.copy(), params, params.make_rng()) for _ in range(10)}) > 1


# --- logit_bias and penalties --------------------------------------------------------------------------
def test_logit_bias_bans_and_forces():
    logits = np.random.default_rng(5).standard_normal(50257).astype(np.float32)
    top = int(np.argmax(logits))
    banned = SamplingParams(temperature=1.0, top_k=1, logit_bias={top: -100.0}, seed=0)
    assert choose_token(logits.copy(), banned, banned.make_rng()) != top
    forced = SamplingParams(temperature=1.0, logit_bias={1234: 100.0}, seed=0)
    rng = forced.make_rng()
    assert {choose_token(logits.copy(), forced, rng) for _ in range(200)} == {1234}


def test_logit_bias_adds_exactly():
    out = apply_logit_bias(LOGITS.copy(), {1: 0.25, 6: -3.0})
    expected = LOGITS.copy()
    expected[1] += 0.25
    expected[6] -= 3.0
    assert np.array_equal(out, expected)
    assert np.array_equal(apply_logit_bias(LOGITS.copy(), {}), LOGITS)


def test_penalties_follow_openai_formula():
    counts = {0: 3, 2: 1}
    out = apply_penalties(LOGITS.copy(), counts, presence=0.5, frequency=0.25)
    expected = LOGITS.astype(np.float64).copy()
    for tok, c in counts.items():
        expected[tok] -= 0.25 * c + 0.5 * (c > 0)
    assert np.allclose(out, expected, atol=1e-6)
    assert np.array_equal(apply_penalties(LOGITS.copy(), counts, 0.0, 0.0), LOGITS)
    # negative penalties encourage repetition
    assert apply_penalties(LOGITS.copy(), {3: 2}, presence=-1.0, frequency=0.0)[3] == LOGITS[3] + 1.0


def test_penalties_change_the_sampled_distribution():
    counts = {0: 2}
    params = SamplingParams(temperature=1.0, frequency_penalty=1.0, seed=11)
    rng = params.make_rng()
    draws = np.zeros(len(LOGITS), dtype=np.int64)
    for _ in range(N_DRAWS):
        draws[choose_token(LOGITS.copy(), params, rng, token_counts=counts)] += 1
    penalized = LOGITS.astype(np.float64).copy()
    penalized[0] -= 2.0
    assert_fits(draws, ref_probs(penalized), ref_probs(LOGITS))


# --- logprobs ----------------------------------------------------------------------------------------
def test_log_softmax_matches_reference():
    torch = pytest.importorskip("torch")
    logits = (3.0 * np.random.default_rng(6).standard_normal((3, 50257))).astype(np.float32)
    ours = log_softmax(logits)
    ref = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), dim=-1).numpy()
    assert ours.shape == logits.shape
    assert np.abs(ours - ref).max() < 1e-4
    assert np.allclose(np.exp(ours.astype(np.float64)).sum(-1), 1.0, atol=1e-4)
    assert np.allclose(softmax(logits), np.exp(ref), atol=1e-7)


def test_log_softmax_with_masked_entries():
    logits = np.array([0.0, -np.inf, 1.0], dtype=np.float32)
    out = log_softmax(logits)
    assert out[1] == -np.inf
    assert np.allclose(out[[0, 2]], np.log(ref_probs(logits)[[0, 2]]), atol=1e-6)


def test_top_logprobs_are_the_k_most_likely_in_order():
    logits = (2.0 * np.random.default_rng(7).standard_normal(50257)).astype(np.float32)
    lp = log_softmax(logits)
    ref = np.log(ref_probs(logits))
    top = top_logprobs(lp, 5)
    assert [t for t, _ in top] == np.argsort(-ref)[:5].tolist()
    assert all(abs(v - ref[t]) < 1e-4 for t, v in top)
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert top_logprobs(lp, 0) == []


def test_apply_temperature():
    assert np.allclose(apply_temperature(LOGITS.copy(), 0.5), LOGITS * 2)
