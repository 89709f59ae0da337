"""`POST /v1/chat/completions`: messages -> a prompt through a chat template, then the same planner,
engine and sampling as completions; answers in the chat shape (JSON or `chat.completion.chunk`s).

Chat templates are Jinja in the Hugging Face format (`messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, ...), rendered in a sandbox the way `transformers` renders them. The
server's template is, first found:

1. `--chat-template FILE` (or the template itself, inline);
2. the checkpoint's own: `chat_template` in its tokenizer_config.json, or chat_template.jinja;
3. `DEFAULT_CHAT_TEMPLATE`: a base model has no chat format, so messages become a plain
   transcript with role labels ("User: ...", "Assistant: ..."), and generation stops at the next
   role label (`DEFAULT_CHAT_STOP`) as well as at <|endoftext|>.

A request may bring its own `chat_template` when the server trusts its clients with it
(`--trust-request-chat-template`, as in vLLM; a template is a program, and the sandbox bounds
neither its time nor its output); it stops at <|endoftext|> only.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nanogpt_mlx.model.tokenizer import EOT_ID, EOT_TOKEN
from nanogpt_mlx.server.completions import CachedTokens, Plan, Planner, TokenTexts, best_choices, generation_failed
from nanogpt_mlx.server.engine import SequenceOutput, Submission
from nanogpt_mlx.server.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatLogprobContent,
    ChatLogprobs,
    ChatTemplateFields,
    DeltaMessage,
    Usage,
)

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ 'System' if message['role'] == 'developer' else message['role'] | capitalize }}: {{ message['content'] }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
DEFAULT_CHAT_STOP = ("\nUser:", "\nAssistant:", "\nSystem:")


class ChatTemplateError(ValueError):
    """A template that does not compile or render; the message says why."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # As transformers defines it: Jinja's own tojson escapes HTML characters, which templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template, the stop strings that go with it, and where it came from."""

    _env = _environment()

    def __init__(self, source: str, stop: tuple[str, ...] = (), origin: str = "request"):
        try:
            self.template = self._env.from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"the chat template ({origin}) does not compile: {exc}") from None
        self.source = source
        self.stop = stop
        self.origin = origin

    def render(self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False, **kwargs) -> str:
        """The prompt for `messages`; with continue_final_message the text ends where the last
        message's content ends, so the model continues it (as transformers does it)."""
        try:
            text = self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                bos_token=EOT_TOKEN,
                eos_token=EOT_TOKEN,
                **kwargs,
            )
        except Exception as exc:  # raise_exception(), a bad lookup, 1 / 0, a recursion...: the messages do not fit it
            raise ChatTemplateError(f"the chat template ({self.origin}) failed on these messages: {type(exc).__name__}: {exc}") from None
        if continue_final_message:
            final = (messages[-1].get("content") or "").strip()
            if not final or final not in text:
                raise ChatTemplateError("continue_final_message: the last message's content does not appear in the templated prompt")
            text = text[: text.rindex(final) + len(final)]
        return text


def load_chat_template(option: str | None, model_dir: Path) -> ChatTemplate:
    """The server's template: --chat-template (a file or the template inline), else the
    checkpoint's, else the plain default. Raises ChatTemplateError for a bad one."""
    if option:
        path = Path(option).expanduser()
        if path.is_file():
            return ChatTemplate(path.read_text(encoding="utf-8"), origin=str(path))
        if "{{" in option or "{%" in option:
            return ChatTemplate(option, origin="--chat-template")
        raise ChatTemplateError(f"--chat-template {option}: no such file (nor an inline Jinja template)")
    own = checkpoint_chat_template(model_dir)
    if own is not None:
        return ChatTemplate(own[0], origin=own[1])
    return ChatTemplate(DEFAULT_CHAT_TEMPLATE, DEFAULT_CHAT_STOP, origin="default")


