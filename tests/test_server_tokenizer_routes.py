"""The tokenizer routes in vLLM's shape (/tokenize, /detokenize, /tokenizer_info), checked against
transformers' AutoTokenizer loading the same checkpoint directory and against lm-evaluation-
harness's own remote tokenizer; /v1/models as vLLM answers it, with several served names."""

from __future__ import annotations

import pytest

from nanogpt_mlx.model.tokenizer import EOT_ID

from server_support import ThreadedServer

pytestmark = pytest.mark.timeout(600)

TEXTS = ["Hello world", " leading space", "naïve café — 東京", "two<|endoftext|>docs", "", "a\n\n\tb  c"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, served_model_name=["tiny", "nanogpt-mlx"]) as s:
        yield s


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)


def test_checkpoint_directory_loads_in_auto_tokenizer(hf_tokenizer, tiny_config):
    assert hf_tokenizer.model_max_length == tiny_config.block_size
    assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == "<|endoftext|>"
    assert hf_tokenizer.eos_token_id == EOT_ID


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_tokenize_equals_transformers(http, hf_tokenizer, add_special_tokens):
    for text in TEXTS:
        body = http.post("/tokenize", json={"prompt": text, "add_special_tokens": add_special_tokens, "return_token_strs": True}).json()
        ids = hf_tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert body["tokens"] == ids, text
        assert body["count"] == len(ids) and body["max_model_len"] == 128
        assert body["token_strs"] == hf_tokenizer.convert_ids_to_tokens(ids)
        detok = http.post("/detokenize", json={"tokens": ids}).json()
        assert detok == {"prompt": hf_tokenizer.decode(ids)}


def test_tokenize_messages_applies_the_chat_template(http):
    messages = [{"role": "user", "content": "Hi"}]
    with_prompt = http.post("/tokenize", json={"messages": messages}).json()
    without = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert with_prompt["tokens"] == http.post("/tokenize", json={"prompt": "User: Hi\n\nAssistant:"}).json()["tokens"]
    assert without["tokens"] == http.post("/tokenize", json={"prompt": "User: Hi\n\n"}).json()["tokens"]
    r = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": True, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_tokenizer_routes_reject_bad_input(http):
    for body, param in [({"tokens": [-1]}, "tokens"), ({"tokens": [50257]}, "tokens")]:
        r = http.post("/detokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = http.post("/tokenize", json={"prompt": "x", "model": "other"})
    assert r.status_code == 404
    r = http.post("/tokenize", json={"text": "x"})
    assert r.status_code == 400


def test_tokenizer_info_is_the_tokenizer_config(http, hf_tokenizer):
    info = http.get("/tokenizer_info").json()
    assert info["tokenizer_class"] == "GPT2Tokenizer"
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    assert info["model_max_length"] == hf_tokenizer.model_max_length
    assert "vocab_file" not in info and "merges_file" not in info
    assert "{% for message in messages %}" in info["chat_template"]


def test_lm_eval_remote_tokenizer_works_against_the_server(server, http, hf_tokenizer):
    utils = pytest.importorskip("lm_eval.utils")
    remote = utils.RemoteTokenizer(server.base_url + "/v1/completions", max_retries=1)
    assert utils.check_remote_tokenizer_support(server.base_url + "/v1/completions", max_retries=1)
    assert remote.eos_token_id == EOT_ID and remote.eot_token == EOT_ID
    for text in TEXTS[:4]:
        ids = remote.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"]
        assert remote.decode(ids) == text
    messages = [{"role": "user", "content": "Hi"}]
    assert remote.apply_chat_template(messages) == "User: Hi\n\nAssistant:"


def test_models_lists_every_served_name_as_vllm_does(http, server):
    body = http.get("/v1/models").json()
    assert [m["id"] for m in body["data"]] == ["tiny", "nanogpt-mlx"]
    for card in body["data"]:
        assert card["object"] == "model" and card["root"] == str(server.settings.model) and card["max_model_len"] == 128
        assert card["permission"][0]["object"] == "model_permission" and card["parent"] is None
    assert http.get("/v1/models/nanogpt-mlx").json()["id"] == "nanogpt-mlx"
    named = http.post("/v1/completions", json={"model": "nanogpt-mlx", "prompt": "x", "max_tokens": 1}).json()
    unnamed = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).json()
    assert (named["model"], unnamed["model"]) == ("nanogpt-mlx", "tiny")
