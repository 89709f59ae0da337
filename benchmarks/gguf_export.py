"""Write a GGUF file of one of our checkpoint directories, for llama.cpp, with the `gguf` package alone.

    python -m nanogpt_mlx.benchmarks.gguf_export CHECKPOINT_DIR OUT_DIR [--outtype f16]   # -> OUT_DIR/model-f32.gguf

Follows llama.cpp's `convert_hf_to_gguf.py` for GPT-2: the tensor names come from gguf's own
GPT-2 name map (`blk.N.attn_qkv`, `ffn_up`, ...), HF's Conv1D weights (in x out) are transposed
to (out x in), and the tokenizer is the GPT-2 BPE (`vocab.json` in id order, `merges.txt`,
pre-tokenizer "gpt-2", `<|endoftext|>` = 50256 as BOS/EOS and a control token, no BOS added).
Our LM head is not tied, so `lm_head.weight` becomes `output.weight` (the converter's tied
GPT-2 copies `wte` there instead). With `--outtype f16` the 2-D weights are stored in fp16 and
the norms and biases in fp32, as the converter does.

llama.cpp's GPT-2 graph uses the tanh GELU where ours is the exact erf GELU, so its logits differ
from ours in the last digits: greedy continuations agree until two tokens are nearly tied.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nanogpt_mlx.atomic import atomic_dir

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
EOT = 50256


def gguf_tensors(model_dir: Path, outtype: str = "f32") -> list[tuple[str, np.ndarray]]:
    """(gguf name, array) for every tensor of the checkpoint, in llama.cpp's layouts."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text())
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config["n_layer"])
    weights = load_file(str(model_dir / "model.safetensors"))
    tensors = []
    for name, value in sorted(weights.items()):
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old transformers' causal-mask buffers, not parameters
        if name.endswith(CONV1D_WEIGHTS):
            value = value.T
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{model_dir}: no GGUF name for tensor {name}")
        value = np.ascontiguousarray(value, dtype=np.float16 if outtype == "f16" and value.ndim == 2 else np.float32)
        tensors.append((gguf_name, value))
    names = {n for n, _ in tensors}
    if "output.weight" not in names:  # a tied head: llama.cpp reads the embedding from output.weight
        tensors.append(("output.weight", next(v for n, v in tensors if n == "token_embd.weight")))
    return tensors


def gguf_file_name(outtype: str) -> str:
    return f"model-{outtype}.gguf"


def write_gguf(model_dir: str | Path, out_dir: str | Path, outtype: str = "f32", name: str | None = None) -> Path:
    """Convert the HF GPT-2 directory `model_dir` into `out_dir/model-<outtype>.gguf`; returns its path.

    `out_dir` is written as a whole (temporary sibling, then renamed), so a crash never leaves a
    truncated GGUF where llama-server would load it.
    """
    import gguf

    if outtype not in ("f32", "f16"):
        raise ValueError(f"outtype must be f32 or f16, not {outtype!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    vocab = json.loads((model_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = [
        line for line in (model_dir / "merges.txt").read_text(encoding="utf-8").splitlines() if line and not line.startswith("#version")
    ]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    if len(tokens) != config["vocab_size"] or [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError(f"{model_dir}/vocab.json does not hold ids 0..{config['vocab_size'] - 1}")
    token_types = [gguf.TokenType.CONTROL if t == "<|endoftext|>" else gguf.TokenType.NORMAL for t in tokens]

    with atomic_dir(out_dir) as tmp:
        writer = gguf.GGUFWriter(tmp / gguf_file_name(outtype), arch="gpt2")
        writer.add_name(name or model_dir.name)
        writer.add_context_length(config["n_positions"])
        writer.add_embedding_length(config["n_embd"])
        writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
        writer.add_block_count(config["n_layer"])
        writer.add_head_count(config["n_head"])
        writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(config.get("bos_token_id", EOT))
        writer.add_eos_token_id(config.get("eos_token_id", EOT))
        writer.add_add_bos_token(False)
        for tensor_name, value in gguf_tensors(model_dir, outtype):
            writer.add_tensor(tensor_name, value)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out_dir / gguf_file_name(outtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanogpt_mlx.benchmarks.gguf_export", description=__doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--outtype", choices=["f32", "f16"], default="f32")
    args = p.parse_args(argv)
    print(write_gguf(args.model_dir, args.out_dir, args.outtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
