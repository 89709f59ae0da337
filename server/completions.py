"""From a validated request to engine sequences (`Planner`), and `POST /v1/completions`'s answers.

`Planner.plan()` checks a completions or chat request against the model (context length, token
ids, server limits), truncates prompts when asked, and turns each prompt x n (or best_of) into
one `SequenceRequest` with its `SamplingParams`; chat completions (chat.py) use it too, so both
routes share every parameter's meaning. `Completions.respond()` gathers a submission's outputs
into one `CompletionResponse` (keeping the n best of best_of); `stream()` turns them into
server-sent events as they come. Both render the same outputs the same way, so the concatenated
stream text equals the non-streamed text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nanogpt_mlx.model.sampling import SamplingParams
from nanogpt_mlx.model.tokenizer import EOT_ID, EOT_TOKEN, token_to_text
from nanogpt_mlx.server.engine import SequenceOutput, SequenceRequest, Submission, TokenLogprob
from nanogpt_mlx.server.protocol import (
    APIError,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    GenerationRequest,
    Logprobs,
    ParamError,
    PromptLogprob,
    Usage,
    warn_ignored,
)
from nanogpt_mlx.server.structured import Grammar, StructuredOutputs, StructureError


@dataclass
class Plan:
    """A request turned into sequences: prompt i's samples are sequences i*per_prompt ... (i+1)*per_prompt-1."""

    request: GenerationRequest
    prompts: list[list[int]]
    prompt_texts: list[str]  # what echo returns for each prompt
    sequences: list[SequenceRequest]
    n: int  # choices returned per prompt
    per_prompt: int  # sequences sampled per prompt (best_of >= n)
    logprobs: int | None  # alternatives per generated token the client sees (None: no logprobs)
    prompt_logprobs: int | None  # vLLM's prompt_logprobs
    echo_logprobs: int | None  # completions' echo + logprobs: the prompt's logprobs in `logprobs`

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)  # each prompt once, however many choices it has

    def prompt_of(self, sequence: int) -> int:
        return sequence // self.per_prompt


