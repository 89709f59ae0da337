"""A content-addressed store of teacher answers: one file per question, written atomically.

The key is the SHA-256 of the question (the teacher's identity, what was asked and the tokens or
prompt), so a rerun, a `--resume` after a kill, or another run with the same teacher reads the
answer instead of asking again, and a changed question can never read a stale answer. Files are
written through `nanogpt_mlx.atomic` (temporary sibling, fsync, rename): a kill leaves either
the whole answer or none, and an unreadable file (a disk error) is treated as missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from nanogpt_mlx.atomic import atomic_file, write_json


def content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class AnswerCache:
    """`get(key)` / `put(key, value)`; arrays (`.npz`) or JSON (`.json`) values, by `kind`."""

    def __init__(self, root: str | os.PathLike, kind: str = "npz"):
        if kind not in ("npz", "json"):
            raise ValueError(f"unknown cache kind {kind!r}")
        self.root, self.kind = Path(root), kind
        self.hits = 0
        self.writes = 0

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.{self.kind}"

    def get(self, key: str):
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            if self.kind == "npz":
                with np.load(path) as stored:
                    value = {name: stored[name] for name in stored.files}
            else:
                value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, EOFError):
            return None  # damaged: ask again, and overwrite it
        self.hits += 1
        return value

    def put(self, key: str, value) -> None:
        path = self.path(key)
        if self.kind == "npz":
            with atomic_file(path, "wb") as f:
                np.savez(f, **value)
        else:
            write_json(path, value)
        self.writes += 1

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob(f"*/*.{self.kind}")) if self.root.is_dir() else 0
