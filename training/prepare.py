"""prepare-data: text, JSONL, Parquet or a Hugging Face dataset -> GPT-2 token shards + manifest.

Output layout (one directory; training/dataset.py reads it):

    train_000.bin, train_001.bin, ...   raw little-endian uint16 token ids
    val_000.bin, ...
    manifest.json                       counts per split, shard files, tokenizer, sources

Every document is preceded by `<|endoftext|>` (id 50256), so documents are separated by it and
the model also learns what a document's start looks like after an end-of-text token.

The held-out split is deterministic: a document goes to `val` by the document-hash rule of
training/split.py (`held_out`, about `val_fraction` of the documents), unless explicit
validation inputs are given (e.g. the corpus's own val.jsonl), in which case the inputs are all
training data. Shards and the manifest are written atomically (nanogpt_mlx.atomic), the
manifest last, so a reader never sees a half-written dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanogpt_mlx.atomic import atomic_file, write_json
from nanogpt_mlx.training.dataset import FORMAT, FORMAT_VERSION, MANIFEST, DataError
from nanogpt_mlx.training.split import VAL_FRACTION, held_out

DEFAULT_SHARD_TOKENS = 100_000_000  # 200 MB per uint16 shard
TEXT_SUFFIXES = {".txt", ".md"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES
EOT_TEXT = "<|endoftext|>"
# Documents are tokenized in batches of about this many characters (one call to tiktoken's
# multithreaded encode_ordinary_batch each).
BATCH_CHARS = 4_000_000


# --------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------


def _files_of(path: Path) -> list[Path]:
    """The input files behind one input argument (a directory is searched recursively)."""
    if not path.exists():
        raise DataError(f"input not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"no .txt, .md, .jsonl, .json or .parquet files under {path}")
        return files
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(f"unsupported file type {path.suffix or '(none)'!r} for {path}; "
                        "expected .txt, .md, .jsonl, .json or .parquet")
    return [path]


def _text_of(record: Any, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if text_field not in record:
            raise DataError(f"{where}: no {text_field!r} field (choose one with --text-field; "
                            f"fields here: {', '.join(map(str, record)) or 'none'})")
        value = record[text_field]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, not text")
        return value
    raise DataError(f"{where}: expected a JSON object or string, got {type(record).__name__}")


def _read_text(path: Path) -> Iterator[str]:
    # A text file is one document, unless it separates documents itself with <|endoftext|>.
    text = path.read_text(encoding="utf-8", errors="replace")
    yield from text.split(EOT_TEXT)


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            yield _text_of(record, text_field, f"{path}:{lineno}")


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    """A .json file: a list of records or strings, one record, or (often) JSON Lines."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        yield from _read_jsonl(path, text_field)
        return
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records):
        yield _text_of(record, text_field, f"{path}[{i}]")


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install 'nanogpt-mlx[data]' "
                        "(or pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path}: no {text_field!r} column (columns: "
                        f"{', '.join(pf.schema_arrow.names)}); choose one with --text-field")
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: column {text_field!r} holds {type(value).__name__}, "
                                "not text")
            yield value or ""


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents (strings) of one local input: a file or a directory of files."""
    for file in _files_of(Path(path)):
        suffix = file.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            yield from _read_text(file)
        elif suffix == ".jsonl":
            yield from _read_jsonl(file, text_field)
        elif suffix == ".json":
            yield from _read_json(file, text_field)
        else:
            yield from _read_parquet(file, text_field)


def read_hf_dataset(name: str, config: str | None, split: str, text_field: str) -> Iterator[str]:
    """Documents of a Hugging Face dataset, streamed (nothing is downloaded up front).

    `name` may be a hub id ("roneneldan/TinyStories"), a local directory that `load_dataset`
    understands (data files), or a directory written by `Dataset.save_to_disk`.
    """
    try:
        import datasets
    except ImportError:
        raise DataError("--hf-dataset needs the `datasets` package: pip install "
                        "'nanogpt-mlx[data]' (or pip install datasets)") from None
    local = Path(name)
    try:
        if (local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{name}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, config, split=split, streaming=True)
    except DataError:
        raise
    except Exception as exc:  # hub/network/config errors: the library's message is the useful part
        raise DataError(f"cannot load Hugging Face dataset {name!r}"
                        f"{f' (config {config!r})' if config else ''}, split {split!r}: "
                        f"{type(exc).__name__}: {exc}") from None
    for i, record in enumerate(ds):
        yield _text_of(record, text_field, f"{name}[{i}]")


# --------------------------------------------------------------------------------------------
# Writing shards
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Appends token arrays to `{split}_000.bin`, `{split}_001.bin`, ... of at most `shard_tokens`.

    Use it as a context manager. Each shard is an `atomic_file`, renamed into place when full or
    when the `with` block ends cleanly; if the block raises, the open shard's temporary file is
    removed. A shard stays open across many `write` calls, so its `atomic_file` context is
    entered and left here rather than in a `with` statement.
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} of finished shards
        self.tokens = 0
        self.documents = 0
        self._shard = None  # the open shard's atomic_file context
        self._fh = None
        self._in_shard = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._shard is not None:
            self._close_shard(exc_type, exc, tb)

    def _open_shard(self) -> None:
        self._shard = atomic_file(self.out_dir / self._next_name(), "wb")
        self._fh = self._shard.__enter__()
        self._in_shard = 0

    def _close_shard(self, exc_type=None, exc=None, tb=None) -> None:
        shard, self._shard, self._fh = self._shard, None, None
        shard.__exit__(exc_type, exc, tb)  # no exception: fsync and rename into place; else delete
        if exc_type is None:
            self.shards.append({"file": self._next_name(), "tokens": self._in_shard})

    def _next_name(self) -> str:
        return f"{self.split}_{len(self.shards):03d}.bin"

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self._shard is None:
                self._open_shard()
            room = self.shard_tokens - self._in_shard
            part, tokens = tokens[:room], tokens[room:]
            part.tofile(self._fh)
            self._in_shard += len(part)
            self.tokens += len(part)
            if self._in_shard == self.shard_tokens:
                self._close_shard()


@dataclass
class _SourceStats:
    input: str
    documents: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict = field(default_factory=lambda: {"train": 0, "val": 0})


def _batches(docs: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prepare_data(
    inputs: Sequence[str | os.PathLike] = (),
    out_dir: str | os.PathLike = "data",
    *,
    val_fraction: float = VAL_FRACTION,
    val_inputs: Sequence[str | os.PathLike] | None = None,
    text_field: str = "text",
    hf_dataset: str | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
    token_budget: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize documents into uint16 shards in `out_dir`; return the manifest.

    inputs: text/markdown files (one document each, or several split by <|endoftext|>), JSONL or
    JSON (field `text_field`), Parquet (column `text_field`), or directories holding them.
    hf_dataset: also (or instead) stream this Hugging Face dataset's `hf_split`.
    val_inputs: if given, these are the validation split and `inputs` are all training data;
    otherwise ~`val_fraction` of documents, chosen by hash, are held out.
    token_budget: stop after this many tokens in all (EOT separators included).
    """
    from nanogpt_mlx.model.tokenizer import get_tokenizer  # imported late: the CLI starts fast

    inputs = [Path(p) for p in inputs]
    val_inputs = [Path(p) for p in (val_inputs or [])]
    if not inputs and not hf_dataset:
        raise DataError("no inputs: give files or directories, or --hf-dataset NAME")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if token_budget is not None and token_budget <= 0:
        raise DataError(f"--token-budget must be positive, got {token_budget}")
    if shard_tokens <= 0:
        raise DataError(f"shard size must be positive, got {shard_tokens}")
    # Check every local path up front, so a typo fails before minutes of tokenizing.
    for path in inputs + val_inputs:
        _files_of(path)

    enc = get_tokenizer()
    eot = enc.eot_token
    if enc.n_vocab > 2**16:
        raise DataError(f"tokenizer has {enc.n_vocab} tokens; uint16 shards hold at most 65536")
    workers = workers or os.cpu_count() or 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # (label, documents, fixed split or None for the hash split)
    streams: list[tuple[str, Iterator[str], str | None]] = []
    fixed = "train" if val_inputs else None
    for path in inputs:
        streams.append((str(path), read_documents(path, text_field), fixed))
    if hf_dataset:
        label = f"hf:{hf_dataset}" + (f"/{hf_config}" if hf_config else "") + f"[{hf_split}]"
        streams.append((label, read_hf_dataset(hf_dataset, hf_config, hf_split, text_field), fixed))
    for path in val_inputs:
        streams.append((str(path), read_documents(path, text_field), "val"))

    from tqdm.auto import tqdm

    stats: list[_SourceStats] = []
    truncated = False
    total = 0
    with (ShardWriter(out, "train", shard_tokens) as train_writer, ShardWriter(out, "val", shard_tokens) as val_writer,
          tqdm(total=token_budget, unit="tok", unit_scale=True, desc="prepare-data", disable=not progress, file=sys.stderr) as bar):
        writers = {"train": train_writer, "val": val_writer}
        for label, docs, split in streams:
            st = _SourceStats(label)
            stats.append(st)
            # Empty or whitespace-only documents would only add a lone separator.
            nonempty = (d for d in docs if d.strip())
            for batch in _batches(nonempty, BATCH_CHARS):
                encoded = enc.encode_ordinary_batch(batch, num_threads=workers)
                for text, ids in zip(batch, encoded):
                    name = split or ("val" if held_out(text, val_fraction) else "train")
                    if token_budget is not None and total + len(ids) + 1 > token_budget:
                        truncated = True
                        break
                    tokens = np.empty(len(ids) + 1, dtype=np.uint16)
                    tokens[0] = eot
                    tokens[1:] = ids
                    writers[name].write(tokens)
                    writers[name].documents += 1
                    st.documents[name] += 1
                    st.tokens[name] += len(tokens)
                    total += len(tokens)
                    bar.update(len(tokens))
                if truncated:
                    break
            if truncated:
                break

    if writers["train"].tokens == 0:
        what = "within the token budget" if truncated else "in the inputs"
        raise DataError(f"no training documents {what}: the output would be empty")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": "uint16",
        "tokenizer": {"name": enc.name, "vocab_size": enc.n_vocab, "eot_token": eot},
        "document_separator": "eot_token before every document",
        "splits": {name: {"documents": w.documents, "tokens": w.tokens, "shards": w.shards}
                   for name, w in writers.items()},
        "split_rule": ("explicit validation inputs" if val_inputs
                       else f"document hash (training/split.py held_out), val_fraction={val_fraction}"),
        "val_fraction": None if val_inputs else val_fraction,
        "text_field": text_field,
        "token_budget": token_budget,
        "truncated_by_budget": truncated,
        "sources": [{"input": s.input, "documents": s.documents, "tokens": s.tokens}
                    for s in stats],
    }
    write_json(out / MANIFEST, manifest)
    # Shards of an earlier, larger run in the same directory are no longer described: remove.
    current = {s["file"] for w in writers.values() for s in w.shards}
    for split in ("train", "val"):
        for stale in out.glob(f"{split}_*.bin"):
            if stale.name not in current:
                stale.unlink()
    return manifest


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(float(text)) if any(c in text for c in "eE.") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-data",
        help="tokenize text / JSONL / Parquet / a HF dataset into uint16 token shards",
        description="Tokenize documents with the GPT-2 BPE into train_NNN.bin / val_NNN.bin "
                    "(uint16) and manifest.json. Inputs: .txt/.md files (one document each), "
                    ".jsonl/.json and .parquet (the --text-field), directories of those, "
                    "and/or a Hugging Face dataset (streamed).",
    )
    p.add_argument("inputs", nargs="*", help="files or directories")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help=f"fraction of documents held out by document hash (default {VAL_FRACTION})")
    p.add_argument("--val-input", action="append", default=[], metavar="PATH",
                   help="validation data (repeatable); then all inputs are training data")
    p.add_argument("--hf-dataset", metavar="NAME",
                   help="Hugging Face dataset id or local dataset directory (needs `datasets`)")
    p.add_argument("--hf-config", help="dataset configuration name")
    p.add_argument("--hf-split", default="train", help="dataset split (default train)")
    p.add_argument("--text-field", default="text", help="JSON field / column holding the text")
    p.add_argument("--token-budget", type=_positive_int, metavar="N",
                   help="stop after N tokens in all (e.g. 1e8)")
    p.add_argument("--shard-tokens", type=_positive_int, default=DEFAULT_SHARD_TOKENS,
                   metavar="N", help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS:,})")
    p.add_argument("--workers", type=_positive_int, default=None,
                   help="tokenizer threads (default: all cores)")
    p.set_defaults(func=_cmd_prepare_data)


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    # A DataError is a UserError: the CLI prints it as `error: ...` and exits with 2.
    manifest = prepare_data(
        args.inputs, args.out, val_fraction=args.val_fraction, val_inputs=args.val_input,
        text_field=args.text_field, hf_dataset=args.hf_dataset, hf_config=args.hf_config,
        hf_split=args.hf_split, token_budget=args.token_budget,
        shard_tokens=args.shard_tokens, workers=args.workers,
    )
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['documents']:,} documents, {split['tokens']:,} tokens in "
              f"{len(split['shards'])} shard(s)")
    if manifest["splits"]["val"]["tokens"] == 0:
        print("warning: no document fell in the validation split; give --val-input or a larger "
              "--val-fraction to evaluate", file=sys.stderr)
    if manifest["truncated_by_budget"]:
        print(f"stopped at the token budget ({manifest['token_budget']:,})")
    print(f"wrote {Path(args.out) / MANIFEST}")
    return 0
