"""llama.cpp's `llama-server`, built once from source into a cache directory, for side-by-side figures.

    nanogpt-mlx bench build-llama-server            # ~10 minutes on 2 cores; once per machine
    nanogpt-mlx bench build-llama-server --jobs 1 --nice 19 --cuda

The only source reachable without a network beyond the package registries is the llama.cpp tree
vendored in PyPI's `llama-cpp-python` sdist: `pip download` fetches it, CMake + Ninja build the
`llama-server` target alone, statically (one self-contained binary), and the binary is copied to
`~/.cache/nanogpt-mlx/llama.cpp/<version>/bin/llama-server` (`$XDG_CACHE_HOME` moves `~/.cache`,
as for the rest of nanogpt-mlx's cache). Nothing of llama.cpp enters the repository. Metal is on by llama.cpp's own default on
macOS; `--cuda` adds `-DGGML_CUDA=ON`.

`find_llama_server()` is how the suite finds a binary: `$NANOGPT_MLX_LLAMA_SERVER`, then the
cache, then `llama-server` on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_NATIVE=ON",  # built for this CPU (AVX2 / AVX-512 as it has them), like a local install
]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanogpt-mlx"


def install_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_root() / "llama.cpp" / version


def cached_binary(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return install_dir(version) / "bin" / "llama-server"


def find_llama_server() -> tuple[Path | None, str]:
    """The llama-server binary to run and where it came from, or (None, why there is none)."""
    from_env = os.environ.get("NANOGPT_MLX_LLAMA_SERVER")
    if from_env:
        path = Path(from_env)
        if path.is_file() and os.access(path, os.X_OK):
            return path, "$NANOGPT_MLX_LLAMA_SERVER"
        return None, f"$NANOGPT_MLX_LLAMA_SERVER={from_env} is not an executable file"
    cached = cached_binary()
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached, f"built by `nanogpt-mlx bench build-llama-server` (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})"
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path), "PATH"
    return (
        None,
        "llama-server not built: run `nanogpt-mlx bench build-llama-server` (~10 min), "
        f"or set $NANOGPT_MLX_LLAMA_SERVER (looked in {cached})",
    )


def binary_version(binary: Path) -> str:
    """`llama-server --version`'s first line (e.g. 'version: 6123 (abcdef0)'), or ''."""
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")]
    return lines[0].strip() if lines else ""


def _run(command: list[str], log, cwd: Path | None = None, nice: int = 0) -> None:
    name = command[0]
    if nice and hasattr(os, "nice"):
        command = ["nice", "-n", str(nice), *command]
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    proc = subprocess.run(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see the build log")


def build(
    version: str = LLAMA_CPP_PYTHON_VERSION,
    jobs: int | None = None,
    nice: int = 0,
    cuda: bool = False,
    sdist: Path | None = None,
    log_path: Path | None = None,
    force: bool = False,
) -> Path:
    """Download the sdist (unless `sdist` is given), build `llama-server`, install it in the cache."""
    target = cached_binary(version)
    if target.is_file() and not force:
        return target
    for tool in ("cmake", "ninja"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} is not installed (needed to build llama-server)")
    jobs = jobs or os.cpu_count() or 1
    install_dir(version).mkdir(parents=True, exist_ok=True)
    log_path = log_path or install_dir(version) / "build.log"
    with tempfile.TemporaryDirectory(prefix="llama-cpp-build-") as tmp, open(log_path, "w") as log:
        tmp_path = Path(tmp)
        started = time.monotonic()
        if sdist is None:
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"llama-cpp-python=={version}",
                    "-d",
                    str(tmp_path),
                ],
                log,
                nice=nice,
            )
            sdist = next(tmp_path.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            # The sdist is a registry's file; refuse members that would land outside the folder.
            tar.extractall(tmp_path, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp_path)
        source = next(tmp_path.glob("llama_cpp_python-*/vendor/llama.cpp"))
        flags = [*CMAKE_FLAGS, "-DGGML_CUDA=ON"] if cuda else CMAKE_FLAGS
        _run(["cmake", "-S", str(source), "-B", str(tmp_path / "build"), "-G", "Ninja", *flags], log, nice=nice)
        _run(["cmake", "--build", str(tmp_path / "build"), "--target", "llama-server", "-j", str(jobs)], log, nice=nice)
        built = tmp_path / "build" / "bin" / "llama-server"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        shutil.copy2(built, partial)
        os.replace(partial, target)  # a crash never leaves a half-copied binary under the final name
        log.write(f"built {target} in {time.monotonic() - started:.0f} s\n")
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nanogpt-mlx bench build-llama-server", description=__doc__.split("\n")[0])
    p.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python release whose vendored llama.cpp to build")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    p.add_argument("--nice", type=int, default=0, help="run the build at this niceness (19: yield to everything else)")
    p.add_argument("--cuda", action="store_true", help="build with CUDA (-DGGML_CUDA=ON)")
    p.add_argument("--sdist", type=Path, help="a llama_cpp_python-*.tar.gz already downloaded")
    p.add_argument("--force", action="store_true", help="rebuild even if the binary is cached")
    p.add_argument("--print-path", action="store_true", help="only print the binary the suite would use")
    args = p.parse_args(argv)
    if args.print_path:
        path, why = find_llama_server()
        print(path if path else why)
        return 0 if path else 1
    print(f"building llama-server (llama-cpp-python {args.version}) into {install_dir(args.version)}; log: build.log there", flush=True)
    path = build(args.version, jobs=args.jobs, nice=args.nice, cuda=args.cuda, sdist=args.sdist, force=args.force)
    print(path)
    print(binary_version(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
