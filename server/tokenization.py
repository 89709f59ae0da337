"""What the tokenizer routes answer beyond ids: token strings as Hugging Face spells them, and
/tokenizer_info (vLLM's: the tokenizer_config.json settings, which lm-evaluation-harness's remote
tokenizer reads for `eos_token`, `bos_token` and `chat_template`)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from nanogpt_mlx.model.checkpoint import TOKENIZER_CONFIG_FILE, tokenizer_config


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (a space is 'Ġ')."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def token_strings(tokenizer, tokens: list[int]) -> list[str]:
    """The tokens as vocab.json spells them (transformers' convert_ids_to_tokens; vLLM's token_strs)."""
    table = _byte_to_unicode()
    special = {tokenizer.encode_single_token(s): s for s in tokenizer.special_tokens_set}
    return [special.get(t) or "".join(table[b] for b in tokenizer.decode_single_token_bytes(t)) for t in tokens]


def tokenizer_info(model_dir: Path, context_length: int, chat_template: str) -> dict:
    """The checkpoint's tokenizer_config.json (GPT-2's defaults when it has none), without file
    paths, with the chat template the server applies."""
    path = model_dir / TOKENIZER_CONFIG_FILE
    info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else tokenizer_config(context_length)
    for key in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path"):
        info.pop(key, None)
    info.setdefault("tokenizer_class", "GPT2Tokenizer")
    info["chat_template"] = chat_template
    return info
