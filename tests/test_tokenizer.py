"""The offline GPT-2 tokenizer and the streaming detokenizer (issue 3, item 4)."""

from __future__ import annotations

import numpy as np
import pytest

from nanogpt_mlx.model.tokenizer import EOT_ID, EOT_TOKEN, StreamingDetokenizer, _complete_utf8_prefix, get_tokenizer

UNICODE_TEXTS = [
    "Hello world",
    "héllo wörld, ça va? naïve façade — “quotes” … Ångström",
    "日本語のテキストと中文字符，한국어도",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 and ✨",
    "mixed: Zürich 東京 🚀 Москва Ελλάδα עברית العربية हिन्दी",
    "  leading spaces\n\ttabs\r\nand newlines\n\n",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def test_hello_world(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"


def test_end_of_text(tok):
    assert EOT_ID == 50256 and EOT_TOKEN == "<|endoftext|>"
    assert tok.eot_token == 50256
    assert tok.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    assert tok.decode([50256]) == "<|endoftext|>"
    assert tok.n_vocab == 50257


def test_known_gpt2_ids(tok):
    # Well-known GPT-2 ids: " the" 262, "," 11, "." 13, "\n" 198, " Hello" 18435
    assert tok.encode(" the") == [262]
    assert [tok.encode(s) for s in (",", ".", "\n")] == [[11], [13], [198]]
    assert tok.encode(" Hello") == [18435]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_unicode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_does_not_download(monkeypatch):
    """The encoding is built from local files: tiktoken.get_encoding (which downloads) is never used."""
    import tiktoken

    def boom(*a, **k):
        raise AssertionError("tiktoken.get_encoding must not be called")

    monkeypatch.setattr(tiktoken, "get_encoding", boom)
    from nanogpt_mlx.model import tokenizer as t

    t._build.cache_clear()
    assert t.get_tokenizer().encode("Hello world") == [15496, 995]


def test_checkpoint_directory_files_are_used(tiny_checkpoint):
    tok = get_tokenizer(tiny_checkpoint)
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("text", UNICODE_TEXTS + ["The quick brown fox jumps over the lazy dog. It's 3.14 — isn't it?"])
def test_agrees_with_transformers_autotokenizer(tiny_checkpoint, tok, text):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert hf.encode(text) == tok.encode(text)
    ids = tok.encode(text)
    assert hf.decode(ids) == tok.decode(ids)


def test_autotokenizer_knows_end_of_text(tiny_checkpoint):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert hf.eos_token_id == 50256
    assert hf.convert_ids_to_tokens(50256) == "<|endoftext|>"


# --- streaming detokenization ----------------------------------------------------------------------
def stream(tok, ids) -> list[str]:
    detok = StreamingDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finalize())
    assert detok.text == "".join(pieces)
    return pieces


def assert_no_half_characters(pieces):
    for piece in pieces:
        piece.encode("utf-8")  # a lone surrogate would raise here
        assert "\ufffd" not in piece, f"replacement character in {piece!r}"


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_stream_never_emits_half_a_character(tok, text):
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert_no_half_characters(pieces)
    assert "".join(pieces) == tok.decode(ids) == text


def test_multibyte_characters_really_are_split_across_tokens(tok):
    """The texts above exercise the hard case: tokens holding part of a character."""
    split = 0
    for text in UNICODE_TEXTS:
        for i in tok.encode(text):
            try:
                tok.decode_single_token_bytes(i).decode("utf-8")
            except UnicodeDecodeError:
                split += 1
    assert split >= 10


def test_stream_one_character_at_a_time(tok):
    """Each multi-byte character, encoded alone, fed token by token: one piece is the whole character."""
    for ch in "é日😀👍🏽ñ中한🚀":
        ids = tok.encode(ch)
        pieces = [p for p in stream(tok, ids) if p]
        assert_no_half_characters(pieces)
        assert "".join(pieces) == ch


def test_stream_of_byte_tokens(tok):
    """Feed the single-byte tokens of a 4-byte emoji: nothing until the last byte arrives."""
    byte_token = {tok.decode_single_token_bytes(i): i for i in range(256 + 50)}
    ids = [byte_token[bytes([b])] for b in "😀".encode()]
    detok = StreamingDetokenizer(tok)
    assert [detok.add(i) for i in ids] == ["", "", "", "😀"]
    assert detok.finalize() == ""


def test_stream_of_random_tokens_concatenates_to_decode(tok):
    """Random token streams (often invalid UTF-8): every piece is valid text and the whole == decode."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, 50256, rng.integers(1, 40)).tolist()
        pieces = stream(tok, ids)
        for piece in pieces:
            piece.encode("utf-8")
        assert "".join(pieces) == tok.decode(ids)


def test_stream_ending_mid_character_flushes_with_replacement(tok):
    ids = tok.encode("a😀")
    detok = StreamingDetokenizer(tok)
    emitted = "".join(detok.add(i) for i in ids[:-1])
    assert "\ufffd" not in emitted
    tail = detok.finalize()
    assert (emitted + tail).startswith("a")


@pytest.mark.parametrize(
    "data, cut",
    [
        (b"", 0),
        (b"abc", 3),
        ("é".encode(), 2),
        ("é".encode()[:1], 0),
        (b"a" + "日".encode()[:2], 1),
        ("😀".encode()[:3], 0),
        ("😀".encode(), 4),
        (b"\x80\x80", 2),  # stray continuation bytes are complete (they decode to U+FFFD)
    ],
)
def test_complete_utf8_prefix(data, cut):
    assert _complete_utf8_prefix(data) == cut
