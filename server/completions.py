"""`POST /v1/completions`: from a validated request to engine sequences, and back to OpenAI JSON.

`plan()` tokenizes the prompts and checks them against the model (context length, token ids,
logit_bias), turning each prompt x n into one `SequenceRequest`. `respond()` gathers a
submission's outputs into one `CompletionResponse`; `stream()` turns them into server-sent
events as they come. Both render the same outputs the same way, so the concatenated stream text
equals the non-streamed text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nanogpt_mlx.model.sampling import SamplingParams
from nanogpt_mlx.model.tokenizer import EOT_ID, EOT_TOKEN
from nanogpt_mlx.server.engine import SequenceOutput, SequenceRequest, Submission, TokenLogprob
from nanogpt_mlx.server.protocol import (
    APIError,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    Logprobs,
    ParamError,
    Usage,
)


@dataclass
class CompletionPlan:
    """A request turned into sequences: choice i is sequence i (prompt i // n, sample i % n)."""

    request: CompletionRequest
    prompts: list[list[int]]
    prompt_texts: list[str]  # what echo returns for each prompt
    sequences: list[SequenceRequest]
    n: int

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)  # each prompt once, however many choices it has


class Completions:
    def __init__(self, tokenizer, model_name: str, max_len: int, vocab_size: int, max_n: int, max_sequences: int):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.max_n = max_n
        self.max_sequences = max_sequences
        self._token_texts: dict[int, str] = {}

    # --- request -> sequences ---------------------------------------------------------------------
    def plan(self, req: CompletionRequest) -> CompletionPlan:
        try:
            req.check_supported()
        except ParamError as exc:
            raise APIError(400, str(exc), param=exc.param, code="unsupported_parameter") from None
        n = req.n or 1
        if n > self.max_n:
            raise APIError(400, f"n must be at most {self.max_n} on this server, got {n}", param="n", code="invalid_value")
        raw = req.prompts()
        if len(raw) * n > self.max_sequences:
            raise APIError(
                400,
                f"{len(raw)} prompt(s) x n={n} asks for {len(raw) * n} sequences; this server queues at most {self.max_sequences} per request",
                param="n" if n > 1 else "prompt",
                code="invalid_value",
            )
        prompts, texts = [], []
        for p in raw:
            if isinstance(p, str):
                tokens = self.tokenizer.encode(p, allowed_special={EOT_TOKEN})
                text = p
            else:
                bad = [t for t in p if not 0 <= t < self.vocab_size]
                if bad:
                    raise APIError(
                        400, f"token id {bad[0]} is out of range: this model's vocabulary is 0..{self.vocab_size - 1}", param="prompt", code="invalid_value"
                    )
                tokens = list(p)
                text = self.tokenizer.decode(tokens)
            prompts.append(tokens or [EOT_ID])  # like OpenAI: an empty prompt is conditioned on <|endoftext|>
            texts.append(text)

        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for tokens in prompts:
            if len(tokens) + max_tokens > self.max_len:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.max_len} tokens, however you requested "
                    f"{len(tokens) + max_tokens} tokens ({len(tokens)} in your prompt; {max_tokens} for the completion). "
                    "Please reduce your prompt; or completion length.",
                    param="prompt" if len(tokens) > self.max_len else "max_tokens",
                    code="context_length_exceeded",
                )
        bias = req.token_bias()
        bad_bias = [t for t in bias if not 0 <= t < self.vocab_size]
        if bad_bias:
            raise APIError(400, f"logit_bias token id {bad_bias[0]} is out of range 0..{self.vocab_size - 1}", param="logit_bias", code="invalid_value")

        top_k = req.top_k if req.top_k and req.top_k > 0 else 0
        sequences = []
        for i, tokens in enumerate(prompts):
            for j in range(n):
                params = SamplingParams(
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    top_k=top_k,
                    presence_penalty=req.presence_penalty or 0.0,
                    frequency_penalty=req.frequency_penalty or 0.0,
                    logit_bias=bias,
                    seed=req.seed,
                    logprobs=req.logprobs,
                )
                sequences.append(
                    SequenceRequest(
                        prompt=tokens,
                        max_tokens=max_tokens,
                        params=params,
                        stop=req.stop_strings(),
                        ignore_eos=bool(req.ignore_eos),
                        prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
                        choice=j,
                    )
                )
        return CompletionPlan(req, prompts, texts, sequences, n)

    # --- outputs -> JSON ------------------------------------------------------------------------------
    async def respond(self, plan: CompletionPlan, submission: Submission) -> CompletionResponse:
        """Wait for every choice to finish; one response with all of them."""
        choices = [_ChoiceRender(self, plan, i) for i in range(len(plan.sequences))]
        completion_tokens = 0
        async for index, output in submission:
            if output.finish_reason == "error":
                submission.cancel()
                raise APIError(500, f"generation failed: {output.error}", type="server_error", code="engine_error")
            choices[index].add(output)
            completion_tokens += output.completion_tokens
        return CompletionResponse(
            id=_completion_id(),
            created=int(time.time()),
            model=self.model_name,
            choices=[c.whole() for c in choices],
            usage=Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion_tokens, total_tokens=plan.prompt_tokens + completion_tokens),
        )

    async def stream(self, plan: CompletionPlan, submission: Submission) -> AsyncIterator[str]:
        """Server-sent event payloads: text chunks, one final chunk per choice, usage, [DONE]."""
        req = plan.request
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        rid, created = _completion_id(), int(time.time())
        choices = [_ChoiceRender(self, plan, i) for i in range(len(plan.sequences))]
        completion_tokens = 0
        exclude = None if include_usage else {"usage"}
        try:
            async for index, output in submission:
                if output.finish_reason == "error":
                    error = APIError(500, f"generation failed: {output.error}", type="server_error", code="engine_error")
                    yield error.body.model_dump_json()
                    return
                completion_tokens += output.completion_tokens
                piece = choices[index].delta(output)
                if piece is None:
                    continue
                chunk = CompletionChunk(id=rid, created=created, model=self.model_name, choices=[piece])
                yield chunk.model_dump_json(exclude=exclude)
            if include_usage:
                usage = Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion_tokens, total_tokens=plan.prompt_tokens + completion_tokens)
                yield CompletionChunk(id=rid, created=created, model=self.model_name, choices=[], usage=usage).model_dump_json()
            yield "[DONE]"
        finally:
            submission.cancel()  # no-op once finished; frees the slots when the client went away

    # --- tokens as text -------------------------------------------------------------------------------
    def token_text(self, token: int) -> str:
        """A token as OpenAI shows it in logprobs; bytes that are not whole characters as `bytes:\\xNN`."""
        text = self._token_texts.get(token)
        if text is None:
            data = self.tokenizer.decode_single_token_bytes(token)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            self._token_texts[token] = text
        return text


