"""The HTTP surface: FastAPI routes over one `Engine`, errors in OpenAI's shape.

    POST /v1/completions        OpenAI completions + vLLM's extensions (JSON, or server-sent events)
    POST /v1/chat/completions   chat completions through a chat template (chat.py), same engine
    GET  /v1/models             the served model names;  GET /v1/models/{id}
    POST /tokenize              {"prompt"} or {"messages"} -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize            {"tokens": [...]} -> {"prompt"}
    GET  /tokenizer_info        the tokenizer's settings and chat template (vLLM's; lm-eval's remote tokenizer)
    GET  /health                200 while the engine runs with the model loaded, else 503
    GET  /metrics               Prometheus text format
    GET  /openapi.json, /docs   the API's schema (request bodies as protocol.py validates them)

Bodies are read and parsed here rather than by FastAPI, so that every failure (wrong content
type, oversized body, invalid UTF-8 or JSON, a bad field) becomes a 4xx with OpenAI's
`{"error": {"message", "type", "param", "code"}}` body instead of FastAPI's 422 list; the OpenAPI
schema still describes every body (`openapi_extra`). With `--api-key`, the /v1 and tokenizer
routes need `Authorization: Bearer KEY`; /health, /metrics and the schema stay open.

The model loads on the engine thread after the server starts listening; until it is ready,
/health and completions answer 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nanogpt_mlx.errors import UserError
from nanogpt_mlx.model.checkpoint import load_config
from nanogpt_mlx.model.tokenizer import get_tokenizer
from nanogpt_mlx.server import request_log
from nanogpt_mlx.server.chat import ChatCompletions, ChatTemplateError, load_chat_template, render_messages
from nanogpt_mlx.server.completions import Completions, Planner, TokenTexts, response_id
from nanogpt_mlx.server.engine import Engine, EngineUnavailableError, QueueFullError
from nanogpt_mlx.server.metrics import ServerMetrics
from nanogpt_mlx.server.protocol import (
    TOKEN_ID_MARK,
    APIError,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelPermission,
    ParamError,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
)
from nanogpt_mlx.server.settings import ServerSettings
from nanogpt_mlx.server.tokenization import token_strings, tokenizer_info

log = logging.getLogger("nanogpt_mlx.server")

RETRY_AFTER_SECONDS = 1  # while loading or draining; a full queue estimates its own (Engine.retry_after)


class ServerContext:
    """Everything the routes share: settings, engine, tokenizer, metrics, and the drain state."""

    def __init__(self, settings: ServerSettings, model_dir: Path):
        self.settings = settings
        self.model_dir = model_dir
        config = load_config(model_dir)
        self.max_len = config.block_size
        self.vocab_size = config.vocab_size
        self.tokenizer = get_tokenizer(model_dir)
        self.metrics = ServerMetrics(settings.max_batch, enabled=settings.metrics)
        self.engine = Engine(
            self._load_runner,
            self.tokenizer,
            max_batch=settings.max_batch,
            max_queue=settings.max_queue,
            max_len=self.max_len,
            prefill_chunk=settings.prefill_chunk,
            prefix_cache_rows=settings.prefix_cache_rows if settings.prefix_cache else 0,
            stats_callback=self.metrics.observe_step if settings.metrics else None,
        )
        try:
            self.chat_template = load_chat_template(settings.chat_template, model_dir)
        except ChatTemplateError as exc:
            raise UserError(str(exc)) from None
        self.served_names = list(settings.served_model_name)
        self.planner = Planner(
            self.tokenizer,
            self.max_len,
            self.vocab_size,
            max_n=settings.max_n,
            max_logprobs=settings.max_logprobs,
            max_sequences=settings.max_queue,
        )
        self.token_texts = TokenTexts(self.tokenizer)
        self.completions = Completions(self.planner, self.token_texts)
        self.chat = ChatCompletions(self.planner, self.token_texts, self.chat_template, settings.trust_request_chat_template)
        self.tokenizer_info = tokenizer_info(model_dir, self.max_len, self.chat_template.source)
        self.created = int(time.time())
        self.draining = False
        self.inflight = 0  # completion requests being answered
        self.open_requests = 0  # HTTP requests being answered, whatever the route (OpenRequests)

    def _load_runner(self, rows: int):
        """Runs on the engine thread: every MLX object lives on that thread."""
        from nanogpt_mlx.model.checkpoint import load_model
        from nanogpt_mlx.model.cpu.runtime import REPORT
        from nanogpt_mlx.model.device import select_device
        from nanogpt_mlx.model.runner import ModelRunner

        device = select_device(self.settings.device)
        started = time.perf_counter()
        model = load_model(self.model_dir)
        log.info("loaded %s on %s (%s) in %.1f s", self.model_dir, device, REPORT.blas_name, time.perf_counter() - started)
        return ModelRunner(model, max_rows=rows, max_len=self.max_len)

    async def fail(self, timeout: float) -> None:
        """The engine died: answer 503 from now on, and wait (up to `timeout` s) until every open
        HTTP request has had its answer (the ones it was generating got an error; a body still
        being uploaded gets a 503) before the process exits."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.open_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def drain(self, timeout: float) -> None:
        """Graceful shutdown: answer 503 from now on, let in-flight work finish, end the rest.

        Sequences still running at the deadline end with finish_reason "abort" and their text so
        far; we then give their responses a moment to reach the clients.
        """
        self.draining = True
        finished = await self.engine.drain(timeout)
        if not finished:
            log.warning("shutdown deadline of %.0f s reached: ended the remaining sequences", timeout)
        deadline = time.monotonic() + 5.0
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


