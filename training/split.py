"""Which text is held out for validation: the one rule for the corpus builder and prepare-data.

Three forms of one deterministic rule, so the same inputs always give the same split and a
rebuilt corpus or shard directory is byte-identical:

* by document (`held_out`): a document is validation when the 64-bit BLAKE2b hash of its UTF-8
  text, taken modulo 10,000, is below `fraction` x 10,000 (rounded). It depends on the text
  alone, not on the order or the company a document comes in, so a document keeps its side
  when sources are added, removed or reordered. prepare-data and the corpus's multi-document
  sources use it;
* by span (`split_tail`): a single long work (a play, a poem, a book) cannot be held out whole,
  so its last ~`fraction` of characters, cut at a paragraph boundary, is validation;
* by Bible book (`book_held_out`): Bible translations and verse commentaries hold out the same
  final books (1 John to Revelation, ~2 % of the text) in every translation, so no verse seen in
  training through one translation is scored through another.
"""

from __future__ import annotations

import hashlib

VAL_FRACTION = 0.02
# Bible books (OSIS ids) held out in every translation and commentary (~2 % of a Protestant
# canon's text).
VAL_BOOKS = frozenset({"1John", "2John", "3John", "Jude", "Rev"})
_BUCKETS = 10_000  # the hash rule's resolution: fractions are counted in 1/10,000ths


def text_hash(text: str) -> int:
    """A stable 64-bit hash of a text (BLAKE2b of its UTF-8 bytes); also used to drop duplicates."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def held_out(text: str, fraction: float = VAL_FRACTION) -> bool:
    """Whether a document belongs to the validation split (about `fraction` of all documents)."""
    return text_hash(text) % _BUCKETS < round(fraction * _BUCKETS)


def split_tail(text: str, fraction: float = VAL_FRACTION) -> tuple[str, str]:
    """(train, val) of one long work: val is its last ~`fraction`, cut at a paragraph boundary.

    Paragraphs are separated by one blank line; a text of one paragraph stays whole in train.
    """
    paras = [p for p in text.split("\n\n") if p]
    target = len(text) * (1 - fraction)
    pos, cut = 0, len(paras)
    for i, para in enumerate(paras):
        if pos >= target:
            cut = i
            break
        pos += len(para) + 2
    cut = max(1, min(cut, len(paras) - 1)) if len(paras) > 1 else 1
    return "\n\n".join(paras[:cut]), "\n\n".join(paras[cut:])


def book_held_out(book: str) -> bool:
    """Whether a Bible book (OSIS id, e.g. "Rev") is validation in every translation."""
    return book in VAL_BOOKS
