"""`nanogpt-mlx` — one command line for the whole project.

Each subcommand lives beside the code it drives: a module exposes `register_cli(subparsers)`,
which adds its parser and sets `func` to a handler returning an exit code. Handlers import
their heavy dependencies lazily so `--help` stays fast.

Exit codes: 0 success, 1 runtime failure, 2 usage / input error (bad flags, missing files).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nanogpt_mlx.errors import UserError  # noqa: F401  (re-exported: `from nanogpt_mlx.cli import UserError` keeps working)

# Modules that contribute subcommands, in the order `--help` lists them.
COMMAND_MODULES = [
    "nanogpt_mlx.server.cli",
    "nanogpt_mlx.model.cli",
    "nanogpt_mlx.training.prepare",
    "nanogpt_mlx.training.cli",
    "nanogpt_mlx.benchmarks.cli",
]


# Packages that only some commands need, and the extra that installs them (pyproject.toml): the
# server needs none of them, so `pip install nanogpt-mlx` leaves them out.
OPTIONAL_PACKAGES = {
    "tqdm": "train",
    "matplotlib": "train",
    "httpx": "train",
    "datasets": "data",
    "pyarrow": "data",
}


def build_parser() -> argparse.ArgumentParser:
    from nanogpt_mlx import __version__

    parser = argparse.ArgumentParser(prog="nanogpt-mlx", description=__doc__.split("\n")[0].split("—")[-1].strip())
    parser.add_argument("--version", action="version", version=f"nanogpt-mlx {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that part of the project is not written yet
                continue
            raise
        module.register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = OPTIONAL_PACKAGES.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: `nanogpt-mlx {args.command}` needs {exc.name}: pip install 'nanogpt-mlx[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `nanogpt-mlx generate ... | head`: the reader is gone
        sys.stderr.close()
        return 0
    except Exception as exc:
        # Known, user-fixable failures from the library carry their own message.
        from nanogpt_mlx.model.checkpoint import CheckpointError

        if isinstance(exc, (CheckpointError, FileNotFoundError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