def create_app(settings: ServerSettings, model_dir: Path) -> FastAPI:
    ctx = ServerContext(settings, model_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(ctx.engine.shutdown)

    app = FastAPI(
        title="nanogpt-mlx",
        summary="An OpenAI-compatible server (with vLLM's extensions) for a small GPT-2-style model",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx
    app.add_middleware(OpenRequests, ctx=ctx)
    _install_error_handlers(app)
    request_log.install(app, ctx.metrics, settings.access_log, settings.log_prompts)

    def require_api_key(request: Request) -> None:
        key = settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            message = "Missing API key: send 'Authorization: Bearer KEY'." if not header else "Incorrect API key provided."
            raise APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def require_model(name: str | None) -> None:
        if name is not None and name not in ctx.served_names:
            served = ", ".join(f"'{n}'" for n in ctx.served_names)
            raise APIError(404, f"The model '{name}' does not exist; this server serves {served}.", param="model", code="model_not_found")

    def require_ready() -> None:
        if ctx.draining:
            raise _unavailable("The server is shutting down; retry on another instance.")
        if not ctx.engine.ready:
            if ctx.engine.state == "loading":
                raise _unavailable("The model is still loading; retry shortly.")
            raise _unavailable(f"The engine is not running ({ctx.engine.failure or ctx.engine.state}).")

    @app.post(
        "/v1/completions",
        dependencies=[Depends(require_api_key)],
        openapi_extra=_json_body(CompletionRequest),
        responses=_generation_responses(CompletionResponse, CompletionChunk),
    )
    async def create_completion(request: Request):
        req = _parse(CompletionRequest, await read_json(request, settings.max_body_bytes))
        require_model(req.model)
        return await generate(request, req, ctx.completions.plan(req), ctx.completions, "cmpl")

    @app.post(
        "/v1/chat/completions",
        dependencies=[Depends(require_api_key)],
        openapi_extra=_json_body(ChatCompletionRequest),
        responses=_generation_responses(ChatCompletionResponse, ChatCompletionChunk),
    )
    async def create_chat_completion(request: Request):
        req = _parse(ChatCompletionRequest, await read_json(request, settings.max_body_bytes))
        require_model(req.model)
        return await generate(request, req, ctx.chat.plan(req), ctx.chat, "chatcmpl")

    async def generate(request: Request, req, plan, renderer, prefix: str):
        """Submit a plan's sequences; answer with the renderer's JSON or its event stream."""
        request_log.note_completion(request.scope, plan)
        require_ready()
        try:
            submission = ctx.engine.submit(plan.sequences)
        except QueueFullError as exc:
            message = f"The server is overloaded ({exc}); retry in {exc.retry_after} s."
            raise _unavailable(message, code="queue_full", retry_after=exc.retry_after) from None
        except EngineUnavailableError as exc:
            raise _unavailable(f"The server cannot take requests now: {exc}.") from None
        request_log.note_submission(request.scope, submission)
        rid = response_id(prefix, _base_request_id(request, req.request_id))
        model = req.model or ctx.served_names[0]

        ctx.inflight += 1
        if req.stream:
            ended = False

            def end_stream() -> None:
                # Runs when the response ends however it ends (done, client gone, error); the
                # cancel is a no-op for a finished submission and frees the slots otherwise.
                nonlocal ended
                submission.cancel()
                if not ended:
                    ended = True
                    ctx.inflight -= 1

            async def events():
                try:
                    async for payload in renderer.stream(plan, submission, rid, model):
                        yield {"data": payload}
                finally:
                    end_stream()

            return EventSourceResponse(events(), ping=15, sep="\n", background=BackgroundTask(end_stream))
        try:
            return await _respond_unless_disconnected(request, renderer.respond(plan, submission, rid, model), submission)
        finally:
            ctx.inflight -= 1

    @app.get("/v1/models", dependencies=[Depends(require_api_key)], responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[_model_card(ctx, name) for name in ctx.served_names])

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)], responses=_ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        require_model(model_id)
        return _model_card(ctx, model_id)

    @app.post(
        "/tokenize",
        dependencies=[Depends(require_api_key)],
        openapi_extra=_json_body(TokenizeCompletionRequest, TokenizeChatRequest),
        responses=_ERRORS,
    )
    async def tokenize(request: Request) -> TokenizeResponse:
        data = await read_json(request, settings.max_body_bytes)
        if isinstance(data, dict) and "messages" in data:
            req = _parse(TokenizeChatRequest, data)
            try:
                req.check_template_fields()
            except ParamError as exc:
                raise APIError(400, str(exc), param=exc.param, code=exc.code) from None
            text = render_messages(req, ctx.chat_template, settings.trust_request_chat_template)[0]
        else:
            req = _parse(TokenizeCompletionRequest, data)
            text = req.prompt
        require_model(req.model)
        tokens = ctx.planner.encode(text)
        strs = token_strings(ctx.tokenizer, tokens) if req.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=ctx.max_len, tokens=tokens, token_strs=strs)

    @app.post("/detokenize", dependencies=[Depends(require_api_key)], openapi_extra=_json_body(DetokenizeRequest), responses=_ERRORS)
    async def detokenize(request: Request) -> DetokenizeResponse:
        req = _parse(DetokenizeRequest, await read_json(request, settings.max_body_bytes))
        require_model(req.model)
        ctx.planner.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=ctx.tokenizer.decode(req.tokens))

    @app.get("/tokenizer_info", dependencies=[Depends(require_api_key)], responses=_ERRORS)
    async def get_tokenizer_info() -> TokenizerInfoResponse:
        return TokenizerInfoResponse(**ctx.tokenizer_info)

    @app.get("/health")
    async def health():
        engine = ctx.engine
        status = "failed" if engine.state == "failed" else "draining" if ctx.draining else "ok" if engine.ready else engine.state
        body = {
            "status": status,
            "model": ctx.served_names[0],
            "running": engine.active_count,
            "waiting": engine.waiting_count,
            "slots_total": engine.max_batch,
            "slots_free": engine.max_batch - engine.active_count,
        }
        if engine.failure:
            body["error"] = engine.failure
        if status != "ok":
            return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return body

    if settings.metrics:  # with --no-metrics, /metrics is a plain 404

        @app.get("/metrics")
        async def metrics():
            data, content_type = ctx.metrics.render()
            return Response(data, media_type=content_type)

    app.openapi = lambda: _openapi(app, settings)
    return app