class _ChoiceRender:
    """One choice's text and logprobs, built up output by output."""

    def __init__(self, completions: Completions, plan: CompletionPlan, index: int):
        self.c = completions
        self.index = index
        req = plan.request
        self.echo_text = plan.prompt_texts[index // plan.n] if req.echo else None
        self.want_logprobs = req.logprobs is not None
        self.text_parts: list[str] = []
        self.logprobs = Logprobs() if self.want_logprobs else None
        self.finish_reason: str | None = None
        self._bytes = bytearray()  # everything the text_offsets count over
        self._started = False

    def add(self, output: SequenceOutput) -> tuple[str, Logprobs | None]:
        """Record an output; return the text and logprobs it adds to this choice."""
        text = output.text
        entries: list[TokenLogprob] = []
        if not self._started:
            self._started = True
            if self.echo_text is not None:
                text = self.echo_text + text
                if output.prompt_logprobs is not None:
                    entries.extend(output.prompt_logprobs)
        if output.logprobs:
            entries.extend(output.logprobs)
        self.text_parts.append(text)
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason
        added = self._render(entries) if self.want_logprobs else None
        if added is not None:
            lp = self.logprobs
            lp.tokens += added.tokens
            lp.token_logprobs += added.token_logprobs
            lp.top_logprobs += added.top_logprobs
            lp.text_offset += added.text_offset
        return text, added

    def delta(self, output: SequenceOutput) -> CompletionChunkChoice | None:
        """The stream chunk for one output, or None when it adds nothing a client could see."""
        text, added = self.add(output)
        if not text and not (added and added.tokens) and output.finish_reason is None:
            return None
        return CompletionChunkChoice(text=text, index=self.index, logprobs=added, finish_reason=output.finish_reason)

    def whole(self) -> CompletionChoice:
        return CompletionChoice(text="".join(self.text_parts), index=self.index, logprobs=self.logprobs, finish_reason=self.finish_reason)

    def _render(self, entries: list[TokenLogprob]) -> Logprobs:
        out = Logprobs()
        for e in entries:
            # Offsets count characters of the choice's text: whole characters decoded so far.
            out.text_offset.append(len(self._bytes.decode("utf-8", errors="ignore")))
            if e.token != EOT_ID:
                self._bytes += self.c.tokenizer.decode_single_token_bytes(e.token)
            out.tokens.append(self.c.token_text(e.token))
            out.token_logprobs.append(e.logprob)
            out.top_logprobs.append(None if e.logprob is None else {self.c.token_text(t): lp for t, lp in e.top})
        return out


def _completion_id() -> str:
    return "cmpl-" + uuid.uuid4().hex

