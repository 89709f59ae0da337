"""Automatic prefix caching: which spare KV-cache rows hold which token prefixes. Plain Python.

The runner's cache has rows beyond the engine's slots (`--prefix-cache-rows` of them). When a
sequence finishes, the keys and values of its tokens (prompt and generated tokens fed back) are
copied from its row into one of these spare rows, and `PrefixCache` records the tokens that row
holds. When a new prompt starts its prefill, the engine asks for the longest common prefix of the
prompt with any cached row (`match`), copies that many positions into the sequence's own row, and
prefills only the rest. Positions p < k of a row depend only on tokens 0..k-1 (causal attention),
so any common prefix of two token sequences has the same keys and values in both rows.

Eviction is least recently used, bounded by the number of spare rows: a row holds at most one
sequence's tokens (up to the context length), so the bound in memory is rows x the memory of a
cache row. A stored sequence that extends a cached one replaces it in its row (the longer one
answers every query the shorter one did); one that a cached row already covers is not stored
again, only marked as used.

The engine also matches against the rows of the sequences it is running (loop.py), which this
table does not know about: it only holds the spare rows.

A prompt that wants its prompt logprobs (echo, lm-eval's loglikelihood requests) needs them for
the positions it does not prefill too: `ScoredPrefixes` keeps the prompt logprobs of earlier such
prompts, and the engine reuses a prefix only as far as both its keys and values and its logprobs
are known.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the longest common prefix of two 1-D token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """Spare cache rows, each holding the tokens of one earlier sequence; LRU."""

    def __init__(self, rows: Iterable[int]):
        self.rows = list(rows)
        if not self.rows:
            raise ValueError("a prefix cache needs at least one row")
        self._tokens: dict[int, np.ndarray] = {}  # row -> the tokens whose keys and values it holds
        self._last_used: dict[int, int] = {}  # row -> the value of the use clock at its last use
        self._clock = 0

    def __len__(self) -> int:
        """Rows holding a prefix."""
        return len(self._tokens)

    def tokens(self, row: int) -> np.ndarray | None:
        return self._tokens.get(row)

    def _touch(self, row: int) -> None:
        self._clock += 1
        self._last_used[row] = self._clock

    def match(self, prompt: Sequence[int] | np.ndarray) -> tuple[int, int]:
        """The cached row sharing the longest prefix with `prompt`, and that length: (row, length),
        or (-1, 0) when none shares a token. The row counts as used."""
        prompt = np.asarray(prompt, dtype=np.int64)
        best_row, best = -1, 0
        for row, tokens in self._tokens.items():
            n = common_prefix(prompt, tokens)
            if n > best:
                best_row, best = row, n
        if best_row >= 0:
            self._touch(best_row)
        return best_row, best

    def store(self, tokens: Sequence[int] | np.ndarray) -> int | None:
        """Record that `tokens` are about to be copied into a row; returns that row, or None when a
        cached row already holds them (nothing to copy). The caller copies the keys and values of
        the first len(tokens) positions into the returned row (or calls `discard` if it cannot)."""
        tokens = np.array(tokens, dtype=np.int64)
        if len(tokens) == 0:
            return None
        target = None
        for row, held in self._tokens.items():
            n = common_prefix(tokens, held)
            if n == len(tokens):  # already cached (as it is, or inside a longer sequence)
                self._touch(row)
                return None
            if n == len(held):  # a cached prefix of it: replace it
                target = row
        if target is None:
            free = [row for row in self.rows if row not in self._tokens]
            target = free[0] if free else min(self._tokens, key=self._last_used.__getitem__)
        self._tokens[target] = tokens
        self._touch(target)
        return target

    def discard(self, row: int) -> None:
        """Forget what `row` holds (its copy failed)."""
        self._tokens.pop(row, None)
        self._last_used.pop(row, None)

    def clear(self) -> None:
        self._tokens.clear()
        self._last_used.clear()


class ScoredPrefixes:
    """The prompt logprobs of earlier prompts, for prompts that want them (echo with logprobs,
    `prompt_logprobs`): such a prompt needs the logits of every position, so it can take a cached
    prefix's keys and values only together with the logprobs computed for those positions.

    The logprob of prompt token i depends on tokens 0..i only, so an entry made for one prompt
    serves any prompt sharing its first i+1 tokens, with at most as many alternatives (`k`) as it
    was computed with. `size` entries at most, least recently used evicted.
    """

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, int, list]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, tokens: Sequence[int], k: int, logprobs: list) -> None:
        """Keep `logprobs` (one per token of `tokens`, the first token's included) computed with `k` alternatives."""
        key = tuple(int(t) for t in tokens)
        if len(key) != len(logprobs):
            raise ValueError(f"{len(logprobs)} logprobs for {len(key)} tokens")
        held = self._entries.get(key)
        if held is None or held[1] < k:
            self._entries[key] = (np.asarray(key, dtype=np.int64), k, list(logprobs))
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def match(self, prompt: Sequence[int] | np.ndarray, k: int) -> tuple[int, list]:
        """The longest run of the prompt's first tokens with logprobs of at least k alternatives:
        (n, the logprobs of tokens 0..n-1); (0, []) when none."""
        prompt = np.asarray(prompt, dtype=np.int64)
        best_key, best = None, 0
        for key, (tokens, held_k, _) in self._entries.items():
            if held_k >= k:
                n = common_prefix(prompt, tokens)
                if n > best:
                    best_key, best = key, n
        if best_key is None:
            return 0, []
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key][2][:best]

    def clear(self) -> None:
        self._entries.clear()