class OpenRequests:
    """ASGI middleware counting the HTTP requests being answered, in `ctx.open_requests`."""

    def __init__(self, app, ctx: ServerContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.ctx.open_requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.ctx.open_requests -= 1


# --- the OpenAPI schema: bodies are parsed by hand (read_json, _parse), so they are declared here ---
_REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, TokenizeCompletionRequest, TokenizeChatRequest, DetokenizeRequest)
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


def _json_body(*models: type[BaseModel]) -> dict:
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _generation_responses(response: type[BaseModel], chunk: type[BaseModel]) -> dict:
    ok = {
        "model": response,
        "description": "the whole answer; with stream: true, server-sent events of chunks, then `data: [DONE]`",
        "content": {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk.__name__}"}}},
    }
    return {200: ok, **_ERRORS}


def _openapi(app: FastAPI, settings: ServerSettings) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        _, defs = models_json_schema(
            [(m, "validation") for m in _REQUEST_MODELS] + [(m, "serialization") for m in (CompletionChunk, ChatCompletionChunk)],
            ref_template="#/components/schemas/{model}",
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(defs["$defs"])
        # The server's own limits, so that the schema admits exactly what the server does.
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            props = components[name]["properties"]
            for field, maximum in (("n", settings.max_n), ("best_of", settings.max_n), ("logprobs", settings.max_logprobs),
                                   ("top_logprobs", settings.max_logprobs), ("prompt_logprobs", settings.max_logprobs)):
                for branch in props.get(field, {}).get("anyOf", [props.get(field, {})]):
                    if branch.get("type") == "integer":
                        branch["maximum"] = maximum
            for field in ("max_tokens", "max_completion_tokens"):  # a prompt has at least one token
                for branch in props.get(field, {}).get("anyOf", []):
                    if branch.get("type") == "integer":
                        branch["maximum"] = app.state.ctx.max_len - 1
        _bound_token_ids(components, app.state.ctx.vocab_size - 1)
        app.openapi_schema = schema
    return app.openapi_schema


def _bound_token_ids(node, maximum: int) -> None:
    """Every token id the schema describes (protocol.TokenId) is at most the vocabulary's last."""
    if isinstance(node, dict):
        if node.pop(TOKEN_ID_MARK, False):
            node["maximum"] = maximum
        for value in node.values():
            _bound_token_ids(value, maximum)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, maximum)


