"""The model's shape, and its round trip through a Hugging Face GPT-2 `config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class ModelConfig:
    """nanoGPT-MLX-53M by default: 8 layers, 384 wide, 8 heads, FFN 1536, context 512.

    The card says the LM head is tied, but its sizes and the original checkpoints have a
    separate head (52,990,464 parameters); tying stays an option (33,691,776).
    """

    vocab_size: int = 50257
    block_size: int = 512
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 384
    n_inner: int = 1536
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        for f in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_inner"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def replace(self, **changes) -> ModelConfig:
        return ModelConfig(**{**asdict(self), **changes})

    # --- Hugging Face GPT-2 config.json -------------------------------------------------------
    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_inner": self.n_inner,
            # "gelu" is the exact erf GELU in transformers; GPT-2's own is "gelu_new" (tanh).
            "activation_function": "gelu",
            "layer_norm_epsilon": self.layer_norm_eps,
            "tie_word_embeddings": self.tie_embeddings,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "scale_attn_weights": True,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "torch_dtype": "float32",
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> ModelConfig:
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"not a GPT-2 config: model_type={d.get('model_type')!r}")
        act = d.get("activation_function", "gelu_new")
        if act != "gelu":
            raise ValueError(f"activation_function={act!r} is not supported: this model uses the exact erf GELU ('gelu')")
        n_embd = d.get("n_embd", 768)
        return cls(
            vocab_size=d.get("vocab_size", 50257),
            block_size=d.get("n_positions", d.get("n_ctx", 1024)),
            n_layer=d.get("n_layer", 12),
            n_head=d.get("n_head", 12),
            n_embd=n_embd,
            n_inner=d.get("n_inner") or 4 * n_embd,
            layer_norm_eps=d.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=d.get("tie_word_embeddings", True),
            dropout=d.get("resid_pdrop", 0.0),
        )

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        return cls.from_hf_dict(json.loads((Path(directory) / "config.json").read_text()))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
