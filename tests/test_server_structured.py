"""Structured output (server/structured.py): JSON schemas, regexes, choices and grammars through
the real HTTP API and the `openai` SDK (completions and chat, streaming and not, n > 1), the
engine sharing decode steps between constrained and free rows, whitespace capped, finish reasons
(`stop` when the structure completes, `length` when it cannot), and clear 400s.

The model is the tiny random checkpoint: its text means nothing, and every completed output must
still parse and validate, because the constraint alone makes it so. Schemas are bounded
(tests/structured_cases.py) so most samples finish within its 128-token context; the tests count
how many did and require a healthy majority.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Literal

import httpx
import jsonschema
import numpy as np
import pytest
from openai import BadRequestError, OpenAI
from pydantic import BaseModel, Field

from nanogpt_mlx.model.checkpoint import load_model
from nanogpt_mlx.model.runner import ModelRunner
from nanogpt_mlx.model.sampling import SamplingParams
from nanogpt_mlx.model.tokenizer import get_tokenizer
from nanogpt_mlx.server.engine import Engine, SequenceRequest
from nanogpt_mlx.server.protocol import ChatCompletionRequest, CompletionRequest, ParamError
from nanogpt_mlx.server.structured import JSON_WHITESPACE, StructuredOutputs, StructureSpec, apply_token_bitmask, close_objects

from server_support import ThreadedServer, sse_payloads
from structured_cases import CHOICES, GRAMMARS, REGEXES, SCHEMAS

pytestmark = pytest.mark.timeout(300)

MODEL = "nanogpt-mlx"
SEEDS = (1, 2, 3)
N = 4
MAX_TOKENS = 96  # the tiny model's context is 128 tokens


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with ThreadedServer(tiny_checkpoint, max_batch=32, max_queue=256) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(server):
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def completion(http: httpx.Client, **body) -> dict:
    body = {"model": MODEL, "prompt": "Answer in JSON:", **body}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def check_outputs(outputs: list[tuple[str, str]], valid, what: str, majority: float = 0.75) -> None:
    """Every (text, finish_reason) that finished with "stop" is valid; most of them finished."""
    for text, finish in outputs:
        assert finish in ("stop", "length"), (what, finish)
        if finish == "stop":
            assert valid(text), f"{what}: a completed output is invalid: {text!r}"
    completed = sum(finish == "stop" for _, finish in outputs)
    assert completed >= majority * len(outputs), f"{what}: only {completed} of {len(outputs)} completed"


def validates(schema: dict):
    def check(text: str) -> bool:
        jsonschema.validate(json.loads(text), schema)  # raises with the reason
        return True

    return check


# --- the parts, without a server ----------------------------------------------------------------------
def test_apply_token_bitmask_forbids_exactly_the_zero_bits():
    rng = np.random.default_rng(0)
    vocab = 50257
    bitmask = rng.integers(-(2**31), 2**31, size=(vocab + 31) // 32, dtype=np.int64).astype(np.int32)
    logits = rng.standard_normal(vocab).astype(np.float32)
    masked = apply_token_bitmask(logits.copy(), bitmask)
    allowed = np.array([(int(bitmask[t // 32]) >> (t % 32)) & 1 for t in range(vocab)], dtype=bool)
    assert np.array_equal(masked[allowed], logits[allowed])  # unchanged, bit for bit
    assert np.all(masked[~allowed] == -np.inf)


def test_close_objects_closes_object_schemas_but_not_values():
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}, "c": {"const": {"properties": {}}}},
        "$defs": {"d": {"properties": {"e": {"type": "string"}}, "additionalProperties": True}},
    }
    closed = close_objects(schema)
    assert closed["additionalProperties"] is False and closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["const"] == {"properties": {}}  # a value, not a schema
    assert closed["$defs"]["d"]["additionalProperties"] is True  # stated: kept
    assert "additionalProperties" not in schema  # the request's schema is not modified


def test_the_librarys_tokenizer_is_the_checkpoints(tiny_checkpoint):
    """llguidance's view of the vocabulary, built from the offline tiktoken encoding, has every
    token's bytes and tokenizes as transformers' tokenizer of the checkpoint does."""
    from transformers import AutoTokenizer

    encoding = get_tokenizer(tiny_checkpoint)
    lltokenizer = StructuredOutputs(encoding, encoding.n_vocab).lltokenizer
    differ = [t for t in range(encoding.n_vocab) if lltokenizer.decode_bytes([t]) != encoding.decode_single_token_bytes(t)]
    # llguidance reserves the byte 0xFF (never part of UTF-8 text) to mark special tokens
    assert [encoding.decode_single_token_bytes(t) for t in differ] == [b"\xff"]
    assert lltokenizer.is_special_token(encoding.eot_token)
    hf = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for text in ["Hello world", ' {"a": [1, 2.5e3, null]}\n\n  x', "héllo 東京 — ok?", "    indented\tcode"]:
        assert lltokenizer.tokenize_str(text) == hf(text)["input_ids"] == encoding.encode(text)


def spec_of(body: dict, chat: bool = False) -> StructureSpec | None:
    if chat:
        return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **body}).structure()
    return CompletionRequest.model_validate({"prompt": "x", **body}).structure()


def test_every_request_field_becomes_one_spec():
    schema = {"type": "object"}
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    assert spec_of({"response_format": rf}, chat=True) == StructureSpec("json_schema", "response_format", schema)
    loose = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": False}}
    assert spec_of({"response_format": loose}).strict is False
    assert spec_of({"response_format": {"type": "json_object"}}).kind == "json_object"
    assert spec_of({"response_format": {"type": "text"}}) is None and spec_of({}) is None
    assert spec_of({"structured_outputs": {"json": json.dumps(schema)}}) == StructureSpec("json_schema", "structured_outputs.json", schema)
    assert spec_of({"structured_outputs": {"regex": "a+"}}) == StructureSpec("regex", "structured_outputs.regex", "a+")
    assert spec_of({"structured_outputs": {"choice": ["a", "b"]}}).value == ["a", "b"]
    assert spec_of({"structured_outputs": {"grammar": "start: \"a\""}}).kind == "grammar"
    assert spec_of({"structured_outputs": {"json_object": True}}).kind == "json_object"
    options = {"json": schema, "disable_any_whitespace": True, "disable_additional_properties": True, "whitespace_pattern": " ?"}
    spec = spec_of({"structured_outputs": options})
    assert (spec.compact, spec.closed_objects, spec.whitespace_pattern) == (True, True, " ?")
    assert spec_of({"guided_json": schema, "guided_whitespace_pattern": "[ ]?"}) == StructureSpec(
        "json_schema", "guided_json", schema, whitespace_pattern="[ ]?"
    )
    assert spec_of({"guided_regex": "a+"}, chat=True).param == "guided_regex"
    assert spec_of({"guided_choice": ["x"]}).kind == "choice"
    assert spec_of({"guided_grammar": "root ::= \"a\""}).kind == "grammar"


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "invalid_value"),
        ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "guided_choice", "invalid_value"),
        ({"structured_outputs": {}}, "structured_outputs", "invalid_value"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "invalid_value"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs", "unsupported_parameter"),
        ({"response_format": {"type": "structural_tag", "structures": []}}, "response_format", "unsupported_parameter"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "missing_required_parameter"),
        ({"guided_json": "{not json"}, "guided_json", "invalid_value"),
        ({"guided_json": "[1, 2]"}, "guided_json", "invalid_value"),
    ],
)
def test_conflicting_or_incomplete_structure_fields_are_refused(body, param, code):
    with pytest.raises(ParamError) as info:
        spec_of(body)
    assert (info.value.param, info.value.code) == (param, code)


# --- JSON schemas through the SDK -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_completed_output_validates_against_its_schema(sdk, name):
    """Each schema x 3 seeds x n=4: by completions' structured_outputs / guided_json and by chat's
    response_format json_schema (strict)."""
    schema = SCHEMAS[name]
    outputs = []
    for seed in SEEDS:
        field = {"structured_outputs": {"json": schema}} if seed % 2 else {"guided_json": schema}
        c = sdk.completions.create(model=MODEL, prompt="JSON:", max_tokens=MAX_TOKENS, n=N, seed=seed, extra_body=field)
        outputs += [(choice.text, choice.finish_reason) for choice in c.choices]
        chat = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Reply in JSON."}],
            max_completion_tokens=MAX_TOKENS,
            n=N,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
        )
        outputs += [(choice.message.content, choice.finish_reason) for choice in chat.choices]
    check_outputs(outputs, validates(schema), name)


def test_json_object_mode_gives_json_objects(http):
    """Any JSON object: keys are free strings, so the sampling is nudged towards closing quotes
    and braces (logit_bias) for the random model to finish them; the structure alone is what
    makes each output an object."""
    bias = {"1": 10, "92": 10, "20662": 10}  # '"', '}', '"}'
    outputs = []
    for seed in SEEDS:
        body = {"max_tokens": MAX_TOKENS, "n": N, "seed": seed, "logit_bias": bias}
        c = completion(http, response_format={"type": "json_object"}, **body)
        outputs += [(ch["text"], ch["finish_reason"]) for ch in c["choices"]]
        c = completion(http, structured_outputs={"json_object": True}, **body)
        outputs += [(ch["text"], ch["finish_reason"]) for ch in c["choices"]]
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "JSON please"}],
                                                    "response_format": {"type": "json_object"}, **body})
        assert r.status_code == 200, r.text
        outputs += [(ch["message"]["content"], ch["finish_reason"]) for ch in r.json()["choices"]]
    check_outputs(outputs, lambda text: isinstance(json.loads(text), dict), "json_object")


# --- regexes, choices, grammars ---------------------------------------------------------------------------
@pytest.mark.parametrize("regex", REGEXES)
def test_regex_outputs_match_in_full(http, regex):
    outputs = []
    for seed in SEEDS:
        field = {"structured_outputs": {"regex": regex}} if seed % 2 else {"guided_regex": regex}
        c = completion(http, prompt="x", max_tokens=60, n=N, seed=seed, **field)
        outputs += [(ch["text"], ch["finish_reason"]) for ch in c["choices"]]
    check_outputs(outputs, lambda text: re.fullmatch(regex, text) is not None, regex)


@pytest.mark.parametrize("choices", CHOICES)
def test_choice_outputs_are_one_of_the_choices(http, sdk, choices):
    outputs = []
    for seed in SEEDS:
        c = completion(http, prompt="Pick:", max_tokens=20, n=N, seed=seed, guided_choice=choices)
        outputs += [(ch["text"], ch["finish_reason"]) for ch in c["choices"]]
        chat = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick one."}], max_completion_tokens=20,
                                           n=N, seed=seed, extra_body={"structured_outputs": {"choice": choices}})
        outputs += [(ch.message.content, ch.finish_reason) for ch in chat.choices]
    check_outputs(outputs, lambda text: text in choices, str(choices), majority=1.0)
    assert len({text for text, _ in outputs}) > 1  # a choice, not always the same text


@pytest.mark.parametrize("grammar, language", GRAMMARS, ids=["lark", "gbnf"])
def test_grammar_outputs_are_in_the_language(http, grammar, language):
    outputs = []
    for seed in SEEDS:
        field = {"structured_outputs": {"grammar": grammar}} if seed % 2 else {"guided_grammar": grammar}
        c = completion(http, prompt="x", max_tokens=60, n=N, seed=seed, **field)
        outputs += [(ch["text"], ch["finish_reason"]) for ch in c["choices"]]
    check_outputs(outputs, lambda text: re.fullmatch(language, text) is not None, language)


# --- streaming, n, logprobs, stop strings, length -------------------------------------------------------
def test_streamed_structured_text_equals_the_non_streamed_text(sdk):
    schema = SCHEMAS["ref"]
    kw = dict(model=MODEL, prompt="JSON:", max_tokens=MAX_TOKENS, n=3, seed=11, extra_body={"structured_outputs": {"json": schema}})
    whole = sdk.completions.create(**kw)
    texts, finishes = {}, {}
    for chunk in sdk.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    for choice in whole.choices:
        assert texts[choice.index] == choice.text and finishes[choice.index] == choice.finish_reason
    check_outputs([(c.text, c.finish_reason) for c in whole.choices], validates(schema), "streamed", majority=0.6)
    assert len({c.text for c in whole.choices}) == 3  # each choice its own matcher and its own draws


def test_chat_streaming_n_with_response_format(sdk):
    schema = SCHEMAS["nested objects"]
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Who?"}],
        max_completion_tokens=MAX_TOKENS,
        n=4,
        seed=5,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "who", "schema": schema}},
    )
    texts, finishes = {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert sorted(texts) == [0, 1, 2, 3]
    check_outputs([(texts[i], finishes[i]) for i in range(4)], validates(schema), "chat stream")


class Shape(BaseModel):
    colour: Literal["red", "green", "blue"]
    sides: int = Field(ge=3, le=8)
    filled: bool


def test_sdk_parse_gives_pydantic_objects(sdk):
    """The SDK's own structured-output helper: it sends the model's strict JSON schema and parses
    each choice back into the pydantic model."""
    messages = [{"role": "user", "content": "A shape."}]
    parsed = sdk.chat.completions.parse(model=MODEL, messages=messages, response_format=Shape, n=4, seed=3, max_completion_tokens=90)
    shapes = [choice.message.parsed for choice in parsed.choices]
    assert all(isinstance(shape, Shape) for shape in shapes) and len(shapes) == 4
    assert all(choice.finish_reason == "stop" for choice in parsed.choices)


def test_logprobs_come_with_structured_tokens(http):
    c = completion(http, max_tokens=MAX_TOKENS, seed=4, logprobs=2, structured_outputs={"json": SCHEMAS["booleans and enum"]})
    choice = c["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and "".join(lp["tokens"]) == choice["text"]
    assert len(lp["token_logprobs"]) == c["usage"]["completion_tokens"] and all(x <= 0 for x in lp["token_logprobs"])
    assert all(len(top) == 2 for top in lp["top_logprobs"])  # the model's own distribution, before the mask
    jsonschema.validate(json.loads(choice["text"]), SCHEMAS["booleans and enum"])


def test_a_stop_string_still_cuts_structured_text(http):
    c = completion(http, prompt="x", max_tokens=30, n=4, seed=1, guided_regex=r"\d{3}-\d{4}", stop=["-"])
    for choice in c["choices"]:
        assert re.fullmatch(r"\d{3}", choice["text"]), choice["text"]
        assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "-")


def test_a_structure_that_cannot_close_in_max_tokens_ends_with_length(http):
    c = completion(http, max_tokens=3, n=4, seed=1, structured_outputs={"json": SCHEMAS["ref"]})
    for choice in c["choices"]:
        assert choice["finish_reason"] == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(choice["text"])
    assert c["usage"]["completion_tokens"] == 12


def test_echo_and_best_of_keep_the_structure(http):
    schema = SCHEMAS["flat object"]
    c = completion(http, prompt="JSON:", echo=True, max_tokens=MAX_TOKENS, n=2, best_of=4, seed=9, structured_outputs={"json": schema})
    assert len(c["choices"]) == 2
    for choice in c["choices"]:
        assert choice["text"].startswith("JSON:")
        if choice["finish_reason"] == "stop":
            jsonschema.validate(json.loads(choice["text"][len("JSON:"):]), schema)


# --- whitespace ------------------------------------------------------------------------------------------
def whitespace_bias() -> dict[str, float]:
    """+100 on every token that is only whitespace: left alone, the model would write nothing else."""
    encoding = get_tokenizer()
    return {str(t): 100.0 for t in range(encoding.n_vocab - 1) if encoding.decode_single_token_bytes(t).isspace()}


def test_runs_of_whitespace_are_capped(http):
    """A model that wants nothing but whitespace: with the cap it still writes the structure (each
    run of whitespace is at most a space, or newlines and 20 spaces or tabs); with an unbounded
    whitespace pattern of the request's own it loops on whitespace until max_tokens."""
    schema = SCHEMAS["exclusive bounds"]  # {"p": 1..9}: five places for whitespace
    bias = whitespace_bias()
    assert {"220", "198", "197", "628"} <= bias.keys()  # " ", "\n", "\t", "\n\n"
    body = {"prompt": "x", "max_tokens": 120, "n": 4, "seed": 2, "logit_bias": bias}
    capped = completion(http, structured_outputs={"json": schema}, **body)
    for choice in capped["choices"]:
        text = choice["text"]
        assert choice["finish_reason"] == "stop", repr(text)  # the model cannot loop on whitespace
        jsonschema.validate(json.loads(text), schema)
        runs = re.findall(r"\s+", text)
        assert runs and all(re.fullmatch(JSON_WHITESPACE, run) and len(run) <= 22 for run in runs), repr(text)
    unbounded = completion(http, structured_outputs={"json": schema, "whitespace_pattern": r"[ \t\n]*"}, **body)
    for choice in unbounded["choices"]:
        longest = max(len(run) for run in re.findall(r"\s+", choice["text"]))
        assert choice["finish_reason"] == "length" and longest > 60, repr(choice["text"])
    compact = completion(http, structured_outputs={"json": schema, "disable_any_whitespace": True}, **body)
    for choice in compact["choices"]:
        assert choice["finish_reason"] == "stop" and re.fullmatch(r'\{"p":[1-9]\}', choice["text"]), choice["text"]


