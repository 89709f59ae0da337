"""Wire format: OpenAI's completions and chat completions with vLLM's extensions, the tokenizer
routes, the model list, errors.

The request fields are OpenAI's (https://platform.openai.com/docs/api-reference) and every field
vLLM 0.34.0 accepts on the same routes (vllm/entrypoints/openai/completion/protocol.py,
chat_completion/protocol.py, serve/tokenize/protocol.py), so clients written for either run
unchanged. Each field is one of three kinds:

- implemented (most of them; structured output's fields become a `StructureSpec`, see
  `GenerationRequest.structure` and server/structured.py);
- IGNORED: meaningless for this server (KV transfer, multimodal, reasoning, render-only flags...):
  accepted, and the first request that sets one logs one warning naming it;
- UNSUPPORTED: it would change the output in a way this server cannot (beam search, structural
  tags, tools, ...): accepted with its default value, a 400 `unsupported_parameter` otherwise.

A field that neither OpenAI nor vLLM knows is a 400 `unknown_parameter` (server/README.md says
why). An explicit `null` means the default, for every field. Validation is otherwise strict
(no "1" for 1, no NaN), so a client's mistake surfaces as a clear 400 naming the parameter.
"""

from __future__ import annotations

import functools
import json
import logging
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from nanogpt_mlx.server.structured import StructureSpec

log = logging.getLogger("nanogpt_mlx.server")

MAX_STOP_STRINGS = 4
TOKEN_ID_MARK = "x-token-id"
INT64 = {"ge": -(2**63), "le": 2**63 - 1}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        integers = _integer_fields(cls)
        return {
            key: _integral(value) if key in integers else value
            for key, value in data.items()
            if value is not None or key not in cls.model_fields  # an unknown field stays, null or not, to be refused by name
        }


def _integral(value: Any) -> Any:
    """JSON has one kind of number, and the `integer` of JSON Schema (what /openapi.json publishes)
    includes 2.0: a float without a fractional part is that integer, also inside lists of token
    ids. 2.5, "2" and true stay errors."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


@functools.cache
def _integer_fields(cls: type[BaseModel]) -> frozenset[str]:
    """The fields whose values are integers or lists of them (and never floats)."""

    def leaves(annotation) -> set:
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is Annotated:
            return leaves(args[0])
        return set().union(*map(leaves, args)) if args else {annotation}

    return frozenset(name for name, f in cls.model_fields.items() if int in (kinds := leaves(f.annotation)) and float not in kinds)


# --- fields shared by completions and chat completions --------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = Field(False, description="a last chunk with `choices: []` and the request's usage")
    continuous_usage_stats: bool = Field(False, description="vLLM: usage so far on every chunk")


TokenId = Annotated[int, Field(ge=0, json_schema_extra={TOKEN_ID_MARK: True})]  # /openapi.json adds the vocabulary's bound
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
StopList = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)]


class JsonSchemaFormat(_Strict):
    """OpenAI's `response_format.json_schema`."""

    name: str | None = Field(None, max_length=64, description="the schema's name (OpenAI requires one; not used here)")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="the JSON Schema the output follows")
    strict: bool | None = Field(None, description="false: JSON Schema keywords the library does not implement are ignored, not a 400")


class ResponseFormat(_Strict):
    # structural_tag carries fields of its own: accepted here, then a 400 unsupported_parameter
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = Field(None, description="with type json_schema")


class StructuredOutputsParams(_Strict):
    """vLLM's `structured_outputs`: exactly one constraint, with JSON's options."""

    json_: dict[str, Any] | str | None = Field(None, alias="json", description="a JSON Schema (an object, or a string of one)")
    regex: str | None = Field(None, description="the whole output matches this regular expression (Rust regex syntax)")
    choice: Annotated[list[str], Field(min_length=1)] | None = Field(None, description="the output is exactly one of these strings")
    grammar: str | None = Field(None, description="a context-free grammar, Lark or GBNF (llama.cpp's)")
    json_object: bool | None = Field(None, description="any JSON object")
    disable_any_whitespace: bool | None = Field(False, description="JSON without whitespace")
    disable_additional_properties: bool | None = Field(False, description="JSON objects only with the properties listed")
    whitespace_pattern: str | None = Field(None, description="JSON: the regex whitespace between tokens matches")
    structural_tag: str | None = Field(None, description="UNSUPPORTED")


