"""Turning one sequence's logits into its outputs: sampling, logprobs, detokenizing, stop strings
and finish reasons.

One `OutputProcessor` per sequence holds everything that is the sequence's own: its sampling
generator and token counts (penalties), its structured-output matcher (which masks the logits
row before sampling), its streaming detokenizer, its stop-string matcher, and the
`SequenceOutput` being built in the current step. The engine hands it logits (NumPy, one row)
and takes the finished output once a step; nothing here touches the model or the KV cache, so an
exception raised here concerns this sequence only, and the engine ends it alone.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from nanogpt_mlx.model.sampling import choose_token, log_softmax, top_logprobs
from nanogpt_mlx.model.tokenizer import EOT_ID, StreamingDetokenizer
from nanogpt_mlx.server.engine.types import SequenceOutput, SequenceRequest, TokenLogprob
from nanogpt_mlx.server.stop_strings import StopStringMatcher


def rng_for(request: SequenceRequest) -> np.random.Generator:
    """Choice 0 draws like `nanogpt-mlx generate --seed`; other choices get their own stream."""
    seed = request.params.seed
    if seed is None or request.choice == 0:
        return request.params.make_rng()
    return np.random.default_rng([seed % 2**64, request.choice])  # NumPy takes no negative seed


class OutputProcessor:
    """One sequence's logits -> tokens -> text and logprobs, accumulated into the pending output."""

    def __init__(self, request: SequenceRequest, tokenizer):
        self.request = request
        self.generated = 0  # tokens sampled so far, EOT included
        self.last_token = -1  # the latest sampled token (the next decode's input)
        self.tokens: list[int] = []  # every sampled token (what the prefix cache keeps with the prompt)
        self.cached_tokens: int | None = None  # prompt tokens whose keys and values came from the prefix cache (the engine sets it)
        self._counts: Counter[int] = Counter()  # generated tokens, for the penalties
        self._rng = rng_for(request)
        self._detokenizer = StreamingDetokenizer(tokenizer)
        self._stops = StopStringMatcher(request.stop, include_stop=request.include_stop_str_in_output)
        self._stop_string_hit = False
        self._stop_reason: int | str | None = None
        self._prompt_logprobs: list[TokenLogprob] | None = [] if request.prompt_logprobs is not None else None
        self._structure = request.structure.matcher() if request.structure is not None else None  # each choice its own
        self._pending = SequenceOutput()

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self._prompt_logprobs is not None

    @property
    def prompt_logprobs_so_far(self) -> list[TokenLogprob]:
        """The prompt's logprobs computed so far: one per prompt token from the first on."""
        return self._prompt_logprobs or []

    def reuse_prompt_logprobs(self, entries: list[TokenLogprob]) -> None:
        """Start from the logprobs of the prompt's first len(entries) tokens, computed for another
        sequence with the same prefix and at least as many alternatives (prefix caching)."""
        k = self.request.prompt_logprobs
        self._prompt_logprobs = [TokenLogprob(e.token, e.logprob, e.top[:k], e.rank) for e in entries]

    # --- the prompt ------------------------------------------------------------------------------------
    def add_prompt_logits(self, begin: int, logits: np.ndarray) -> None:
        """Record the logprobs of a prompt chunk that starts at position `begin`; `logits` has one
        row per chunk position. Logits at position p score prompt token p+1; the prompt's first
        token has none."""
        prompt, k = self.request.prompt, self.request.prompt_logprobs
        if begin == 0:
            self._prompt_logprobs.append(TokenLogprob(prompt[0], None, []))
        scored = min(len(logits), len(prompt) - begin - 1)  # the chunk's last row may score a generated token
        if scored <= 0:
            return
        logprobs = log_softmax(logits[:scored])
        targets = np.asarray(prompt[begin + 1 : begin + 1 + scored])
        chosen = logprobs[np.arange(scored), targets]
        ranks = 1 + np.count_nonzero(logprobs > chosen[:, None], axis=1)
        for j in range(scored):
            self._prompt_logprobs.append(TokenLogprob(int(targets[j]), float(chosen[j]), top_logprobs(logprobs[j], k), int(ranks[j])))

    def prompt_done(self) -> bool:
        """The whole prompt is in the cache: release its logprobs, if asked. Returns whether that
        made an output."""
        if self._prompt_logprobs is None:
            return False
        self._pending.prompt_logprobs = self._prompt_logprobs
        return True

    # --- one token ---------------------------------------------------------------------------------------
    def accept(self, logits: np.ndarray, at_context_end: bool) -> str | None:
        """Sample the next token from `logits` (one row, modified in place: masked first by the
        sequence's structure, if any) and add it to the output; return a finish_reason, or None to
        go on. `at_context_end`: the cache has no room to feed the token back."""
        request = self.request
        params = request.params
        raw_logprobs = log_softmax(logits) if params.logprobs is not None else None  # the model's own distribution
        if self._structure is not None:
            self._structure.mask(logits)  # first: every later processor keeps a -inf at -inf
        token = choose_token(logits, params, self._rng, self._counts)
        if self._structure is not None:
            self._structure.advance(token)
        self._counts[token] += 1
        self.generated += 1
        self.last_token = token
        self.tokens.append(token)

        out = self._pending
        out.token_ids.append(token)
        if raw_logprobs is not None:
            if out.logprobs is None:
                out.logprobs = []
            out.logprobs.append(TokenLogprob(token, float(raw_logprobs[token]), top_logprobs(raw_logprobs, params.logprobs)))

        stop_token = (token == EOT_ID and not request.ignore_eos) or token in request.stop_token_ids
        shows_text = token != EOT_ID or not request.skip_special_tokens  # with ignore_eos an EOT may be generated
        if shows_text and (not stop_token or request.include_stop_str_in_output):
            text, hit = self._stops.feed(self._detokenizer.add(token), can_stop=self.generated > request.min_tokens)
            out.text += text
            if hit:
                self._stop_string_hit = True
                self._stop_reason = self._stops.matched
                return "stop"
        if stop_token:
            self._stop_reason = token if token in request.stop_token_ids else None  # vLLM: None for EOS
            return "stop"
        if self._structure is not None and self._structure.finished:
            return "stop"  # the structure is complete (nothing may follow; as EOS: stop_reason None)
        if self.generated >= request.max_tokens or at_context_end:
            return "length"
        return None

    # --- the end -----------------------------------------------------------------------------------------
    def finish(self, reason: str, error: str | None = None) -> None:
        """Make the pending output the last one: the held-back text, the finish reason, the counts.

        After an error the detokenizer and the stop matcher are left alone (either may be what
        failed, and the text of a failed sequence is not shown)."""
        out = self._pending
        if reason != "error" and not self._stop_string_hit:
            # Flush what the detokenizer and the stop matcher still hold (a stop string may
            # complete in the flushed bytes, which ends the text there).
            text, hit = self._stops.feed(self._detokenizer.finalize())
            out.text += text if hit else text + self._stops.flush()
        out.finish_reason = reason
        out.stop_reason = self._stop_reason if reason == "stop" else None
        out.error = error
        out.prompt_tokens = len(self.request.prompt)
        out.completion_tokens = self.generated
        out.cached_tokens = self.cached_tokens

    def take(self) -> SequenceOutput:
        """The output built since the last `take`, and a fresh one to build the next."""
        out, self._pending = self._pending, SequenceOutput()
        return out