# --- constrained and free rows in one batch ------------------------------------------------------------------
def test_constrained_and_free_rows_share_decode_steps_and_draw_as_alone(tiny_checkpoint):
    """8 seeded sequences, half of them constrained (two schemas, a regex), decode together in one
    batch; each draws exactly what it draws alone, and the free rows are untouched by the masks."""
    encoding = get_tokenizer(tiny_checkpoint)
    structured = StructuredOutputs(encoding, load_model(tiny_checkpoint).config.vocab_size)
    structures = [
        structured.compile(StructureSpec("json_schema", "test", SCHEMAS["flat object"])),
        None,
        structured.compile(StructureSpec("regex", "test", r"[a-z]{2,6}( [a-z]{2,6}){0,3}")),
        None,
        structured.compile(StructureSpec("json_schema", "test", SCHEMAS["ref"])),
        None,
        structured.compile(StructureSpec("choice", "test", ["alpha", "beta"])),
        None,
    ]
    prompt = encoding.encode("The answer is")
    requests = [
        SequenceRequest(prompt=prompt, max_tokens=60, params=SamplingParams(seed=20 + i, temperature=0.9), structure=s, ignore_eos=not s)
        for i, s in enumerate(structures)
    ]
    batch_sizes = []

    def factory(rows: int):
        runner = ModelRunner(load_model(tiny_checkpoint), rows)
        original = runner.decode
        runner.decode = lambda tokens, positions: (batch_sizes.append(len(tokens)), original(tokens, positions))[1]
        return runner

    engine = Engine(factory, encoding, max_batch=8, max_queue=64, max_len=128)
    engine.start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert engine.state != "failed" and time.monotonic() < deadline, engine.failure
        time.sleep(0.02)

    async def collect(reqs):
        texts, tokens, finishes = [""] * len(reqs), [[] for _ in reqs], [None] * len(reqs)
        async for index, out in engine.submit(reqs):
            texts[index] += out.text
            tokens[index] += out.token_ids
            finishes[index] = out.finish_reason or finishes[index]
        return list(zip(texts, map(tuple, tokens), finishes))

    try:
        together = asyncio.run(collect(requests))
        assert max(batch_sizes) >= 7, batch_sizes  # at least 3 constrained rows decoded with the 4 free ones
        alone = [asyncio.run(collect([r]))[0] for r in requests]
    finally:
        engine.shutdown()
    assert together == alone
    assert all(finish == "length" for _, _, finish in together[1::2])  # free rows: 60 tokens, EOS ignored
    text, _, finish = together[0]
    assert finish == "length" or jsonschema.validate(json.loads(text), SCHEMAS["flat object"]) is None
    assert together[6][0] in ("alpha", "beta") and together[6][2] == "stop"


