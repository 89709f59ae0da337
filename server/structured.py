"""Structured output: JSON schemas, regular expressions, choices and grammars, enforced token by
token with llguidance (server/README.md says why this library, with the measured figures).

Request side: protocol.py turns `response_format`, `structured_outputs` or a `guided_*` field
into a `StructureSpec`; the Planner compiles it once per request (`StructuredOutputs.compile`),
which is a 400 naming the parameter when the library cannot compile it, and every sequence of
the request (each choice of n, each sample of best_of) carries the same `Grammar`.

Engine side: `Grammar.matcher()` gives each sequence its own `TokenMatcher`, which the sequence's
OutputProcessor (engine/output.py) calls once per token: `mask(logits)` sets the logit of every
token the structure forbids at this point to -inf before sampling, `advance(token)` moves it past
the sampled token, and `finished` says the structure is complete (nothing but the end of the
text may follow). So constrained and free rows share one batched decode; only constrained rows
pay for a mask.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import numpy as np
from llguidance.tiktoken import lltokenizer_from_encoding

from nanogpt_mlx.model.tokenizer import EOT_ID

# Whitespace the JSON grammars allow between tokens: a space, or one or two newlines and up to 20
# spaces or tabs of indentation (llama.cpp's json-schema-to-grammar rule). Unbounded whitespace
# lets a model loop on spaces or newlines until max_tokens; this still allows pretty-printed JSON.
# A request's `whitespace_pattern` replaces it, `disable_any_whitespace` allows none.
JSON_WHITESPACE = r"(?:[ ]|\n{1,2}[ \t]{0,20})?"

StructureKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructureSpec:
    """What one request asks its output to be (made by protocol.py from the request's fields)."""

    kind: StructureKind
    param: str  # the request field it came from: a 400 names it
    value: Any = None  # the JSON schema (a dict), the regex or grammar text, or the list of choices
    strict: bool = True  # False: JSON Schema keywords the library does not implement are ignored, not a 400
    whitespace_pattern: str | None = None  # JSON only: replaces JSON_WHITESPACE
    compact: bool = False  # JSON only: no whitespace at all (vLLM's disable_any_whitespace)
    closed_objects: bool = False  # JSON only: objects allow no properties beyond those listed (vLLM's disable_additional_properties)

    def describe(self) -> str:
        return {"json_schema": "JSON schema", "json_object": "JSON object"}.get(self.kind, self.kind)


class StructureError(ValueError):
    """The library cannot compile what the request asks for (a 400 naming `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# --- the engine side ---------------------------------------------------------------------------------
_MASK_TABLE = np.where(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").astype(bool), np.float32(0.0), np.float32(-np.inf)
)  # byte value -> the 8 additive masks (0 allowed, -inf forbidden) of its bits, lowest bit first


def apply_token_bitmask(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """Forbid, in one float32 row of logits (in place), every token whose bit is 0 in `bitmask`
    (int32 words, token t at bit t % 32 of word t // 32, as llguidance and xgrammar write it).

    A table lookup per byte and one add: boolean indexing with a scattered mask is several times
    slower when about half the vocabulary is allowed (inside a JSON string)."""
    additive = np.take(_MASK_TABLE, bitmask.view(np.uint8), axis=0).reshape(-1)[: logits.shape[-1]]
    return np.add(logits, additive, out=logits)


class TokenMatcher:
    """One sequence's position in its structure."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._matcher = matcher
        self._bitmask = np.empty((vocab_size + 31) // 32, dtype=np.int32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """Forbid (-inf, in place) every token of `logits` that cannot come next."""
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if self._matcher.is_error():
            raise RuntimeError(f"structured output: {self._matcher.get_error()}")
        return apply_token_bitmask(logits, self._bitmask)

    def advance(self, token: int) -> None:
        """Move past the sampled token; a token the mask allowed is always accepted."""
        if not self._matcher.consume_token(token):
            # Only when every allowed token was also banned by allowed_token_ids or min_tokens.
            restrictions = "allowed_token_ids or min_tokens"
            raise RuntimeError(f"no token satisfies both the structured output and {restrictions}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The structure is complete and nothing can follow it."""
        return self._matcher.is_stopped()


class Grammar:
    """A compiled structure: the template every sequence's matcher is copied from."""

    def __init__(self, spec: StructureSpec, matcher: llguidance.LLMatcher, vocab_size: int):
        self.spec = spec
        self._template = matcher
        self._vocab_size = vocab_size

    def matcher(self) -> TokenMatcher:
        return TokenMatcher(self._template.deep_copy(), self._vocab_size)


# --- the request side ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _lltokenizer(encoding, vocab_size: int) -> llguidance.LLTokenizer:
    # llguidance reads the tiktoken encoding's own tables (no hub download); the token trie is
    # built once per encoding and shared (by every server and test of a process).
    return lltokenizer_from_encoding(encoding, n_vocab=vocab_size, eos_token=EOT_ID)


class StructuredOutputs:
    """Compiles requests' structures for one tokenizer and vocabulary.

    The token trie is built here, when the server starts: building it holds the GIL, so on the
    first structured request it would stall every stream of the event loop."""

    def __init__(self, encoding, vocab_size: int):
        self.vocab_size = vocab_size
        self.lltokenizer = _lltokenizer(encoding, vocab_size)

    def compile(self, spec: StructureSpec) -> Grammar:
        """The grammar of `spec`, checked; StructureError (a 400) when it cannot be compiled."""
        try:
            grammar = llguidance_grammar(spec)
        except (ValueError, TypeError) as exc:
            raise StructureError(spec.param, f"invalid {spec.describe()}: {exc}") from None
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise StructureError(spec.param, f"invalid {spec.describe()}: {matcher.get_error().strip()}")
        return Grammar(spec, matcher, self.vocab_size)


def llguidance_grammar(spec: StructureSpec) -> str:
    """The llguidance grammar (its JSON form) of a spec."""
    if spec.kind in ("json_schema", "json_object"):
        schema = {"type": "object"} if spec.kind == "json_object" else spec.value
        if spec.closed_objects:
            schema = close_objects(schema)
        overrides: dict[str, Any] = {}
        if not spec.strict:
            overrides["lenient"] = True
        if spec.compact:  # a whitespace pattern beats whitespace_flexible: clear it
            overrides.update(whitespace_flexible=False, whitespace_pattern=None)
        elif spec.whitespace_pattern is not None:
            overrides["whitespace_pattern"] = spec.whitespace_pattern
        # defaults, then the schema's own "x-guidance" options, then the overrides
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_WHITESPACE}, overrides=overrides)
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        # One Lark rule with a JSON-quoted literal per choice: the text is exactly one of them.
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.value))
    if spec.kind == "grammar":
        return llguidance.grammar_from("grammar", spec.value)  # Lark, or GBNF (llama.cpp's) converted to Lark
    raise ValueError(f"unknown structure kind {spec.kind!r}")


_VALUE_KEYWORDS = frozenset({"enum", "const", "default", "examples"})  # hold JSON values, not schemas


def close_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema without `additionalProperties` gets
    `"additionalProperties": false` (vLLM's disable_additional_properties)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (node.get("type") == "object" or "properties" in node) and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for key, value in node.items():
                if key not in _VALUE_KEYWORDS:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema
