"""Server settings: one pydantic-settings model, read from flags, then `NANOGPT_MLX_*` env vars.

Every field is both a `nanogpt-mlx serve` flag (`max_batch` -> `--max-batch`) and an environment
variable (`NANOGPT_MLX_MAX_BATCH`); a flag given on the command line wins over the variable, the
variable over the default. `add_arguments` builds the flags from the fields, so the two can
never drift apart.
"""

from __future__ import annotations

import argparse
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "NANOGPT_MLX_"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="checkpoint directory (HF GPT-2 format); without it, the bundled checkpoint")
    served_model_name: Annotated[list[str], NoDecode] = Field(
        ["nanogpt-mlx"],
        min_length=1,
        description="the model ids clients may pass as `model` (several: space-separated); a request naming none gets the first",
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port)")
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description="where MLX runs")
    max_batch: int = Field(32, ge=1, le=1024, description="sequences decoded together (KV-cache slots)")
    max_queue: int = Field(256, ge=1, description="sequences allowed to wait for a slot; beyond that: 503")
    # The engine prefills a step's chunk in forwards of <= 1024 tokens (their rows split over the
    # CPU streams), sending first tokens after each. 32 lockstep clients of 41-token prompts,
    # in-process, 3 alternating rounds (AVX2 machine, 512-token forwards then): TTFT p95 median
    # 922 ms at 512, 831 at 1024, 730 at 2048; 1024 keeps the longest stall of the running
    # sequences at ~0.5 s here.
    prefill_chunk: int = Field(
        1024, ge=1, description="prompt tokens prefilled between two decode steps (batched), so prompts never stall decoding for long"
    )
    prefix_cache: bool = Field(
        True, description="automatic prefix caching: keep finished sequences' keys and values and reuse the longest cached prefix "
        "of a new prompt (--no-prefix-cache: every prompt is prefilled in full)"
    )
    # A row holds one sequence (up to the context) in every layer: with the bundled 8-layer,
    # 384-wide model, 512 positions x 8 layers x 2 x 384 float32 = 12.6 MB a row, 32 rows ~400 MB.
    prefix_cache_rows: int = Field(
        32, ge=1, le=4096, description="KV-cache rows kept for cached prefixes beyond --max-batch, each one sequence of up to the "
        "context; least recently used evicted"
    )
    api_key: str | None = Field(None, description="require `Authorization: Bearer KEY` on /v1 and /tokenize routes")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="largest accepted request body (413 beyond)")
    max_n: int = Field(16, ge=1, description="largest `n` (choices per prompt) or `best_of` a request may ask for")
    max_logprobs: int = Field(20, ge=0, description="largest `logprobs` / `top_logprobs` / `prompt_logprobs` a request may ask for")
    chat_template: str | None = Field(
        None, description="chat template for /v1/chat/completions: a Jinja file (Hugging Face format) or the template inline; "
        "default: the checkpoint's own, else a plain 'User: / Assistant:' transcript"
    )
    trust_request_chat_template: bool = Field(
        False, description="accept a request's own `chat_template` (as vLLM's flag): a template is a program, and one sent by a "
        "client can keep the server busy for minutes or fill its memory; off: such requests get a 400"
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="on SIGTERM, seconds to let in-flight requests finish before ending them"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="log verbosity")
    metrics: bool = Field(True, description="serve Prometheus metrics on /metrics (--no-metrics: no /metrics, nothing observed)")
    access_log: Literal["text", "json", "off"] = Field(
        "text", description="one line per request on logger nanogpt_mlx.access: key=value text, JSON lines, or none"
    )
    log_prompts: bool = Field(False, description="include the prompt text in access log lines (off: prompts are never logged)")

    @field_validator("served_model_name", mode="before")
    @classmethod
    def _names(cls, value):
        if isinstance(value, str):  # from the environment: "a b" or "a,b"
            value = value.replace(",", " ").split()
        return value


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field; unset flags stay absent so env vars and defaults apply."""
    for name, info in ServerSettings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS}
        annotation = info.annotation
        choices = getattr(annotation, "__args__", None) if getattr(annotation, "__origin__", None) is Literal else None
        if choices:
            kwargs["choices"] = list(choices)
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction  # --metrics / --no-metrics
        elif annotation in (int, float):
            kwargs["type"] = annotation
        elif getattr(annotation, "__origin__", None) is list:
            kwargs["nargs"] = "+"  # --served-model-name a b
        default = "" if info.default is None else f"default: {info.default}; "
        kwargs["help"] = f"{info.description} ({default}env {env})"
        parser.add_argument(flag_name(name), **kwargs)


def from_arguments(args: argparse.Namespace) -> ServerSettings:
    """Settings from parsed flags (only those given) on top of the environment.

    Raises ValueError with one line per bad setting, naming the flag.
    """
    given = {name: getattr(args, name) for name in ServerSettings.model_fields if hasattr(args, name)}
    try:
        return ServerSettings(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            lines.append(f"{flag_name(field)} / {ENV_PREFIX}{field.upper()}: {err['msg']}")
        raise ValueError("; ".join(lines)) from None
