"""One checkpoint format: a Hugging Face GPT-2 directory.

    config.json         GPT2Config (activation_function "gelu" = exact erf GELU)
    model.safetensors   HF names and layouts (Conv1D weights are in x out), fp32 or fp16
    vocab.json          GPT-2 BPE vocabulary  (= encoder.json)
    merges.txt          GPT-2 BPE merges      (= vocab.bpe)
    tokenizer_config.json   the tokenizer's settings for AutoTokenizer (context length, <|endoftext|>)

`transformers.AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`
load it unchanged; we load it into fp32 MLX arrays. Directories are written to a temporary
sibling and renamed into place, so a crash never leaves half a checkpoint.

`import_npz` converts the original MLX project's `checkpoint_{iter}.npz` (+ `_meta.json`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from nanogpt_mlx.model.config import ModelConfig
from nanogpt_mlx.model.gpt import GPT
from nanogpt_mlx.model.tokenizer import bundled_bpe_files

WEIGHTS_FILE = "model.safetensors"
DTYPES = {
    "float32": mx.float32,
    "fp32": mx.float32,
    "float16": mx.float16,
    "fp16": mx.float16,
    "bfloat16": mx.bfloat16,
    "bf16": mx.bfloat16,
}


TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def tokenizer_config(context_length: int) -> dict:
    """GPT-2's tokenizer settings as transformers writes them, with this model's context length.

    GPT-2 adds no BOS/EOS token to what it encodes; <|endoftext|> (50256) is its BOS, EOS and UNK.
    """
    eot = "<|endoftext|>"
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            "50256": {"content": eot, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False, "special": True}
        },
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": context_length,
    }


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message says why."""


# --- writing ---------------------------------------------------------------------------------
def save_checkpoint(model: GPT, out_dir: str | os.PathLike, dtype: str = "float32", extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` as a HF GPT-2 directory at `out_dir`, atomically (temp dir + rename)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        weights = {k: v.astype(DTYPES[dtype]) for k, v in model.hf_weights().items()}
        mx.save_safetensors(str(tmp / WEIGHTS_FILE), weights, metadata={"format": "pt"})
        config = model.config.to_hf_dict()
        config["torch_dtype"] = "float16" if DTYPES[dtype] == mx.float16 else "bfloat16" if DTYPES[dtype] == mx.bfloat16 else "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        encoder_json, vocab_bpe = bundled_bpe_files()
        shutil.copyfile(encoder_json, tmp / "vocab.json")
        shutil.copyfile(vocab_bpe, tmp / "merges.txt")
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50256}) + "\n")
        (tmp / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tokenizer_config(model.config.block_size), indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for f in tmp.iterdir():
            fsync_path(f)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is moved aside first and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- reading ---------------------------------------------------------------------------------
def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {model_dir}")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a checkpoint directory needs config.json and {WEIGHTS_FILE}")
    try:
        return ModelConfig.from_hf_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def load_model(model_dir: str | os.PathLike, dtype=mx.float32) -> GPT:
    """Load a HF GPT-2 directory into an MLX `GPT` (fp32 by default: the fast CPU path).

    The model comes back in inference mode (dropout off, whatever config.json says); call
    `model.train()` to fine-tune it.
    """
    config = load_config(model_dir)
    weights_path = Path(model_dir) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing")
    try:
        raw = mx.load(str(weights_path))
    except Exception as exc:  # MLX raises RuntimeError/ValueError for damaged files
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    model = GPT(config)
    load_weights(model, GPT.sanitize(raw), source=str(weights_path), dtype=dtype)
    model.eval()
    return model


def load_weights(model: GPT, weights: dict[str, mx.array], source: str, dtype=mx.float32) -> None:
    """Check names and shapes against the module, then load (cast to `dtype`) and evaluate."""
    if model.config.tie_embeddings:
        weights.pop("lm_head.weight", None)  # transformers may save the tied copy too
    expected = dict(nn.utils.tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source} does not match config.json: " + "; ".join(parts))
    for name, value in weights.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(value.shape)} but config.json implies {tuple(expected[name].shape)}"
            )
    model.load_weights([(k, v.astype(dtype)) for k, v in weights.items()])
    mx.eval(model.parameters())


# --- the original project's .npz checkpoints -------------------------------------------------
_NPZ_RENAMES = [
    (r"^token_embedding\.", "wte."),
    (r"^position_embedding\.", "wpe."),
    (r"^blocks\.(\d+)\.ln1\.", r"h.\1.ln_1."),
    (r"^blocks\.(\d+)\.ln2\.", r"h.\1.ln_2."),
    (r"^blocks\.(\d+)\.attn\.qkv_proj\.", r"h.\1.attn.c_attn."),
    (r"^blocks\.(\d+)\.attn\.out_proj\.", r"h.\1.attn.c_proj."),
    (r"^blocks\.(\d+)\.ff\.fc1\.", r"h.\1.mlp.c_fc."),
    (r"^blocks\.(\d+)\.ff\.fc2\.", r"h.\1.mlp.c_proj."),
]


def npz_config(npz_path: Path) -> ModelConfig:
    """The config beside an original checkpoint: `checkpoint_N_meta.json`, else `config.json`."""
    meta = npz_path.with_name(npz_path.stem + "_meta.json")
    folder_config = npz_path.with_name("config.json")
    if meta.is_file():
        raw = json.loads(meta.read_text()).get("config", {})
    elif folder_config.is_file():
        raw = json.loads(folder_config.read_text())
    else:
        raise CheckpointError(f"no {meta.name} or config.json beside {npz_path}: cannot tell the model's shape")
    try:
        return ModelConfig(
            vocab_size=raw["vocab_size"],
            block_size=raw["context_length"],
            n_layer=raw["n_layers"],
            n_head=raw["n_heads"],
            n_embd=raw["d_model"],
            n_inner=raw["d_ff"],
            tie_embeddings=False,
        )
    except KeyError as exc:
        raise CheckpointError(f"the config beside {npz_path} lacks {exc.args[0]!r}") from exc


def import_npz(npz_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Convert an original-project checkpoint (Linear weights already out x in) to a HF directory."""
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise CheckpointError(f"checkpoint not found: {npz_path}")
    config = npz_config(npz_path)
    try:
        arrays = dict(np.load(npz_path))
    except Exception as exc:
        raise CheckpointError(f"{npz_path} is not a readable .npz file: {exc}") from exc
    weights = {}
    for name, value in arrays.items():
        for pattern, repl in _NPZ_RENAMES:
            name = re.sub(pattern, repl, name)
        weights[name] = mx.array(value.astype(np.float32))
    model = GPT(config)
    load_weights(model, weights, source=str(npz_path))
    return save_checkpoint(model, out_dir, dtype=dtype)
