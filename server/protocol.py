"""Wire format: OpenAI's legacy completions API (requests, responses, stream chunks, errors).

Field names, types and defaults follow https://platform.openai.com/docs/api-reference/completions.
Extensions: `top_k` and `ignore_eos` (as in vLLM). Unknown fields and parameters this model cannot
honour are rejected with a 400 naming them, never silently ignored.

Validation is strict (no "1" for 1, no NaN), so a client's mistake surfaces as a clear 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4
MAX_LOGPROBS = 5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# --- requests ---------------------------------------------------------------------------------
class StreamOptions(_Strict):
    include_usage: bool = False


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Strict):
    model: str | None = None
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="extension: sample from the k most likely tokens (0 or -1 = off)")
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = Field(False, description="extension: keep generating after <|endoftext|>")
    # Accepted only with values that change nothing; anything else is a clear 400 (see below).
    suffix: str | None = None
    best_of: int | None = None

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

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_shape(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(value)}")
            if not all(isinstance(s, str) and s for s in value):
                raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_values(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.strip().lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias} for token {key}")
        return value

    def check_supported(self) -> None:
        """Raise ParamError for parameters that parse but that this server cannot honour."""
        if self.suffix:
            raise ParamError("suffix", "suffix is not supported: this model cannot insert text (no fill-in-the-middle)")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ParamError("best_of", "best_of other than n is not supported (no server-side ranking of choices)")
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "stream_options is only allowed when stream is true")

    # --- normalized views (defaults applied) ------------------------------------------------------
    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt as a list of strings or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]  # one prompt given as token ids
        return p

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def token_bias(self) -> dict[int, float]:
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class ParamError(ValueError):
    """A request that is well-formed but asks for something invalid here; names the parameter."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# --- responses -----------------------------------------------------------------------------------
class Logprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanogpt-mlx"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class CompletionChunkChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: str | None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (the usage chunk has `choices: []`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


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
