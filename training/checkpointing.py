"""Resumable training checkpoints that survive crashes, kills and full disks.

Layout of a run directory:

    RUN/checkpoints/step_00001000/   a servable HF GPT-2 directory (fp32) plus
        trainer_state.json           step, tokens seen, sampler state (data position), RNG seed
                                     scheme, best val loss, the recipe, elapsed time
        optimizer.safetensors        AdamW moments and step, flattened
    RUN/best/                        the model with the lowest validation loss so far (HF dir)
    RUN/log.jsonl, RUN/loss.png

A checkpoint is assembled in a temporary sibling directory (nanogpt_mlx.atomic.atomic_dir): the
model through `save_checkpoint`, then the optimizer state; every file is fsynced, one rename
publishes it, and the parent directory is fsynced so the rename survives a power cut. Readers
only look at `step_*` names, so a crash at any moment leaves either the old set of
checkpoints or the old set plus one complete new one. Leftover temporary directories are
removed at the next start. Only after the new checkpoint is published are old ones pruned
(the last `keep_last` stay).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from nanogpt_mlx.atomic import TMP_MARK, atomic_dir, fsync_path, remove_temporaries
from nanogpt_mlx.model.checkpoint import CheckpointError, load_config, load_model, save_checkpoint
from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.gpt import GPT
from nanogpt_mlx.training.recipe import TrainingError

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FORMAT = "nanogpt-mlx-trainer-state"
STATE_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


@dataclass
class Resumed:
    path: Path
    model: GPT
    optimizer_state: dict
    state: dict


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Published checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def clean_partials(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what a crash left half-written (never a published checkpoint): the temporaries of
    nanogpt_mlx.atomic, and the `.NAME.partial-PID` / `.NAME.old-PID` directories that earlier
    versions of this module and `save_checkpoint` leave when killed mid-write."""
    removed = []
    for root in (Path(run_dir) / "checkpoints", Path(run_dir)):
        removed += remove_temporaries(root)
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            if entry.name.startswith(".") and (".partial-" in entry.name or ".old-" in entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def is_out_of_space(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT from Python, or MLX's own write failure (it raises RuntimeError
    "[write] Unable to write N bytes" without an errno)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, RuntimeError) and "unable to write" in str(exc).lower()


def _disk_error(exc: BaseException, target: Path, previous: str) -> TrainingError:
    try:
        free = shutil.disk_usage(target.parent).free / 2**20
        where = f" ({free:,.0f} MiB free on the device of {target.parent})"
    except OSError:
        where = ""
    return TrainingError(
        f"out of disk space while writing {target}{where}: {exc}. {previous} "
        "Free some space (or lower train.keep_last) and rerun with --resume."
    )


def save_training_checkpoint(
    run_dir: str | os.PathLike,
    model: GPT,
    optimizer_state: dict,
    state: dict,
    keep_last: int,
) -> Path:
    """Publish RUN/checkpoints/step_N atomically, then prune to the newest `keep_last`."""
    root = Path(run_dir) / "checkpoints"
    final = root / step_dir_name(int(state["step"]))
    full_state = {"format": STATE_FORMAT, "version": STATE_VERSION, **state}
    try:
        # An existing step_N (the same step saved again, e.g. the final step after a periodic
        # save) is replaced whole.
        with atomic_dir(final) as staging:
            save_checkpoint(model, staging, dtype="float32", extra_files={STATE_FILE: json.dumps(full_state, indent=2) + "\n"})
            mx.save_safetensors(str(staging / OPTIMIZER_FILE), dict(tree_flatten(optimizer_state)))
    except BaseException as exc:
        remove_temporaries(root)  # anything save_checkpoint had not cleaned up itself
        if is_out_of_space(exc):
            previous = list_checkpoints(run_dir)
            note = (f"The previous checkpoint {previous[-1][1]} is intact." if previous else "No earlier checkpoint exists.")
            raise _disk_error(exc, final, note) from exc
        raise
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        _retire(old)
    return final


def _retire(path: Path) -> None:
    """Delete a published checkpoint so that a crash midway never leaves half of one under its
    published name: rename it to a hidden name first (atomic; `clean_partials` removes such
    leftovers on resume), then delete the files."""
    hidden = path.with_name(f".{path.name}{TMP_MARK}retired-{os.getpid()}")
    os.replace(path, hidden)
    fsync_path(path.parent)
    shutil.rmtree(hidden, ignore_errors=True)


def save_best(run_dir: str | os.PathLike, model: GPT, state: dict) -> Path:
    """RUN/best: the lowest-validation-loss model so far, as a servable HF directory."""
    target = Path(run_dir) / "best"
    try:
        return save_checkpoint(model, target, dtype="float32", extra_files={STATE_FILE: json.dumps(state, indent=2) + "\n"})
    except BaseException as exc:
        if is_out_of_space(exc):
            raise _disk_error(exc, target, "The previous best model is intact.") from exc
        raise


def read_state(path: Path) -> dict:
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing: {path} is not a training checkpoint") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is damaged: {exc}") from exc
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{file} is not a {STATE_FORMAT} file")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{file} has version {state.get('version')}, this trainer reads {STATE_VERSION}")
    return state


def load_training_checkpoint(path: Path) -> Resumed:
    state = read_state(path)
    model = load_model(path)
    opt_file = path / OPTIMIZER_FILE
    if not opt_file.is_file():
        raise CheckpointError(f"{opt_file} is missing")
    try:
        flat = mx.load(str(opt_file))
    except Exception as exc:
        raise CheckpointError(f"{opt_file} is not readable: {exc}") from exc
    return Resumed(path=path, model=model, optimizer_state=tree_unflatten(list(flat.items())), state=state)


def latest_checkpoint(run_dir: str | os.PathLike, expected: ModelConfig) -> Resumed | None:
    """The newest readable checkpoint of the run (a damaged newest one falls back to the one
    before, with a warning); None when the run has none. Raises TrainingError when the newest
    readable checkpoint is of a different model than the recipe describes."""
    for _step, path in reversed(list_checkpoints(run_dir)):
        try:
            config = load_config(path)
        except CheckpointError as exc:
            print(f"warning: skipping damaged checkpoint {path}: {exc}", file=sys.stderr)
            continue
        mismatch = describe_mismatch(config, expected)
        if mismatch:
            raise TrainingError(
                f"cannot resume from {path}: it holds a different model than the recipe ({mismatch}). "
                "Use the recipe the run was started with, or a new --out directory."
            )
        try:
            return load_training_checkpoint(path)
        except CheckpointError as exc:
            print(f"warning: skipping damaged checkpoint {path}: {exc}", file=sys.stderr)
    return None


def describe_mismatch(found: ModelConfig, expected: ModelConfig, ignore=("dropout",)) -> str:
    """'' when the two configs describe the same network, else which fields differ."""
    return "; ".join(
        f"{name}: checkpoint {getattr(found, name)}, recipe {getattr(expected, name)}"
        for name in ModelConfig.field_names()
        if name not in ignore and getattr(found, name) != getattr(expected, name)
    )