# vLLM's older names of structured_outputs' fields (still sent by many clients)
GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


# Accepted, changing nothing here: field -> why (logged once per field name).
IGNORED: dict[str, str] = {
    "spaces_between_special_tokens": "GPT-2's only special token is <|endoftext|>",
    "length_penalty": "it applies to beam search only",
    "session_id": "there is no session routing here",
    "return_weight_versions": "the weights never change while serving",
    "routed_experts_prompt_start": "this model has no experts",
    "return_token_offsets": "it applies to vLLM's render endpoints only",
    "mm_payload": "this model reads text only",
    "return_mm_kwargs": "this model reads text only",
    "media_io_kwargs": "this model reads text only",
    "mm_processor_kwargs": "this model reads text only",
    "cache_salt": "there is no prefix cache to salt",
    "kv_transfer_params": "there is no disaggregated serving",
    "ec_transfer_params": "there is no disaggregated serving",
    "vllm_xargs": "there are no custom extensions",
    "thinking_token_budget": "this model does not reason in separate tokens",
    "reasoning_effort": "this model does not reason in separate tokens",
    "include_reasoning": "this model does not reason in separate tokens",
    "stream_interval": "every token is streamed as soon as its text is settled",
    "parallel_tool_calls": "this model cannot call tools",
    "store": "nothing is stored",
    "metadata": "nothing is stored",
    "service_tier": "there is one tier",
    "prompt_cache_key": "there is no prompt cache",
    "safety_identifier": "nothing is moderated",
    "verbosity": "this model has no verbosity control",
    "prediction": "predicted outputs only speed up generation",
    "guided_decoding_backend": "one backend (llguidance) serves every structured output",
}
_warned: set[str] = set()


def warn_ignored(request: BaseModel) -> None:
    """One warning per ignored field name for the life of the process."""
    for name in sorted(request.model_fields_set & IGNORED.keys() - _warned):
        _warned.add(name)
        log.warning("request field %r is accepted and ignored: %s", name, IGNORED[name])


