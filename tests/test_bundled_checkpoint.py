"""The bundled default checkpoint (checkpoints/default): the card's architecture, stored in fp16,
with its model card; `generate` and `serve` use it when no --model is given; `transformers` loads
it unchanged and agrees with our logits."""

from __future__ import annotations

import json
import re

import httpx
import mlx.core as mx
import numpy as np
import pytest
from test_cli import library_text

from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.model.cli import DEFAULT_CHECKPOINT
from nanogpt_mlx.model.sampling import SamplingParams
from nanogpt_mlx.model.tokenizer import get_tokenizer

from conftest import cli_command, cli_env
from server_support import ServeProcess

PROMPT = "In the beginning"


def no_model_env() -> dict[str, str]:
    env = cli_env()
    env.pop("NANOGPT_MLX_MODEL", None)  # the bundled checkpoint must be found by itself
    return env


def test_it_is_the_cards_architecture_in_fp16_with_a_model_card():
    assert (DEFAULT_CHECKPOINT / "model.safetensors").is_file(), "checkpoints/default is not bundled"
    config = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["n_positions"], config["vocab_size"]) == (8, 384, 8, 512, 50257)
    assert config["activation_function"] == "gelu" and config["tie_word_embeddings"] is False
    assert all(v.dtype == mx.float16 for v in mx.load(str(DEFAULT_CHECKPOINT / "model.safetensors")).values())
    model = load_model(DEFAULT_CHECKPOINT)
    assert model.num_params() == 52_990_464
    card = (DEFAULT_CHECKPOINT / "README.md").read_text()
    for section in ("## Training", "## Data", "## Samples", "## Licence"):
        assert section in card
    assert re.search(r"\| tokens seen \| [\d,]+ \|", card) and re.search(r"\| held-out perplexity \| [\d,.]+ \|", card)
    assert card.count("```text") == 3  # three samples


# Plain English written for this test (so in no training source): a trained model predicts it far
# better than chance (uniform over 50,257 tokens: 10.8 nats) and better than its own tokens shuffled.
ENGLISH = ("The old man walked slowly down the road to the village, where his daughter and her children "
           "were waiting for him at the door of the house. He had been away for many years, and they did "
           "not know him when he came.")


def test_it_is_trained_on_english():
    ids = get_tokenizer(DEFAULT_CHECKPOINT).encode(ENGLISH)
    model = load_model(DEFAULT_CHECKPOINT)
    shuffled = [int(i) for i in np.random.default_rng(0).permutation(ids)]

    def loss(tokens: list[int]) -> float:
        x = mx.array([tokens])
        return float(model.loss(x[:, :-1], x[:, 1:]))

    english = loss(ids)
    assert english < 6.5, f"{english:.2f} nats/token on plain English: not a trained model"
    assert loss(shuffled) > english + 1.5


def test_generate_without_model_uses_it(run_cli):
    proc = run_cli("generate", "--prompt", PROMPT, "--max-tokens", "12", "--temperature", "0", env=no_model_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PROMPT + library_text(DEFAULT_CHECKPOINT, PROMPT, 12, SamplingParams(temperature=0.0)) + "\n"


def test_serve_without_model_serves_it(tmp_path):
    expected = library_text(DEFAULT_CHECKPOINT, PROMPT, 8, SamplingParams(temperature=0.0))
    with ServeProcess(cli_command(), [], env=no_model_env(), log_path=tmp_path / "serve.log") as server:
        r = httpx.post(
            server.base_url + "/v1/completions",
            json={"model": "nanogpt-mlx", "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected


def test_transformers_loads_it_and_agrees():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(DEFAULT_CHECKPOINT), torch_dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(DEFAULT_CHECKPOINT))
    ids = tokenizer("The king said unto his servants,")["input_ids"]
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    ours = np.array(load_model(DEFAULT_CHECKPOINT)(mx.array([ids])))
    assert np.abs(ours - theirs).max() <= 1e-4