def checkpoint_chat_template(model_dir: Path) -> tuple[str, str] | None:
    """(template, origin) from chat_template.jinja or tokenizer_config.json, as transformers reads them."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    config_file = model_dir / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    try:
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ChatTemplateError(f"{config_file} is not a JSON object: {exc}") from None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template, str(config_file)) if isinstance(template, str) and template else None


def render_messages(req: ChatTemplateFields, default: ChatTemplate, trust_request_template: bool = False) -> tuple[str, ChatTemplate]:
    """The templated prompt of a chat or tokenize request, and the template used."""
    template = default
    if req.chat_template:
        if not trust_request_template:
            message = "a request's own chat_template is refused: the server was not started with --trust-request-chat-template"
            raise APIError(400, message, param="chat_template", code="unsupported_parameter")
        try:
            template = ChatTemplate(req.chat_template)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="chat_template", code="invalid_value") from None
    messages = [m.for_template() for m in req.messages]
    kwargs = dict(req.chat_template_kwargs or {})
    if req.documents is not None:
        kwargs["documents"] = req.documents
    kwargs.pop("messages", None)
    add_generation_prompt = kwargs.pop("add_generation_prompt", req.add_generation_prompt is not False)
    try:
        text = template.render(messages, add_generation_prompt, bool(req.continue_final_message), **kwargs)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), param="messages", code="invalid_value") from None
    return text, template


class ChatCompletions:
    def __init__(self, planner: Planner, token_texts: TokenTexts, template: ChatTemplate, trust_request_template: bool = False):
        self.planner = planner
        self.texts = token_texts
        self.template = template
        self.trust_request_template = trust_request_template

    def plan(self, req: ChatCompletionRequest) -> Plan:
        self.planner.check_supported(req)
        text, template = render_messages(req, self.template, self.trust_request_template)
        tokens = self.planner.encode(text) or [EOT_ID]
        return self.planner.plan(
            req,
            [tokens],
            [text],
            max_tokens=req.requested_max_tokens(),
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            extra_stop=template.stop,
            logprobs_param="top_logprobs",
            max_tokens_param="max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
        )

    async def respond(self, plan: Plan, submission: Submission, response_id: str, model: str) -> ChatCompletionResponse:
        renders = [_ChatChoiceRender(self.texts, plan, i) for i in range(len(plan.sequences))]
        completion_tokens = 0
        cached = CachedTokens(plan)
        async for index, output in submission:
            if output.finish_reason == "error":
                submission.cancel()
                raise generation_failed(output)
            renders[index].add(output)
            completion_tokens += output.completion_tokens
            cached.add(index, output)
        req = plan.request
        return ChatCompletionResponse(
            id=response_id,
            created=int(time.time()),
            model=model,
            choices=[render.whole(index) for index, render in enumerate(best_choices(plan, renders))],
            usage=Usage.of(plan.prompt_tokens, completion_tokens, cached.total),
            prompt_logprobs=renders[0].prompt_logprobs,
            prompt_token_ids=plan.prompts[0] if req.return_token_ids else None,
            prompt_text=plan.prompt_texts[0] if req.return_prompt_text else None,
        )

    async def stream(self, plan: Plan, submission: Submission, response_id: str, model: str) -> AsyncIterator[str]:
        """`chat.completion.chunk` payloads: the role first, content as it comes, one final chunk
        per choice with its finish_reason, usage, [DONE]."""
        req = plan.request
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
        created = int(time.time())
        renders = [_ChatChoiceRender(self.texts, plan, i) for i in range(len(plan.sequences))]

        def chunk(choice: ChatChunkChoice, render: _ChatChoiceRender, **extra) -> str:
            c = ChatCompletionChunk(id=response_id, created=created, model=model, choices=[choice], **extra)
            if continuous:
                c.usage = render.usage()
            return c.model_dump_json(exclude=None if continuous else {"usage"})

        completion_tokens = 0
        cached = CachedTokens(plan)
        try:
            for i, render in enumerate(renders):
                first = ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                extra = {}
                if i == 0 and req.return_token_ids:
                    extra["prompt_token_ids"] = plan.prompts[0]
                if i == 0 and req.return_prompt_text:
                    extra["prompt_text"] = plan.prompt_texts[0]
                yield chunk(first, render, **extra)
            async for index, output in submission:
                if output.finish_reason == "error":
                    yield generation_failed(output).body.model_dump_json()
                    yield "[DONE]"
                    return
                completion_tokens += output.completion_tokens
                cached.add(index, output)
                render = renders[index]
                piece = render.delta(output)
                if piece is not None:
                    yield chunk(piece, render)
            if include_usage:
                usage = Usage.of(plan.prompt_tokens, completion_tokens, cached.total)
                yield ChatCompletionChunk(id=response_id, created=created, model=model, choices=[], usage=usage).model_dump_json()
            yield "[DONE]"
        finally:
            submission.cancel()  # no-op once finished; frees the slots when the client went away


class _ChatChoiceRender:
    """One sequence as an assistant message, with chat-shaped logprobs."""

    def __init__(self, texts: TokenTexts, plan: Plan, index: int):
        self.texts = texts
        self.index = index
        req: ChatCompletionRequest = plan.request
        self.prompt = plan.prompts[0]
        last = req.messages[-1]
        self.echo_text = last.text() if req.echo and last.role == "assistant" else None
        self.logprobs_k = plan.logprobs
        self.prompt_logprobs_k = plan.prompt_logprobs
        self.as_ids = bool(req.return_tokens_as_token_ids)
        self.return_token_ids = bool(req.return_token_ids)
        self.parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[ChatLogprobContent] | None = [] if self.logprobs_k is not None else None
        self.prompt_logprobs: list | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self._started = False

    def add(self, output: SequenceOutput) -> tuple[str, list[ChatLogprobContent] | None]:
        text = output.text
        if not self._started:
            self._started = True
            if self.echo_text is not None:
                text = self.echo_text + text
            if output.prompt_logprobs is not None and self.prompt_logprobs_k is not None:
                self.prompt_logprobs = self.texts.prompt_logprobs(output.prompt_logprobs, self.prompt_logprobs_k)
        added = None
        if output.logprobs:
            self.cumulative_logprob += sum(e.logprob for e in output.logprobs)
            if self.logprobs is not None:
                k = self.logprobs_k or 0
                added = [
                    ChatLogprobContent(
                        **self._logprob(e.token, e.logprob).model_dump(),
                        top_logprobs=[self._logprob(t, lp) for t, lp in e.top[:k]],
                    )
                    for e in output.logprobs
                ]
                self.logprobs += added
        self.parts.append(text)
        self.token_ids += output.token_ids
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason
            self.stop_reason = output.stop_reason
        return text, added

    def _logprob(self, token: int, logprob: float) -> ChatLogprob:
        return ChatLogprob(token=self.texts.text(token, self.as_ids), logprob=logprob, bytes=self.texts.bytes(token))

    def delta(self, output: SequenceOutput) -> ChatChunkChoice | None:
        text, added = self.add(output)
        if not text and not added and output.finish_reason is None:
            return None
        return ChatChunkChoice(
            index=self.index,
            delta=DeltaMessage(content=text),
            logprobs=ChatLogprobs(content=added) if added is not None else None,
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason if output.finish_reason else None,
            token_ids=output.token_ids if self.return_token_ids else None,
        )

    def usage(self) -> Usage:
        return Usage.of(len(self.prompt), len(self.token_ids))

    def whole(self, index: int) -> ChatChoice:
        return ChatChoice(
            index=index,
            message=AssistantMessage(content="".join(self.parts)),
            logprobs=ChatLogprobs(content=self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            token_ids=self.token_ids if self.return_token_ids else None,
        )
