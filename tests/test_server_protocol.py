"""Pure pieces of the server: stop-string holdback, request validation, settings from flags and env."""

from __future__ import annotations

import argparse

import pytest

from nanogpt_mlx.server.protocol import CompletionRequest, ParamError
from nanogpt_mlx.server.settings import ServerSettings, add_arguments, from_arguments
from nanogpt_mlx.server.stop_strings import StopStringMatcher


# --- stop strings ------------------------------------------------------------------------------
def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_string_split_across_pieces_is_never_emitted():
    m = StopStringMatcher(["\n\nUser:"])
    emitted = []
    for piece in ["Hello", " there", "\n", "\nUs", "er", ":", " more"]:
        text, hit = m.feed(piece)
        emitted.append(text)
        if hit:
            break
    assert "".join(emitted) == "Hello there"
    assert hit
    assert emitted[2] == ""  # "\n" could start the stop string: held back, not emitted


def test_held_back_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    m = StopStringMatcher(["abc"])
    assert m.feed("xxab") == ("xx", False)
    assert m.feed("d") == ("abd", False)
    assert m.flush() == ""
    m = StopStringMatcher(["abc"])
    assert feed_all(m, ["xa", "b"]) == ("xab", False)  # the end of the text flushes the holdback


def test_earliest_completed_stop_string_wins_and_text_is_cut_where_it_starts():
    assert feed_all(StopStringMatcher(["world", "lo w"]), ["hello", " world"]) == ("hel", True)
    assert feed_all(StopStringMatcher(["."]), ["a.b.c"]) == ("a", True)


def test_no_stop_strings_passes_text_through():
    m = StopStringMatcher([])
    assert m.feed("anything") == ("anything", False)


# --- request validation ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompt_forms(prompt, expected):
    assert CompletionRequest.model_validate({"prompt": prompt}).prompts() == expected


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [True]}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": "x", "temperature": "1"}, "temperature"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "logprobs": -1}, "logprobs"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "temperature": float("nan")}, "temperature"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({"max_tokens": 3}, "prompt"),
    ],
)
def test_invalid_requests_name_the_parameter(body, param):
    with pytest.raises(Exception) as info:
        CompletionRequest.model_validate(body)
    assert info.value.errors()[0]["loc"][0] == param


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "x", "suffix": "tail"}, "suffix"),
        ({"prompt": "x", "best_of": 1, "n": 2}, "best_of"),
        ({"prompt": "x", "best_of": 3, "stream": True}, "best_of"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "use_beam_search": True}, "use_beam_search"),
        ({"prompt": "x", "response_format": {"type": "structural_tag", "format": {}}}, "response_format"),
        ({"prompt": "x", "structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
        ({"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ],
)
def test_parameters_this_model_cannot_honour_are_refused(body, param):
    req = CompletionRequest.model_validate(body)
    with pytest.raises(ParamError) as info:
        req.check_supported()
    assert info.value.param == param


def test_harmless_values_of_unsupported_parameters_are_accepted():
    req = CompletionRequest.model_validate({"prompt": "x", "suffix": None, "best_of": 2, "n": 2, "user": "me"})
    req.check_supported()
    CompletionRequest.model_validate(
        {"prompt": "x", "best_of": 3, "use_beam_search": False, "response_format": {"type": "text"}}
    ).check_supported()


# --- settings --------------------------------------------------------------------------------------
def parse(argv: list[str]) -> ServerSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_arguments(parser.parse_args(argv))


def test_every_setting_is_a_flag_and_an_env_var(monkeypatch):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == set(ServerSettings.model_fields)
    for name, action in flags.items():
        assert f"NANOGPT_MLX_{name.upper()}" in action.help

    monkeypatch.setenv("NANOGPT_MLX_MAX_BATCH", "12")
    monkeypatch.setenv("NANOGPT_MLX_API_KEY", "from-env")
    s = parse(["--port", "9001"])
    assert (s.max_batch, s.api_key, s.port, s.host) == (12, "from-env", 9001, "127.0.0.1")
    assert parse(["--max-batch", "3"]).max_batch == 3  # a flag beats the environment


def test_bad_settings_name_the_flag_and_the_variable(monkeypatch):
    with pytest.raises(ValueError, match="--max-batch / NANOGPT_MLX_MAX_BATCH"):
        parse(["--max-batch", "0"])
    monkeypatch.setenv("NANOGPT_MLX_PORT", "not-a-port")
    with pytest.raises(ValueError, match="--port"):
        parse([])
