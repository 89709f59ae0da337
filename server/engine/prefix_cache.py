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
"""

from __future__ import annotations

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
