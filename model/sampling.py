"""Turning next-token logits into tokens: small composable functions over (rows, vocab) arrays.

They run in NumPy on the host on purpose. The logits have to come to the host anyway (token ids,
logprobs), NumPy's SIMD exp is ~20x faster than MLX's single-threaded CPU exp here, and one
`numpy.random.Generator` per request makes seeded sampling reproducible whatever else shares
the batch. Sampling draws one uniform number per row (inverse CDF), so seeded rows consume
their generator identically alone or in a full batch.

Order, as in vLLM's sampler: allowed_token_ids and min_tokens mask tokens, logit_bias and the
penalties (repetition, then presence / frequency) change the logits, then temperature, then min-p,
top-k and top-p restrict the candidates, then one token is drawn. Rows with temperature 0 (below
GREEDY_BELOW, as in vLLM) are greedy (argmax of the adjusted logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    """Per-request sampling settings (the engine batches rows with different ones)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    logprobs: int | None = None  # None = off; k >= 0 also returns the top-k alternatives
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off; multiplicative, over the prompt's and the generated tokens
    prompt_token_ids: tuple[int, ...] = ()  # what repetition_penalty counts besides the generated tokens
    allowed_token_ids: tuple[int, ...] | None = None  # None = every token
    min_tokens: int = 0  # stop_token_ids are masked until this many tokens are generated
    stop_token_ids: tuple[int, ...] = ()  # the tokens that would end generation (EOS included unless ignored)

    def make_rng(self) -> np.random.Generator:
        return np.random.default_rng(None if self.seed is None else self.seed % 2**64)  # NumPy takes no negative seed


# --- logit processors ------------------------------------------------------------------------
def apply_logit_bias(logits: np.ndarray, bias: dict[int, float]) -> np.ndarray:
    """Add OpenAI-style biases (-100 bans a token, +100 all but forces it) to one row, in place."""
    if bias:
        ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        logits[ids] += np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
    return logits


def apply_penalties(logits: np.ndarray, token_counts: dict[int, int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's presence/frequency penalties over the tokens generated so far, one row, in place."""
    if token_counts and (presence or frequency):
        ids = np.fromiter(token_counts.keys(), dtype=np.int64, count=len(token_counts))
        counts = np.fromiter(token_counts.values(), dtype=np.float32, count=len(token_counts))
        logits[ids] -= presence + frequency * counts
    return logits


def apply_allowed_tokens(logits: np.ndarray, allowed: tuple[int, ...] | None) -> np.ndarray:
    """Keep only the allowed token ids of one row (vLLM's allowed_token_ids), the rest -inf."""
    if allowed is not None:
        ids = np.fromiter(allowed, dtype=np.int64, count=len(allowed))
        kept = logits[ids]
        logits.fill(-np.inf)
        logits[ids] = kept
    return logits


def apply_min_tokens(logits: np.ndarray, generated: int, min_tokens: int, stop_token_ids: tuple[int, ...]) -> np.ndarray:
    """Ban the tokens that would end generation until `min_tokens` tokens are generated, one row."""
    if generated < min_tokens and stop_token_ids:
        logits[np.fromiter(stop_token_ids, dtype=np.int64, count=len(stop_token_ids))] = -np.inf
    return logits


def apply_repetition_penalty(
    logits: np.ndarray, prompt_token_ids: tuple[int, ...], token_counts: dict[int, int], penalty: float
) -> np.ndarray:
    """The multiplicative repetition penalty of CTRL, transformers and vLLM, one row, in place.

    Every token seen so far (in the prompt or generated) has its logit divided by `penalty` when
    positive and multiplied by it when negative, so a penalty > 1 always makes it less likely.
    """
    if penalty != 1.0 and (prompt_token_ids or token_counts):
        seen = np.union1d(
            np.fromiter(prompt_token_ids, dtype=np.int64, count=len(prompt_token_ids)),
            np.fromiter(token_counts.keys(), dtype=np.int64, count=len(token_counts)),
        )
        values = logits[seen]
        logits[seen] = np.where(values > 0, values / penalty, values * penalty)
    return logits


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep the tokens at least `min_p` times as likely as the most likely one, one row.

    p_i >= min_p * p_max is logit_i >= logit_max + log(min_p): no softmax needed.
    """
    if min_p > 0.0:
        logits[logits < logits.max() + np.log(min_p)] = -np.inf
    return logits


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits of one row (ties at the threshold kept), the rest -inf."""
    if 0 < k < logits.shape[-1]:
        threshold = np.partition(logits, -k)[-k]
        logits[logits < threshold] = -np.inf
    return logits


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus), one row.

    The nucleus is the first tokens of a stable descending sort (ties: lower id first). An
    argsort of 50k float64 values costs ~10 ms a row, so neither the ids nor a full sort are
    needed: the *values* of a candidate set that holds >= p of the mass (widened when it does
    not) are sorted to find the threshold probability and the count to keep; then every token
    above the threshold is kept, and of those equal to it the lowest ids, as the stable sort
    would. The sums are over the same values in the same order, so the set is identical.
    """
    if p >= 1.0:
        return logits
    # float64: a float32 cumulative sum over tens of thousands of small probabilities drifts by
    # ~1e-5, enough to keep one token too many or too few when the distribution is flat.
    probs = softmax(logits.astype(np.float64))
    n = logits.shape[-1]
    width = min(256, n)
    while True:
        values = np.partition(probs, n - width)[n - width :] if width < n else probs  # the `width` largest
        descending = np.sort(values)[::-1]
        cum = np.cumsum(descending)
        if cum[-1] >= p or width >= n:
            break
        width = min(width * 8, n)
    keep = min(int(np.searchsorted(cum, p, side="left")) + 1, len(descending))  # first index reaching p
    threshold = descending[keep - 1]
    kept = probs > threshold
    ties_to_keep = keep - int(np.count_nonzero(kept))
    if ties_to_keep > 0:
        kept[np.flatnonzero(probs == threshold)[:ties_to_keep]] = True
    logits[~kept] = -np.inf
    return logits


# --- distributions ---------------------------------------------------------------------------
def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z, dtype=np.float64) if z.dtype == np.float64 else np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top_logprobs(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely (token, logprob) pairs of one row, most likely first."""
    if k <= 0:
        return []
    idx = np.argpartition(logprobs, -k)[-k:]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i])) for i in idx]