class GenerationRequest(_Strict):
    """What completions and chat completions share: sampling, stopping, and vLLM's extensions."""

    model: str | None = None
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in -100..100")
    n: int | None = Field(1, ge=1)
    seed: int | None = Field(None, **INT64)
    stop: str | StopList | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema (structured output)")

    # vLLM's sampling parameters
    top_k: int | None = Field(None, ge=-1, description="vLLM: sample from the k most likely tokens (0 or -1 = off)")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM: drop tokens less likely than min_p x the most likely")
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="vLLM: > 1 discourages tokens of the prompt and output")
    stop_token_ids: list[TokenId] | None = Field(None, description="vLLM: token ids that end generation")
    include_stop_str_in_output: bool | None = Field(False, description="vLLM: keep the stop string (or stop token) in the text")
    ignore_eos: bool | None = Field(False, description="vLLM: keep generating after <|endoftext|>")
    min_tokens: int | None = Field(0, ge=0, description="vLLM: no EOS, stop token or stop string before this many tokens")
    skip_special_tokens: bool | None = Field(True, description="vLLM: False shows a generated <|endoftext|> in the text")
    truncate_prompt_tokens: int | None = Field(None, ge=-1, description="vLLM: keep only this many prompt tokens (-1: the context)")
    truncation_side: Literal["left", "right"] | None = Field(None, description="vLLM: which end truncate_prompt_tokens cuts (default left)")
    allowed_token_ids: TokenIds | None = Field(None, description="vLLM: sample only among these token ids")
    prompt_logprobs: int | None = Field(None, ge=0, description="vLLM: logprobs of each prompt token with this many alternatives")
    priority: int | None = Field(0, **INT64, description="vLLM: lower is admitted first when requests wait")
    request_id: str | None = Field(None, min_length=1, max_length=128, description="vLLM: the response id (after its prefix)")
    return_tokens_as_token_ids: bool | None = Field(None, description="vLLM: logprob tokens as 'token_id:N'")
    return_token_ids: bool | None = Field(None, description="vLLM: the prompt and generated token ids in each choice")

    # UNSUPPORTED unless left at their defaults (check_supported)
    use_beam_search: bool | None = False
    watermarking: bool | None = None
    bad_words: list[str] | None = None
    logprob_token_ids: list[TokenId] | None = None
    repetition_detection: dict[str, Any] | None = None

    # structured output (server/structured.py): response_format, or vLLM's structured_outputs, or its older guided_* names
    structured_outputs: StructuredOutputsParams | None = Field(None, description="vLLM: json, regex, choice, grammar or json_object")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's older structured_outputs.json")
    guided_regex: str | None = Field(None, description="vLLM's older structured_outputs.regex")
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = Field(None, description="vLLM's older structured_outputs.choice")
    guided_grammar: str | None = Field(None, description="vLLM's older structured_outputs.grammar")
    guided_whitespace_pattern: str | None = Field(None, description="vLLM's older structured_outputs.whitespace_pattern")
    guided_decoding_backend: str | None = None

    # IGNORED (see IGNORED)
    spaces_between_special_tokens: bool | None = True
    length_penalty: float | None = 1.0
    session_id: str | None = None
    return_weight_versions: bool | None = False
    routed_experts_prompt_start: int | None = Field(0, ge=0)
    return_token_offsets: bool | None = False
    mm_payload: str | None = None
    return_mm_kwargs: bool | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    thinking_token_budget: int | None = None
    stream_interval: int | None = Field(None, ge=1)

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_values(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias} for token {key}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
            if not all(isinstance(s, str) and s for s in value):
                raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        elif isinstance(value, str) and not value:
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        return value

    def check_supported(self) -> None:
        """Raise ParamError for a field that parses but asks for what this server cannot do."""
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed when stream is true")
        if self.prompt_logprobs is not None and self.stream:
            raise ParamError("prompt_logprobs", "prompt_logprobs are not available when stream is true (as in vLLM)")
        self.structure()  # its errors now, before any work
        unsupported = {
            "use_beam_search": (self.use_beam_search, "beam search is not supported"),
            "watermarking": (self.watermarking, "watermarking is not supported"),
            "bad_words": (self.bad_words, "bad_words is not supported"),
            "logprob_token_ids": (self.logprob_token_ids, "logprob_token_ids is not supported: use logprobs"),
            "repetition_detection": (self.repetition_detection, "repetition_detection is not supported: try repetition_penalty"),
        }
        for param, (value, message) in unsupported.items():
            if value:
                raise ParamError(param, message)

    def structure(self) -> StructureSpec | None:
        """What the output must be (response_format, structured_outputs or a guided_* field), or
        None for free text. ParamError when the fields ask for more than one thing or for nothing
        this server can enforce."""
        specs: list[StructureSpec] = []
        json_options = {"whitespace_pattern": self.guided_whitespace_pattern}
        rf = self.response_format
        if rf is not None and rf.type == "structural_tag":
            raise ParamError("response_format", "response_format 'structural_tag' is not supported: use json_schema")
        if rf is not None and rf.type == "json_object":
            specs.append(StructureSpec("json_object", "response_format", **json_options))
        if rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                message = "response_format of type json_schema needs json_schema.schema"
                raise ParamError("response_format", message, "missing_required_parameter")
            strict = rf.json_schema.strict is not False
            specs.append(StructureSpec("json_schema", "response_format", rf.json_schema.schema_, strict=strict, **json_options))
        so = self.structured_outputs
        if so is not None:
            if so.structural_tag is not None:
                raise ParamError("structured_outputs", "structured_outputs.structural_tag is not supported: use json")
            fields = (("json", so.json_), ("regex", so.regex), ("choice", so.choice), ("grammar", so.grammar))
            given = [(name, value) for name, value in fields if value is not None]
            if so.json_object:
                given.append(("json_object", True))
            if len(given) != 1:
                names = ", ".join(name for name, _ in given) or "none"
                message = f"structured_outputs needs exactly one of json, regex, choice, grammar, json_object (got {names})"
                raise ParamError("structured_outputs", message, "invalid_value")
            name, value = given[0]
            options = {
                "whitespace_pattern": so.whitespace_pattern or self.guided_whitespace_pattern,
                "compact": bool(so.disable_any_whitespace),
                "closed_objects": bool(so.disable_additional_properties),
            }
            kind = {"json": "json_schema"}.get(name, name)
            param = f"structured_outputs.{name}"
            specs.append(StructureSpec(kind, param, _json_schema(value, param) if kind == "json_schema" else value, **options))
        for field_name, kind in GUIDED_FIELDS.items():
            value = getattr(self, field_name)
            if value is not None:
                value = _json_schema(value, field_name) if kind == "json_schema" else value
                specs.append(StructureSpec(kind, field_name, value, **json_options))
        if len(specs) > 1:
            names = ", ".join(spec.param for spec in specs)
            raise ParamError(specs[1].param, f"only one structured output may be asked for, got {names}", "invalid_value")
        return specs[0] if specs else None

    # --- normalized views (defaults applied) ------------------------------------------------------
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}


