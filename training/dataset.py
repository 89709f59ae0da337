"""Reading prepared token shards: what `train`, `eval`, `distill` and `publish` import.

A data directory made by `nanogpt-mlx prepare-data` (training/prepare.py) holds

    train_000.bin, train_001.bin, ...   raw little-endian uint16 token ids
    val_000.bin, ...
    manifest.json                       counts per split, shard files, tokenizer, sources

and every document in a shard is preceded by `<|endoftext|>`.

`TokenShards(dir, "train")` memory-maps a split; `RandomWindowSampler` draws (x, y) batches of
random windows reproducibly (its state can be saved and restored to resume training exactly);
`sequential_batches` walks a split once for evaluation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from nanogpt_mlx.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "nanogpt-mlx-tokens"
FORMAT_VERSION = 1


class DataError(UserError, ValueError):
    """A problem with the user's data or arguments: reported as `error: ...`, no traceback."""


def load_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {data_dir}: run `nanogpt-mlx prepare-data` first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a {FORMAT} manifest")
    return manifest


class TokenShards:
    """The token shards of one split, memory-mapped (nothing is read until used)."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(data_dir)
        if split not in self.manifest["splits"]:
            raise DataError(f"{data_dir} has no split {split!r}")
        self.split = split
        self.shards: list[np.ndarray] = []
        for shard in self.manifest["splits"][split]["shards"]:
            path = self.data_dir / shard["file"]
            if not path.is_file():
                raise DataError(f"missing shard {path} (listed in the manifest)")
            arr = np.memmap(path, dtype=np.uint16, mode="r")
            if len(arr) != shard["tokens"]:
                raise DataError(f"{path} holds {len(arr)} tokens, the manifest says {shard['tokens']}")
            self.shards.append(arr)
        self.eot_token = self.manifest["tokenizer"]["eot_token"]

    def __len__(self) -> int:
        """Total number of tokens in the split."""
        return sum(len(s) for s in self.shards)

    @property
    def documents(self) -> int:
        return self.manifest["splits"][self.split]["documents"]


class RandomWindowSampler:
    """Endless (x, y) batches of random windows: x = tokens[s:s+T], y = tokens[s+1:s+T+1].

    Windows stay inside one shard; a shard is chosen with probability proportional to the
    number of windows it holds, so every window of the split is equally likely. Draws come from
    one numpy Generator: the same seed gives the same batches, and `state_dict()` /
    `load_state_dict()` (JSON-serializable) resume the exact sequence after a restart. For
    data-parallel training give each rank its own seed (e.g. seed + rank).
    """

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int = 0):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError("batch_size and seq_len must be positive")
        self.shards, self.batch_size, self.seq_len, self.seed = shards, batch_size, seq_len, seed
        # Start positions available in each shard (a window needs seq_len + 1 tokens).
        self._starts = np.array([max(len(s) - seq_len, 0) for s in shards.shards], dtype=np.int64)
        if self._starts.sum() == 0:
            raise DataError(f"the {shards.split} split has {len(shards)} tokens, fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}")
        self._weights = self._starts / self._starts.sum()
        self._rng = np.random.default_rng(seed)
        self.step = 0

    def __iter__(self) -> RandomWindowSampler:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        return self.next_batch()

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        b, t = self.batch_size, self.seq_len
        if len(self._starts) == 1:
            which = np.zeros(b, dtype=np.int64)
        else:
            which = self._rng.choice(len(self._starts), size=b, p=self._weights)
        starts = self._rng.integers(0, self._starts[which])
        buf = np.empty((b, t + 1), dtype=np.int32)
        for row, (shard, start) in enumerate(zip(which, starts)):
            buf[row] = self.shards.shards[shard][start:start + t + 1]
        self.step += 1
        return buf[:, :-1].copy(), buf[:, 1:].copy()

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if (state["batch_size"], state["seq_len"]) != (self.batch_size, self.seq_len):
            raise ValueError(f"sampler state is for batch {state['batch_size']} x "
                             f"{state['seq_len']}, this sampler draws {self.batch_size} x "
                             f"{self.seq_len}")
        self.seed, self.step = state["seed"], state["step"]
        self._rng.bit_generator.state = state["bit_generator"]


def sequential_batches(shards: TokenShards, batch_size: int, seq_len: int
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every non-overlapping window of the split once, in order, as (x, y) int32 batches.

    The last batch may have fewer than `batch_size` rows; the tail of each shard shorter than
    one window is not used.
    """
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError("batch_size and seq_len must be positive")
    rows: list[np.ndarray] = []
    for arr in shards.shards:
        for w in range((len(arr) - 1) // seq_len):
            rows.append(np.asarray(arr[w * seq_len:(w + 1) * seq_len + 1], dtype=np.int32))
            if len(rows) == batch_size:
                buf = np.stack(rows)
                rows = []
                yield buf[:, :-1].copy(), buf[:, 1:].copy()
    if rows:
        buf = np.stack(rows)
        yield buf[:, :-1].copy(), buf[:, 1:].copy()
