"""Write files and directories so that a crash never leaves half of one behind.

Everything is written to a temporary sibling (same directory, so the final rename stays on one
filesystem), flushed to disk with fsync, and renamed into place with `os.replace`, which POSIX
makes atomic: a reader sees the old contents or the new ones, never a mix. The directory holding
the result is fsynced too, so the rename itself survives a power cut. Temporary names start with
a dot and contain `.tmp-`, so leftovers from a killed process are easy to recognise and clean.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temporary(name: str) -> bool:
    """Whether `name` is one of this module's temporary files or directories."""
    return name.startswith(".") and TMP_MARK in name


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb", permissions: int = 0o644) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path`, else it is removed.

        with atomic_file(out / "manifest.json", "w") as f:
            json.dump(manifest, f)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}")
    try:
        os.chmod(tmp, permissions)  # mkstemp makes files private; results are meant to be shared
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, value: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(value, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, permissions: int = 0o755) -> Iterator[Path]:
    """Yield an empty temporary directory beside `path`; on a clean exit it replaces `path`.

    Fill it with ordinary writes; every file in it is fsynced before the rename. An existing
    `path` is renamed aside first and deleted after, so at every moment either the old or the
    new directory is complete under a name a reader could pick up. On an exception the temporary
    directory is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
    try:
        yield tmp
        for entry in tmp.rglob("*"):
            if entry.is_file():
                fsync_path(entry)
        fsync_path(tmp)
        os.chmod(tmp, permissions)  # mkdtemp makes it private
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}{TMP_MARK}old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_path(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete what a killed writer left in `directory` (only this module's temporary names)."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if is_temporary(entry.name):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed
