"""Fortunes from Debian's `fortunes` and `fortunes-min`: one document per fortune."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator

from nanogpt_mlx.training.corpus.source import Doc, Fetcher
from nanogpt_mlx.training.corpus.text import normalize, word_count

# Not prose (ascii-art), or collections of jokes about ethnic groups and the sexes that we do
# not want the bundled model to learn from.
FORTUNE_SKIP = {"ascii-art", "ethnic", "men-women"}


def documents(f: Fetcher) -> Iterator[Doc]:
    files = []
    for deb in ("fortunes-min", "fortunes"):
        directory = f.deb(deb) / "usr" / "share" / "games" / "fortunes"
        files += [p for p in sorted(directory.iterdir())
                  if p.is_file() and not p.is_symlink() and not p.suffix and p.name not in FORTUNE_SKIP]
    for path in files:
        raw = path.read_text(encoding="utf-8", errors="replace")
        for item in re.split(r"(?m)^%\s*$", raw):
            text = normalize(textwrap.dedent(item.expandtabs(8)), "lines")
            if word_count(text) >= 3:
                yield Doc(text)
