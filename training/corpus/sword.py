"""SWORD Bible modules from Debian: the World English Bible (zText) and verse commentaries (zCom).

A small reader of the compressed SWORD formats and of the OSIS markup inside them; books and
chapters come from the text's own `<chapter sID>` markers, so no versification table is needed.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from nanogpt_mlx.training.corpus.source import Doc, Fetcher
from nanogpt_mlx.training.corpus.text import normalize, paragraphs, word_count


def _sword_conf(root: Path, module: str) -> tuple[Path, dict[str, str]]:
    """(data directory, conf entries) of SWORD module `module` unpacked under `root`."""
    base = root / "usr" / "share" / "sword"
    conf: dict[str, str] = {}
    for line in (base / "mods.d" / f"{module}.conf").read_text(encoding="utf-8",
                                                               errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            conf.setdefault(key.strip(), value.strip())
    return base / conf["DataPath"].lstrip("./"), conf


def read_sword_testament(data_dir: Path, testament: str, wide: bool) -> list[str]:
    """Entries (verse texts, in versification order) of one testament of a zText/zCom module.

    Format: `<t>.?zs` lists compressed blocks (offset, size, uncompressed size: 3 x u32);
    `<t>.?zz` holds the zlib blocks; `<t>.?zv` has one entry per verse slot: block number (u32),
    offset into the decompressed block (u32) and length (u16, or u32 for the "4" drivers).
    Some modules declare zCom4 but carry 10-byte entries, so the width is checked against the
    file size and the block count rather than trusted.
    """
    found = sorted(data_dir.glob(f"{testament}.?zs"))
    if not found or found[0].stat().st_size == 0:
        return []
    stem = str(found[0])[:-2]
    index = Path(stem + "zs").read_bytes()
    verses = Path(stem + "zv").read_bytes()
    data = Path(stem + "zz").read_bytes()
    blocks = [struct.unpack_from("<III", index, i)[:2] for i in range(0, len(index), 12)]

    def entries(width: int) -> list[tuple[int, int, int]] | None:
        if len(verses) % width:
            return None
        fmt = "<III" if width == 12 else "<IIH"
        out = [struct.unpack_from(fmt, verses, i) for i in range(0, len(verses), width)]
        return out if all(s == 0 or b < len(blocks) for b, _, s in out) else None

    table = entries(12 if wide else 10) or entries(10 if wide else 12)
    if table is None:
        raise ValueError(f"cannot parse SWORD index {stem}zv")
    cache: dict[int, bytes] = {}
    texts = []
    for block, offset, size in table:
        if size == 0:
            texts.append("")
            continue
        if block not in cache:
            start, length = blocks[block]
            cache[block] = zlib.decompress(data[start:start + length])
        texts.append(cache[block][offset:offset + size].decode("utf-8", errors="replace"))
    return texts


_OSIS_DROP = re.compile(r"<(note|title)\b[^>]*?(?<!/)>.*?</\1>", re.S)
_OSIS_PARA = re.compile(
    r"<(?:div\b[^>]*\btype=\"(?:x-p|paragraph|introduction)\"[^>]*|lb\b[^>]*type=\"x-p\"[^>]*"
    r"|lg\b[^>]*|/?p\b[^>]*|/?item\b[^>]*|/?row\b[^>]*|/?list\b[^>]*|/?table\b[^>]*)/?>")
_TAG = re.compile(r"<[^>]*>")
_CHAPTER = re.compile(r"<chapter\b[^>]*\bsID=\"([^\".]+)\.(\d+)\"[^>]*/?>")


def osis_to_text(fragment: str) -> str:
    """Plain text of an OSIS fragment: notes and headings dropped, paragraph markers -> blank line."""
    fragment = _OSIS_DROP.sub(" ", fragment)
    fragment = _OSIS_PARA.sub("\n\n", fragment)
    fragment = _TAG.sub("", fragment)
    return html.unescape(fragment)


def sword_chapters(root: Path, module: str) -> Iterator[tuple[str, int, list[str]]]:
    """(book OSIS id, chapter, raw OSIS entries) for each chapter of a SWORD module.

    Book and chapter come from the `<chapter sID="Book.N"/>` markers in the text itself, so no
    versification table is needed. Entries before a book's first chapter (book introductions,
    prefaces) are reported as chapter 0.
    """
    data_dir, conf = _sword_conf(root, module)
    wide = conf.get("ModDrv", "").endswith("4")
    book, chapter, entries = "", 0, []
    for testament in ("ot", "nt"):
        for entry in read_sword_testament(data_dir, testament, wide):
            if not entry:
                continue
            pos = 0
            for m in _CHAPTER.finditer(entry):
                if entry[pos:m.start()].strip():
                    entries.append(entry[pos:m.start()])
                if entries and book:
                    yield book, chapter, entries
                book, chapter, entries = m.group(1), int(m.group(2)), []
                pos = m.end()
            book_div = re.search(r"<div\b[^>]*type=\"book\"[^>]*osisID=\"([^\"]+)\"|"
                                 r"<div\b[^>]*osisID=\"([^\"]+)\"[^>]*type=\"book\"", entry[pos:])
            if book_div:  # a new book's introduction starts before its first chapter marker
                if entries and book:
                    yield book, chapter, entries
                book, chapter, entries = book_div.group(1) or book_div.group(2), 0, []
            if entry[pos:].strip():
                entries.append(entry[pos:])
    if entries and book:
        yield book, chapter, entries


def web(f: Fetcher) -> Iterator[Doc]:
    root = f.deb("sword-text-web")
    books: dict[str, list[str]] = {}
    for book, chapter, entries in sword_chapters(root, "engWEB2015eb"):
        if chapter == 0:  # prefaces and book introductions: mostly headings and front matter
            continue
        text = normalize(osis_to_text(" ".join(entries)), "reflow")
        if text:
            books.setdefault(book, []).append(text)
    for book, chapters in books.items():
        yield Doc("\n\n".join(chapters), key=book)


def commentary(module: str, deb: str, split_key: bool) -> Callable[[Fetcher], Iterator[Doc]]:
    """One document per commented chapter, with repeated entries and paragraphs removed.

    Commentaries attach one note to every verse it covers, so the same text recurs in
    consecutive slots (Matthew Henry's repeats ~40x): duplicate entries and duplicate long
    paragraphs (anywhere in the module) are kept once.
    """

    def extract(f: Fetcher) -> Iterator[Doc]:
        root = f.deb(deb)
        seen_paras: set[str] = set()
        for book, _chapter, entries in sword_chapters(root, module):
            unique = list(dict.fromkeys(entries))
            text = osis_to_text("\n\n".join(unique))
            # Scofield's cross-references, e.g. (See Scofield "Romans 1:16").
            text = re.sub(r"\(?\s*See Scofield\s+\"[^\"]*\"\s*\)?\.?", " ", text)
            paras = []
            for para in paragraphs(normalize(text, "reflow")):
                # Fewer than four words: a lemma label ("Son of man") or "Verses 21-29".
                if word_count(para) < 4:
                    continue
                if len(para) >= 40:
                    if para in seen_paras:
                        continue
                    seen_paras.add(para)
                paras.append(para)
            text = "\n\n".join(paras)
            if word_count(text) >= 20:
                yield Doc(text, key=book if split_key else "")

    return extract
