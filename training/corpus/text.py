"""Text cleaning shared by every source: whitespace, paragraphs, line reflow."""

from __future__ import annotations

import re
import unicodedata

SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
PARA_BREAK = re.compile(r"\n[ \t]*\n")


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
    for block in PARA_BREAK.split(text):
        raw = [ln for ln in block.split("\n") if ln.strip()]
        if not raw:
            continue
        keep = mode == "lines" or (mode == "auto" and len(raw) > 1
                                   and all(ln[:1] in (" ", "\t") for ln in raw))
        lines = [SPACES.sub(" ", ln).strip() for ln in raw]
        paras.append("\n".join(lines) if keep else _join_lines(lines))
    return "\n\n".join(paras)


def paragraphs(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p]


def word_count(text: str) -> int:
    return len(text.split())

