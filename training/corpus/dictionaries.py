"""Dictionaries from Debian: dictd databases (the Jargon File, the Devil's Dictionary) and WordNet glosses."""

from __future__ import annotations

import gzip
import re
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

from nanogpt_mlx.training.corpus.source import Doc, Fetcher
from nanogpt_mlx.training.corpus.text import PARA_BREAK, normalize, word_count

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _b64(value: str) -> int:
    n = 0
    for ch in value:
        n = n * 64 + _B64.index(ch)
    return n


def dictd_entries(index: Path, data: Path) -> Iterator[tuple[str, str]]:
    """(headword, raw entry) from a dictd database (.index + dictzip'ed .dict.dz, gzip-readable)."""
    with gzip.open(data, "rb") as fh:
        blob = fh.read()
    seen = set()
    for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith("00database") or parts[0].startswith("00-database"):
            continue
        offset, length = _b64(parts[1]), _b64(parts[2])
        if (offset, length) in seen:  # several headwords may point at the same entry
            continue
        seen.add((offset, length))
        yield parts[0], blob[offset:offset + length].decode("utf-8", errors="replace")


def dictd(deb: str, name: str, dedent: bool) -> Callable[[Fetcher], Iterator[Doc]]:
    def extract(f: Fetcher) -> Iterator[Doc]:
        base = f.deb(deb) / "usr" / "share" / "dictd"
        for _word, raw in dictd_entries(base / f"{name}.index", base / f"{name}.dict.dz"):
            raw = raw.expandtabs(8)
            if dedent:  # the Jargon File indents every body line by four spaces
                raw = "\n\n".join(textwrap.dedent(b) for b in PARA_BREAK.split(raw))
            # {braces} mark cross-references in the Jargon File; keep the words.
            text = normalize(raw.replace("{", "").replace("}", ""), "auto")
            if word_count(text) >= 5:
                yield Doc(text)

    return extract


def wordnet(f: Fetcher) -> Iterator[Doc]:
    """Glosses as "lemma, lemma: definition; "example"" lines, 100 synsets to a document.

    A single synset is ~20 tokens; documents of consecutive synsets (which WordNet groups by
    lexicographer file, i.e. topic) avoid an end-of-text token every 20 tokens.
    """
    base = f.deb("wordnet-base") / "usr" / "share" / "wordnet"
    for pos in ("noun", "verb", "adj", "adv"):
        lines = []
        for line in (base / f"data.{pos}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header lines start with two spaces
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            count = int(parts[3], 16)
            lemmas = [re.sub(r"\(\w+\)$", "", w).replace("_", " ") for w in parts[4:4 + 2 * count:2]]
            lines.append(f"{', '.join(dict.fromkeys(lemmas))}: {gloss.strip()}")
            if len(lines) == 100:
                yield Doc("\n".join(lines))
                lines = []
        if lines:
            yield Doc("\n".join(lines))