class ParamError(ValueError):
    """A request that is well-formed but asks for something invalid here; names the parameter."""

    def __init__(self, param: str, message: str, code: str = "unsupported_parameter"):
        super().__init__(message)
        self.param = param
        self.code = code


def _json_schema(value: dict[str, Any] | str, param: str) -> dict[str, Any]:
    """A JSON Schema given as an object or as a string of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ParamError(param, f"{param} is not valid JSON: {exc}", "invalid_value") from None
    if not isinstance(value, dict):
        raise ParamError(param, f"{param} must be a JSON Schema object", "invalid_value")
    return value


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


# --- /v1/completions ----------------------------------------------------------------------------------
Prompt = str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, description="the chosen token's logprob and this many alternatives")
    best_of: int | None = Field(None, ge=1, description="sample this many per prompt, return the n with the highest logprob")
    suffix: str | None = Field(None, description="UNSUPPORTED: no fill-in-the-middle")
    add_special_tokens: bool | None = Field(True, description="vLLM: GPT-2's tokenizer adds none either way")
    prompt_embeds: str | list[str] | None = Field(None, description="UNSUPPORTED")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        ok = isinstance(value, str) or (
            isinstance(value, list)
            and len(value) > 0
            and (
                all(isinstance(v, str) for v in value)
                or all(_is_int(v) for v in value)
                or all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value)
            )
        )
        if not ok:
            raise ValueError(
                "prompt must be a string, a non-empty list of strings, a non-empty list of token ids, "
                "or a non-empty list of non-empty token-id lists"
            )
        return value

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise ParamError("suffix", "suffix is not supported: this model cannot insert text (no fill-in-the-middle)")
        if self.prompt_embeds:
            raise ParamError("prompt_embeds", "prompt_embeds is not supported: send text or token ids")
        if self.best_of is not None and self.best_of < (self.n or 1):
            raise ParamError("best_of", f"best_of ({self.best_of}) must be at least n ({self.n or 1})", "invalid_value")
        if (self.best_of or 1) > (self.n or 1) and self.stream:
            raise ParamError("best_of", "best_of greater than n cannot be streamed (the best are known only at the end)")

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of strings or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]  # one prompt given as token ids
        return p


# --- /v1/chat/completions ------------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in (None, "text"):
            raise ValueError(f"content parts of type {data.get('type')!r} are not supported: this model reads text only")
        return data


class ChatMessage(BaseModel):
    """One message. Keys besides role and content (name, tool_call_id, ...) go to the template as given."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Annotated[str, Field(min_length=1)]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        return {**self.model_dump(exclude={"content"}), "content": self.text()}