class Planner:
    """Checks and limits that do not depend on the route, and the sequences they make."""

    def __init__(self, tokenizer, max_len: int, vocab_size: int, max_n: int, max_logprobs: int, max_sequences: int):
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.max_n = max_n
        self.max_logprobs = max_logprobs
        self.max_sequences = max_sequences
        self.structured = StructuredOutputs(tokenizer, vocab_size)

    def encode(self, text: str) -> list[int]:
        # GPT-2's tokenizer adds no special tokens (add_special_tokens changes nothing, as in
        # transformers); "<|endoftext|>" written in the text is the special token.
        return self.tokenizer.encode(text, allowed_special={EOT_TOKEN})

    def check_token_ids(self, ids, param: str, what: str = "token id") -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid(param, f"{what} {bad[0]} is out of range: this model's vocabulary is 0..{self.vocab_size - 1}")

    def check_supported(self, req: GenerationRequest) -> None:
        try:
            req.check_supported()
        except ParamError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
        warn_ignored(req)

    def plan(
        self,
        req: GenerationRequest,
        prompts: list[list[int]],
        prompt_texts: list[str],
        *,
        max_tokens: int | None,
        logprobs: int | None,
        echo_logprobs: int | None = None,
        best_of: int | None = None,
        extra_stop: tuple[str, ...] = (),
        logprobs_param: str = "logprobs",
        max_tokens_param: str = "max_tokens",
    ) -> Plan:
        """Sequences for `prompts` (token ids); max_tokens None: the rest of the context."""
        n = req.n or 1
        per_prompt = best_of or n
        if n > self.max_n:
            raise invalid("n", f"n must be at most {self.max_n} on this server, got {n}")
        if per_prompt > self.max_n:
            raise invalid("best_of", f"best_of must be at most {self.max_n} on this server, got {per_prompt}")
        for param, value in ((logprobs_param, logprobs), ("prompt_logprobs", req.prompt_logprobs)):
            if value is not None and value > self.max_logprobs:
                raise invalid(param, f"{param} must be at most {self.max_logprobs} on this server, got {value}")
        if len(prompts) * per_prompt > self.max_sequences:
            raise APIError(
                400,
                f"{len(prompts)} prompt(s) x {per_prompt} samples asks for {len(prompts) * per_prompt} sequences; "
                f"this server queues at most {self.max_sequences} per request",
                param="n" if per_prompt > 1 else "prompt",
                code="invalid_value",
            )
        bias = req.token_bias()
        self.check_token_ids(bias, "logit_bias", "logit_bias token id")
        self.check_token_ids(req.stop_token_ids or [], "stop_token_ids")
        self.check_token_ids(req.allowed_token_ids or [], "allowed_token_ids")
        for tokens in prompts:
            self.check_token_ids(tokens, "prompt")
        prompts = [self._truncate(tokens, req) for tokens in prompts]

        limits = []
        for tokens in prompts:
            limit = self.max_len - len(tokens) if max_tokens is None else max_tokens
            if max_tokens is None and limit < 1:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.max_len} tokens, however your prompt has {len(tokens)} tokens, "
                    "which leaves no room for the completion. Please reduce your prompt.",
                    param="messages" if hasattr(req, "messages") else "prompt",
                    code="context_length_exceeded",
                )
            if len(tokens) + limit > self.max_len:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.max_len} tokens, however you requested "
                    f"{len(tokens) + limit} tokens ({len(tokens)} in your prompt; {limit} for the completion). "
                    "Please reduce your prompt; or completion length.",
                    param="prompt" if len(tokens) > self.max_len else max_tokens_param,
                    code="context_length_exceeded",
                )
            limits.append(limit)
        structure = self.compile_structure(req)
        min_tokens = req.min_tokens or 0
        if max_tokens is not None and min_tokens > max_tokens:
            raise invalid("min_tokens", f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")

        stop_ids = frozenset(req.stop_token_ids or ())
        ends_generation = tuple(sorted(stop_ids | (set() if req.ignore_eos else {EOT_ID})))
        allowed = tuple(sorted(set(req.allowed_token_ids))) if req.allowed_token_ids else None
        if allowed is not None and min_tokens and set(allowed) <= set(ends_generation):
            raise invalid("allowed_token_ids", "allowed_token_ids leaves nothing to generate before min_tokens")
        # best_of ranks the samples by their cumulative logprob, which the engine reports with logprobs.
        engine_logprobs = logprobs if logprobs is not None else 0 if per_prompt > n else None
        wanted_prompt_logprobs = [k for k in (echo_logprobs, req.prompt_logprobs) if k is not None]
        top_k = req.top_k if req.top_k and req.top_k > 0 else 0
        stop = req.stop_strings() + list(extra_stop)
        penalty = 1.0 if req.repetition_penalty is None else req.repetition_penalty

        sequences = []
        for tokens, limit in zip(prompts, limits):
            for j in range(per_prompt):
                params = SamplingParams(
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=top_k,
                    presence_penalty=req.presence_penalty or 0.0,
                    frequency_penalty=req.frequency_penalty or 0.0,
                    logit_bias=bias,
                    seed=req.seed,
                    logprobs=engine_logprobs,
                    min_p=req.min_p or 0.0,
                    repetition_penalty=penalty,
                    prompt_token_ids=tuple(tokens) if penalty != 1.0 else (),
                    allowed_token_ids=allowed,
                    min_tokens=min_tokens,
                    stop_token_ids=ends_generation,
                )
                sequences.append(
                    SequenceRequest(
                        prompt=tokens,
                        max_tokens=limit,
                        params=params,
                        stop=stop,
                        ignore_eos=bool(req.ignore_eos),
                        prompt_logprobs=max(wanted_prompt_logprobs) if wanted_prompt_logprobs else None,
                        choice=j,
                        stop_token_ids=stop_ids,
                        include_stop_str_in_output=bool(req.include_stop_str_in_output),
                        skip_special_tokens=req.skip_special_tokens is not False,
                        min_tokens=min_tokens,
                        priority=req.priority or 0,
                        structure=structure,
                    )
                )
        return Plan(req, prompts, prompt_texts, sequences, n, per_prompt, logprobs, req.prompt_logprobs, echo_logprobs)

    def compile_structure(self, req: GenerationRequest) -> Grammar | None:
        """The request's structured output, compiled once for all its sequences (None: free text)."""
        try:
            spec = req.structure()
            return None if spec is None else self.structured.compile(spec)
        except ParamError as exc:
            raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
        except StructureError as exc:
            raise invalid(exc.param, str(exc)) from None

    def _truncate(self, tokens: list[int], req: GenerationRequest) -> list[int]:
        """vLLM's truncate_prompt_tokens: keep the last k tokens (first k with truncation_side right)."""
        k = req.truncate_prompt_tokens
        if k is None:
            return tokens
        if k == -1:
            k = self.max_len
        if k > self.max_len:
            raise invalid("truncate_prompt_tokens", f"truncate_prompt_tokens ({k}) must not exceed the context ({self.max_len})")
        if k == 0 or len(tokens) <= k:
            return tokens
        return tokens[:k] if req.truncation_side == "right" else tokens[-k:]


class TokenTexts:
    """Tokens as the API shows them: text, `bytes:\\xNN` for partial UTF-8, or vLLM's `token_id:N`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def text(self, token: int, as_id: bool = False) -> str:
        if as_id:
            return f"token_id:{token}"
        text = self._texts.get(token)
        if text is None:  # the one rule shared with the distillation client (model/tokenizer.py)
            text = self._texts[token] = token_to_text(self.tokenizer, token)
        return text

    def bytes(self, token: int) -> list[int]:
        return list(self.tokenizer.decode_single_token_bytes(token))

    def prompt_logprobs(self, entries: list[TokenLogprob], k: int) -> list[dict[str, PromptLogprob] | None]:
        """vLLM's prompt_logprobs: None for the first token, then {token_id: {logprob, rank, decoded_token}}."""
        out: list[dict[str, PromptLogprob] | None] = []
        for e in entries:
            if e.logprob is None:
                out.append(None)
                continue
            position = {str(t): PromptLogprob(logprob=lp, rank=r, decoded_token=self.text(t)) for r, (t, lp) in enumerate(e.top[:k], 1)}
            position.setdefault(str(e.token), PromptLogprob(logprob=e.logprob, rank=e.rank, decoded_token=self.text(e.token)))
            out.append(position)
        return out


class Completions:
    def __init__(self, planner: Planner, token_texts: TokenTexts):
        self.planner = planner
        self.texts = token_texts

    # --- request -> sequences ---------------------------------------------------------------------
    def plan(self, req: CompletionRequest) -> Plan:
        self.planner.check_supported(req)
        prompts, texts = [], []
        for p in req.prompts():
            if isinstance(p, str):
                tokens, text = self.planner.encode(p), p
            else:
                self.planner.check_token_ids(p, "prompt")
                tokens, text = list(p), self.planner.tokenizer.decode(p)
            prompts.append(tokens or [EOT_ID])  # like OpenAI: an empty prompt is conditioned on <|endoftext|>
            texts.append(text)
        return self.planner.plan(
            req,
            prompts,
            texts,
            max_tokens=16 if req.max_tokens is None else req.max_tokens,
            logprobs=req.logprobs,
            echo_logprobs=req.logprobs if req.echo else None,
            best_of=req.best_of,
        )

    # --- outputs -> JSON ------------------------------------------------------------------------------
    async def respond(self, plan: Plan, submission: Submission, response_id: str, model: str) -> CompletionResponse:
        """Wait for every sequence to finish; one response with the n best choices per prompt."""
        renders = [_ChoiceRender(self.texts, plan, i) for i in range(len(plan.sequences))]
        completion_tokens = 0
        cached = CachedTokens(plan)
        async for index, output in submission:
            if output.finish_reason == "error":
                submission.cancel()
                raise generation_failed(output)
            renders[index].add(output)
            completion_tokens += output.completion_tokens
            cached.add(index, output)
        return CompletionResponse(
            id=response_id,
            created=int(time.time()),
            model=model,
            choices=[render.whole(index) for index, render in enumerate(best_choices(plan, renders))],
            usage=Usage.of(plan.prompt_tokens, completion_tokens, cached.total),
        )

    async def stream(self, plan: Plan, submission: Submission, response_id: str, model: str) -> AsyncIterator[str]:
        """Server-sent event payloads: text chunks, one final chunk per choice, usage, [DONE]."""
        req = plan.request
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = include_usage and bool(req.stream_options.continuous_usage_stats)
        created = int(time.time())
        renders = [_ChoiceRender(self.texts, plan, i) for i in range(len(plan.sequences))]
        completion_tokens = 0
        cached = CachedTokens(plan)
        try:
            async for index, output in submission:
                if output.finish_reason == "error":
                    yield generation_failed(output).body.model_dump_json()
                    yield "[DONE]"
                    return
                completion_tokens += output.completion_tokens
                cached.add(index, output)
                render = renders[index]
                piece = render.delta(output)
                if piece is None:
                    continue
                chunk = CompletionChunk(id=response_id, created=created, model=model, choices=[piece])
                if continuous:
                    chunk.usage = render.usage()
                yield chunk.model_dump_json(exclude=None if continuous else {"usage"})
            if include_usage:
                usage = Usage.of(plan.prompt_tokens, completion_tokens, cached.total)
                yield CompletionChunk(id=response_id, created=created, model=model, choices=[], usage=usage).model_dump_json()
            yield "[DONE]"
        finally:
            submission.cancel()  # no-op once finished; frees the slots when the client went away


def generation_failed(output: SequenceOutput) -> APIError:
    """The error a request gets when the engine ended one of its sequences with an error: the
    body of a 500, or, in a stream, an event followed by `[DONE]` (as vLLM does) so clients that
    read to the end of the stream stop cleanly."""
    return APIError(500, f"generation failed: {output.error}", type="server_error", code="engine_error")


class CachedTokens:
    """A request's `usage.prompt_tokens_details.cached_tokens`: as `prompt_tokens` counts each prompt
    once whatever `n`, the prefix-cache hit of each prompt's first sample (the others copy the
    prompt that one prefilled). None while the engine reports none (prefix caching off)."""

    def __init__(self, plan: Plan):
        self.per_prompt = plan.per_prompt
        self.total: int | None = None

    def add(self, index: int, output: SequenceOutput) -> None:
        if output.finish_reason is not None and output.cached_tokens is not None and index % self.per_prompt == 0:
            self.total = (self.total or 0) + output.cached_tokens


def best_choices(plan: Plan, renders: list):
    """Per prompt, the n samples of best_of with the highest cumulative logprob (all of them when
    best_of is n), in order of prompt then rank."""
    if plan.per_prompt == plan.n:
        return renders
    chosen = []
    for i in range(0, len(renders), plan.per_prompt):
        group = renders[i : i + plan.per_prompt]
        chosen += sorted(group, key=lambda r: r.cumulative_logprob, reverse=True)[: plan.n]
    return chosen


def invalid(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def response_id(prefix: str, base: str | None) -> str:
    return f"{prefix}-{base or uuid.uuid4().hex}"


class _ChoiceRender:
    """One sequence's text, token ids and logprobs, built up output by output."""

    def __init__(self, texts: TokenTexts, plan: Plan, index: int):
        self.texts = texts
        self.index = index
        req = plan.request
        self.prompt = plan.prompts[plan.prompt_of(index)]
        self.echo_text = plan.prompt_texts[plan.prompt_of(index)] if getattr(req, "echo", False) else None
        self.logprobs_k = plan.logprobs
        self.echo_logprobs_k = plan.echo_logprobs
        self.prompt_logprobs_k = plan.prompt_logprobs
        self.as_ids = bool(req.return_tokens_as_token_ids)
        self.return_token_ids = bool(req.return_token_ids)
        self.skip_special = req.skip_special_tokens is not False
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs = Logprobs() if self.logprobs_k is not None else None
        self.prompt_logprobs: list | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.cumulative_logprob = 0.0
        self._bytes = bytearray()  # everything the text_offsets count over
        self._started = False

    def add(self, output: SequenceOutput) -> tuple[str, Logprobs | None, list[int]]:
        """Record an output; return the text, logprobs and token ids it adds to this choice."""
        text = output.text
        entries: list[TokenLogprob] = []
        if not self._started:
            self._started = True
            if self.echo_text is not None:
                text = self.echo_text + text
                if output.prompt_logprobs is not None and self.echo_logprobs_k is not None:
                    entries.extend(output.prompt_logprobs)
            if output.prompt_logprobs is not None and self.prompt_logprobs_k is not None:
                self.prompt_logprobs = self.texts.prompt_logprobs(output.prompt_logprobs, self.prompt_logprobs_k)
        if output.logprobs:
            entries.extend(output.logprobs)
            self.cumulative_logprob += sum(e.logprob for e in output.logprobs)
        self.text_parts.append(text)
        self.token_ids += output.token_ids
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason
            self.stop_reason = output.stop_reason
        added = self._render(entries) if self.logprobs is not None else None
        if added is not None:
            lp = self.logprobs
            lp.tokens += added.tokens
            lp.token_logprobs += added.token_logprobs
            lp.top_logprobs += added.top_logprobs
            lp.text_offset += added.text_offset
        return text, added, output.token_ids

    def delta(self, output: SequenceOutput) -> CompletionChunkChoice | None:
        """The stream chunk for one output, or None when it adds nothing a client could see."""
        first = not self._started
        text, added, token_ids = self.add(output)
        if not text and not (added and added.tokens) and output.finish_reason is None and not (first and self.return_token_ids):
            return None
        return CompletionChunkChoice(
            text=text,
            index=self.index,
            logprobs=added,
            finish_reason=output.finish_reason,
            stop_reason=output.stop_reason if output.finish_reason else None,
            prompt_token_ids=self.prompt if first and self.return_token_ids else None,
            token_ids=token_ids if self.return_token_ids else None,
        )

    def usage(self) -> Usage:
        return Usage.of(len(self.prompt), len(self.token_ids))

    def whole(self, index: int) -> CompletionChoice:
        return CompletionChoice(
            text="".join(self.text_parts),
            index=index,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            prompt_logprobs=self.prompt_logprobs,
            prompt_token_ids=self.prompt if self.return_token_ids else None,
            token_ids=self.token_ids if self.return_token_ids else None,
        )

    def _render(self, entries: list[TokenLogprob]) -> Logprobs:
        out = Logprobs()
        k = self.logprobs_k or 0
        for e in entries:
            # Offsets count characters of the choice's text: whole characters decoded so far.
            out.text_offset.append(len(self._bytes.decode("utf-8", errors="ignore")))
            if e.token != EOT_ID or not self.skip_special:
                self._bytes += self.texts.tokenizer.decode_single_token_bytes(e.token)
            out.tokens.append(self.texts.text(e.token, self.as_ids))
            out.token_logprobs.append(e.logprob)
            out.top_logprobs.append(None if e.logprob is None else {self.texts.text(t, self.as_ids): lp for t, lp in e.top[:k]})
        return out