# --- choosing a token ------------------------------------------------------------------------
def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    if temperature != 1.0:
        logits /= temperature
    return logits


# Below this the distribution is the argmax anyway, and dividing float32 logits by a temperature
# under ~1e-38 (or one flushed to zero) gives inf and NaN: sampling would return a wrong token.
GREEDY_BELOW = 1e-5

SAMPLE_BLOCK = 256  # vocabulary block size of the two-level inverse CDF in `sample`


def sample(logits: np.ndarray, rng: np.random.Generator) -> int:
    """Draw from softmax(logits) with one uniform number (inverse CDF), in two levels; `logits`
    is overwritten with the unnormalized weights.

    A float64 cumulative sum over all 50k probabilities is sequential and was ~40% of a
    32-row engine step. Summing blocks of 256 (vectorized), picking the block by the CDF of the
    ~200 block sums, then the token by the CDF inside that block draws from exactly the same
    distribution, with the same single uniform, at a fraction of the cost. The block sums are
    float32 pairwise sums (~1e-7 relative, as exact as the float32 weights themselves): half the
    time of a float64 `reduceat`.
    """
    weights = np.exp(np.subtract(logits, logits.max(), out=logits), out=logits)  # float32 exp: the SIMD path
    n = len(weights)
    full = n - n % SAMPLE_BLOCK
    block_sums = weights[:full].reshape(-1, SAMPLE_BLOCK).sum(axis=1)
    if full < n:
        block_sums = np.append(block_sums, weights[full:].sum())
    block_cdf = np.cumsum(block_sums, dtype=np.float64)
    u = rng.random() * block_cdf[-1]
    block = min(int(np.searchsorted(block_cdf, u, side="right")), len(block_cdf) - 1)
    u -= block_cdf[block - 1] if block else 0.0
    start = block * SAMPLE_BLOCK
    inner_cdf = np.cumsum(weights[start : start + SAMPLE_BLOCK], dtype=np.float64)
    return start + min(int(np.searchsorted(inner_cdf, u, side="right")), len(inner_cdf) - 1)


def choose_token(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    token_counts: dict[int, int] | None = None,
) -> int:
    """The whole pipeline for one row. `logits` is modified in place (pass a copy to keep it).

    `token_counts` counts the tokens generated so far (for the penalties and min_tokens).
    """
    token_counts = token_counts or {}
    apply_allowed_tokens(logits, params.allowed_token_ids)
    if params.min_tokens:
        apply_min_tokens(logits, sum(token_counts.values()), params.min_tokens, params.stop_token_ids)
    apply_logit_bias(logits, params.logit_bias)
    apply_repetition_penalty(logits, params.prompt_token_ids, token_counts, params.repetition_penalty)
    apply_penalties(logits, token_counts, params.presence_penalty, params.frequency_penalty)
    if params.temperature < GREEDY_BELOW:
        return greedy(logits)
    apply_temperature(logits, params.temperature)
    min_p_filter(logits, params.min_p)
    top_k_filter(logits, params.top_k)
    top_p_filter(logits, params.top_p)
    return sample(logits, rng)