class ChatTemplateFields(_Strict):
    """How messages become a prompt (shared by chat completions and /tokenize)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool | None = Field(True, description="end with the assistant's turn label")
    continue_final_message: bool | None = Field(False, description="leave the last message open for the model to continue")
    add_special_tokens: bool | None = Field(False, description="GPT-2's tokenizer adds none either way")
    chat_template: str | None = Field(None, description="a Jinja template for this request (Hugging Face format)")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra variables for the template")
    documents: list[dict[str, str]] | None = Field(None, description="passed to the template as `documents`")
    tools: list[dict[str, Any]] | None = Field(None, description="UNSUPPORTED: this model cannot call tools")

    def check_template_fields(self) -> None:
        if self.add_generation_prompt is not False and self.continue_final_message and "add_generation_prompt" in self.model_fields_set:
            message = "continue_final_message and add_generation_prompt cannot both be true"
            raise ParamError("continue_final_message", message, "invalid_value")
        if self.tools:
            raise ParamError("tools", "tools are not supported: this model cannot call tools")


class ChatCompletionRequest(ChatTemplateFields, GenerationRequest):
    logprobs: bool | None = Field(False, description="the chosen tokens' logprobs")
    top_logprobs: int | None = Field(0, ge=0, description="this many alternatives per token (needs logprobs)")
    max_tokens: int | None = Field(None, ge=0, description="OpenAI's older name of max_completion_tokens; default: the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=0)
    echo: bool | None = Field(False, description="vLLM: prepend the last message's content when it is the assistant's")
    return_prompt_text: bool | None = Field(None, description="vLLM: the templated prompt in the response")
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = Field("none", description="UNSUPPORTED unless 'none'")
    functions: list[dict[str, Any]] | None = Field(None, description="UNSUPPORTED (OpenAI's deprecated tools)")
    function_call: str | dict[str, Any] | None = Field(None, description="UNSUPPORTED (OpenAI's deprecated tool_choice)")
    modalities: list[Literal["text", "audio"]] | None = Field(None, description="only ['text']")
    audio: dict[str, Any] | None = Field(None, description="UNSUPPORTED")
    web_search_options: dict[str, Any] | None = Field(None, description="UNSUPPORTED")

    # IGNORED (see IGNORED)
    reasoning_effort: str | None = None
    include_reasoning: bool | None = True
    parallel_tool_calls: bool | None = True
    media_io_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        self.check_template_fields()
        if self.tool_choice not in (None, "none"):
            raise ParamError("tool_choice", "tool_choice is not supported: this model cannot call tools")
        for param in ("functions", "function_call"):
            if getattr(self, param):
                raise ParamError(param, f"{param} is not supported: this model cannot call tools")
        if self.modalities and self.modalities != ["text"]:
            raise ParamError("modalities", "only text output is supported")
        for param in ("audio", "web_search_options"):
            if getattr(self, param):
                raise ParamError(param, f"{param} is not supported")
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs needs logprobs: true", "invalid_value")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- /tokenize, /detokenize ---------------------------------------------------------------------------
class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool | None = Field(True, description="GPT-2's tokenizer adds none either way")
    return_token_strs: bool | None = Field(False, description="also each token as a string")


class TokenizeChatRequest(ChatTemplateFields):
    model: str | None = None
    return_token_strs: bool | None = Field(False, description="also each token as a string")
    response_format: ResponseFormat | None = None
    media_io_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[TokenId]


# --- responses -----------------------------------------------------------------------------------
class _Response(BaseModel):
    """A response model whose vLLM-only fields are left out while null (OpenAI's always appear)."""

    omit_when_null: ClassVar[frozenset[str]] = frozenset({"prompt_logprobs", "prompt_token_ids", "token_ids", "prompt_text"})

    @model_serializer(mode="wrap")
    def _omit_nulls(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None or key not in self.omit_when_null}


class Logprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob: one entry of a prompt position's {token_id: ...} map."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class CompletionChoice(_Response):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = Field(None, description="vLLM: the stop string or stop token id that ended the text (null for EOS)")
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens whose keys and values came from the prefix cache (not prefilled)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Only with the prefix cache on (absent, not null, with --no-prefix-cache)
    prompt_tokens_details: PromptTokensDetails | None = Field(None, exclude_if=lambda v: v is None)

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> Usage:
        details = None if cached_tokens is None else PromptTokensDetails(cached_tokens=cached_tokens)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=details,
        )


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class CompletionChunkChoice(_Response):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (the usage chunk has `choices: []`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobContent(ChatLogprob):
    top_logprobs: list[ChatLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobContent] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None


class DeltaMessage(_Response):
    """What a chunk adds to the message: the role in a choice's first chunk, then content."""

    omit_when_null: ClassVar[frozenset[str]] = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None
    prompt_text: str | None = None


class ModelPermission(BaseModel):
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanogpt-mlx"
    root: str | None = Field(None, description="the checkpoint directory")
    parent: str | None = None
    max_model_len: int
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """The tokenizer's configuration, as tokenizer_config.json holds it (vLLM's /tokenizer_info)."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class APIError(Exception):
    """An error to answer in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorBody(message=message, type=type, param=param, code=code))
        self.headers = headers or {}