# --- request bodies ------------------------------------------------------------------------------
async def read_json(request: Request, limit: int):
    """The body as JSON, with a 4xx in OpenAI's shape for every way it can be wrong."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(400, f"Content-Type must be application/json, got {content_type or 'none'!r}.", code="invalid_content_type")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise APIError(400, "Invalid Content-Length header.", code="invalid_request")
        if int(declared) > limit:
            raise APIError(413, f"Request body of {declared} bytes exceeds the limit of {limit} bytes.", code="request_too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")
    except ClientDisconnect:  # nobody will read the answer; 499 is what the access log and metrics count
        raise APIError(499, "The client closed the connection before sending the whole body.", code="client_disconnected") from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"Request body is not valid UTF-8 (byte {exc.start}).", code="invalid_encoding") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(
            400, f"Request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.", code="invalid_json"
        ) from None
    except (RecursionError, ValueError) as exc:  # nested too deep; a number of more digits than Python converts
        raise APIError(400, f"Request body is JSON this server cannot read: {str(exc)[:200]}.", code="invalid_json") from None


def _parse(model: type[BaseModel], data):
    if not isinstance(data, dict):
        raise APIError(400, "Request body must be a JSON object.", code="invalid_request")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> APIError:
    """The first problem as a 400 naming its parameter, worded like OpenAI's."""
    err = exc.errors(include_url=False)[0]
    loc = [str(part) for part in err["loc"]]
    param = loc[0] if loc else None
    if err["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {'.'.join(loc)}", param=param, code="unknown_parameter")
    if err["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{'.'.join(loc)}'.", param=param, code="missing_required_parameter")
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = json.dumps(value)[:80] if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return APIError(400, f"Invalid value for '{'.'.join(loc)}': {message} (got {shown}).", param=param, code="invalid_value")


def _base_request_id(request: Request, body_id: str | None) -> str:
    """As vLLM: the client's X-Request-ID header, else the body's request_id, else a new one."""
    record = request_log.request_record(request.scope)
    given = request.headers.get(request_log.REQUEST_ID_HEADER)
    if given and record is not None and given == record.request_id:  # the middleware took it: it is sane
        return given
    return body_id or uuid.uuid4().hex


# --- non-streaming responses ---------------------------------------------------------------------
async def _respond_unless_disconnected(request: Request, respond, submission):
    """Wait for the response, but cancel it (freeing its slots) if the client hangs up first."""
    work = asyncio.ensure_future(respond)
    hangup = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            submission.cancel()
            work.cancel()
        hangup.cancel()
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # nobody is listening; uvicorn discards it
    return work.result()


async def _wait_for_disconnect(request: Request) -> None:
    # Once the body is read, uvicorn's receive() blocks until the client disconnects.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _model_card(ctx: ServerContext, name: str) -> ModelCard:
    permission = ModelPermission(id=f"modelperm-{uuid.uuid5(uuid.NAMESPACE_URL, name).hex}", created=ctx.created)
    return ModelCard(id=name, created=ctx.created, root=str(ctx.model_dir), max_model_len=ctx.max_len, permission=[permission])


def _unavailable(message: str, code: str = "service_unavailable", retry_after: int = RETRY_AFTER_SECONDS) -> APIError:
    return APIError(503, message, type="server_error", code=code, headers={"Retry-After": str(retry_after)})


# --- errors ----------------------------------------------------------------------------------------
def _install_error_handlers(app: FastAPI) -> None:
    def render(request: Request, error: APIError) -> JSONResponse:
        # The request log middleware counts the error, under this code, once the response is sent.
        request_log.note_error_code(request.scope, error.body.error.code)
        return JSONResponse(error.body.model_dump(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return render(request, exc)

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        return render(
            request, APIError(400, f"Invalid request: {first.get('msg', 'bad input')}", param=".".join(loc) or None, code="invalid_value")
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return render(request, APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return render(
            request, APIError(500, "The server had an error while processing your request.", type="server_error", code="internal_error")
        )
