"""transformers + torch on the same HF directory: the peer measured as a user would run it.

    python benchmarks/peer_torch.py inference '{"model_dir": ..., "runs": 20, ...}'   # prints one JSON line
    python benchmarks/peer_torch.py greedy '{"model_dir": ..., "prompts": [...], "greedy_tokens": 32}'

Run as a plain script (not `-m nanogpt_mlx...`): importing nanogpt_mlx would load its BLAS and set
FTZ/DAZ and malloc options in this process, and the peer must run as it does for its users. Same
definitions as ours (workloads.py): forward B x T with full logits, generation of N greedy tokens
after the same random prompt with the KV cache (`generate`), prefill of a 1 x N prompt with its KV
cache (`use_cache=True`), fp32, eval mode, `torch.inference_mode()`, torch's default threads.
"""

from __future__ import annotations

import json
import sys

from timing import timed  # this file runs as a script, so its folder is on sys.path


def _device(name: str):
    import torch

    if name != "gpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    raise RuntimeError("torch has no CUDA or MPS device here")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def _load(p: dict):
    from transformers import AutoModelForCausalLM

    device = _device(p["device"])
    # .float() rather than a dtype argument: its name changed across transformers releases
    model = AutoModelForCausalLM.from_pretrained(p["model_dir"]).float().to(device)
    model.eval()
    return model, device


def inference(p: dict) -> dict:
    import numpy as np
    import torch

    model, device = _load(p)
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    out = {"device": str(device), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    with torch.inference_mode():
        batch = torch.from_numpy(rng.integers(0, min(vocab, 50257), (p["forward_batch"], p["forward_seq"]))).to(device)

        def forward() -> None:
            logits = model(batch, use_cache=False).logits
            _sync(device)
            del logits

        out["forward_s"] = timed(forward, p["runs"], p["warmup"])

        prompt_ids = np.random.default_rng(1234).integers(0, min(vocab, 50257), p["prompt_tokens"])  # the same prompt as ours
        prompt = torch.from_numpy(prompt_ids).to(device)[None, :]
        n = p["gen_tokens"]

        def generate() -> None:
            ids = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=model.config.eos_token_id,
            )
            _sync(device)
            if ids.shape[1] - prompt.shape[1] != n:
                raise RuntimeError(f"transformers generated {ids.shape[1] - prompt.shape[1]} of {n} tokens")

        out["generation_s"] = timed(generate, p["runs"], p["warmup"])

        prefill_ids = torch.from_numpy(rng.integers(0, min(vocab, 50257), (1, p["prefill_tokens"]))).to(device)

        def prefill() -> None:
            model(prefill_ids, use_cache=True).logits[:, -1]
            _sync(device)

        out["prefill_s"] = timed(prefill, p["runs"], p["warmup"])
    return out


def greedy(p: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    model, device = _load(p)
    tokenizer = AutoTokenizer.from_pretrained(p["model_dir"])
    results = []
    with torch.inference_mode():
        for text in p["prompts"]:
            ids = torch.tensor([tokenizer.encode(text)], device=device)
            n = p["greedy_tokens"]
            full = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=model.config.eos_token_id,
            )
            new = full[0, ids.shape[1] :].tolist()
            results.append({"prompt": text, "tokens": new, "text": tokenizer.decode(new)})
    return {"continuations": results}


if __name__ == "__main__":
    name, params = sys.argv[1], json.loads(sys.argv[2])
    result = {"inference": inference, "greedy": greedy}[name](params)
    sys.stdout.flush()
    print(json.dumps(result))
