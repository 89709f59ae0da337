"""Stop strings over streamed text: hold back what may be the start of one, never emit one.

Text arrives in pieces (one detokenized token at a time). A stop string can straddle pieces, so
the tail of the text that is a prefix of some stop string is held back until the next piece
settles it. Generation stops as soon as a stop string is complete; the text is cut where it
starts (or, with `include_stop`, where it ends: vLLM's include_stop_str_in_output). Streaming and
non-streaming responses run through the same matcher, so their texts are identical.

`feed(text, can_stop=False)` (vLLM's min_tokens: no stop before that many tokens) passes complete
stop strings through but still holds back a possible start of one, so a stop string that
completes once stopping is allowed is still found whole.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str] | tuple[str, ...] = (), include_stop: bool = False):
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.matched: str | None = None  # the stop string that ended the text
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""

    def feed(self, text: str, can_stop: bool = True) -> tuple[str, bool]:
        """Add `text`; return (text that is safe to emit now, whether a stop string completed)."""
        if not self.stops:
            return text, False
        buffer = self._held + text
        hits = [(i, s) for i, s in ((buffer.find(s), s) for s in self.stops) if i >= 0]
        if hits and can_stop:
            start, stop = min(hits, key=lambda hit: hit[0])
            self._held = ""
            self.matched = stop
            return buffer[: start + len(stop) if self.include_stop else start], True
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, once no more text will come."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest tail of `buffer` that is a proper prefix of a stop string."""
        for k in range(min(len(buffer), self._longest - 1), 0, -1):
            tail = buffer[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
