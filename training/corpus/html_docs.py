"""Software documentation from Debian's -doc packages: HTML pages reduced to prose paragraphs."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

from nanogpt_mlx.training.corpus.source import Doc, Fetcher
from nanogpt_mlx.training.corpus.text import SPACES, word_count


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
        text = SPACES.sub(" ", " ".join("".join(self._buf).split())).strip()
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


def debian_docs(deb: str, subdir: str, skip: Callable[[Path], bool] = lambda p: False
               ) -> Callable[[Fetcher], Iterator[Doc]]:
    def extract(f: Fetcher) -> Iterator[Doc]:
        root = f.deb(deb) / subdir
        for path in sorted(root.rglob("*.html")):
            if "_sources" in path.parts or skip(path):
                continue
            text = html_prose(path)
            if word_count(text) >= 30:
                yield Doc(text)

    return extract


def index_page(path: Path) -> bool:
    """Generated index/search pages: lists of links, no prose."""
    return bool(re.match(r"(genindex|py-modindex|modindex|search|bookindex|index-)", path.name))