# --- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, param, message",
    [
        ({"structured_outputs": {"json": {"type": "strin"}}}, "structured_outputs.json", "Invalid type: strin"),
        ({"structured_outputs": {"json": {"$ref": "#/$defs/missing"}}}, "structured_outputs.json", "does not exist"),
        ({"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}}, "guided_json", "Unsatisfiable schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}},
         "response_format", "Unimplemented keys"),
        ({"guided_regex": "(ab"}, "guided_regex", "unclosed group"),
        ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar", "unknown name"),
        ({"guided_grammar": "root ::= \"a\" | ("}, "guided_grammar", "invalid grammar"),
    ],
)
def test_what_the_library_cannot_compile_is_a_400_naming_the_parameter(http, field, param, message):
    error = error_of(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", **field}))
    assert (error["param"], error["code"], error["type"]) == (param, "invalid_value", "invalid_request_error")
    assert message in error["message"], error["message"]


def test_strict_false_ignores_keywords_the_library_does_not_implement(http):
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"], "additionalProperties": False,
              "not": {"required": ["b"]}}
    strict = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert error_of(http.post("/v1/completions", json={"prompt": "x", "response_format": strict}))["param"] == "response_format"
    loose = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": False}}
    c = completion(http, max_tokens=MAX_TOKENS, seed=1, response_format=loose)
    assert c["choices"][0]["finish_reason"] == "stop" and isinstance(json.loads(c["choices"][0]["text"])["a"], bool)


def test_the_sdk_sees_a_bad_schema_as_bad_request_and_the_server_keeps_serving(sdk, http):
    with pytest.raises(BadRequestError) as info:
        sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": 3}}},
        )
    assert info.value.body["param"] == "response_format"
    assert http.get("/health").json()["slots_free"] == 32


def test_structured_streams_end_with_done(http):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 20, "stream": True, "n": 2, "guided_choice": ["on", "off"]}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        payloads = sse_payloads(r.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    texts = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert sorted(texts) == [0, 1] and all(text in ("on", "off") for text in texts.values())
