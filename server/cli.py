"""`nanogpt-mlx serve`: the OpenAI-compatible server on uvicorn, with a graceful SIGTERM.

Every flag is also an environment variable (see settings.py). On SIGTERM or Ctrl+C the server
stops admitting (503 with Retry-After, /health 503), lets in-flight requests finish for up to
--shutdown-timeout seconds, ends whatever still runs with a final chunk (finish_reason "abort"),
and exits 0. A second signal stops at once. If the engine thread dies, /health and new requests
answer 503 at once; the open requests get their answers (up to --shutdown-timeout) and the
process exits 1.
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn

log = logging.getLogger("nanogpt_mlx.server")


def register_cli(subparsers) -> None:
    from nanogpt_mlx.server.settings import add_arguments

    p = subparsers.add_parser(
        "serve",
        help="serve the model over OpenAI's /v1/completions (continuous batching, streaming)",
        description="Serve the model over an OpenAI-compatible HTTP API. Every flag can also be set "
        "with an environment variable NANOGPT_MLX_<FLAG> (e.g. NANOGPT_MLX_MAX_BATCH=16).",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from nanogpt_mlx.cli import UserError
    from nanogpt_mlx.model.checkpoint import WEIGHTS_FILE, load_config
    from nanogpt_mlx.model.cli import resolve_model_dir
    from nanogpt_mlx.server.app import create_app
    from nanogpt_mlx.server.request_log import configure_logging
    from nanogpt_mlx.server.settings import from_arguments

    try:
        settings = from_arguments(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model_dir = resolve_model_dir(settings.model)
    load_config(model_dir)  # a missing or malformed checkpoint fails here, before we listen
    if not (model_dir / WEIGHTS_FILE).is_file():
        raise UserError(f"{model_dir / WEIGHTS_FILE} is missing: not a checkpoint directory")

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_logging(settings.access_log)
    app = create_app(settings, model_dir)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        access_log=False,  # ours (logger nanogpt_mlx.access, with request ids and token counts) replaces uvicorn's
        backlog=2048,  # bursts of connections must queue, not be refused
        timeout_keep_alive=30,
        timeout_graceful_shutdown=10,  # our own drain ran before; this only bounds closing sockets
    )
    server = GracefulServer(config, app.state.ctx, settings.shutdown_timeout)
    server.run()
    return server.exit_code


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a drain phase between the signal and closing the sockets.

    uvicorn alone closes the listening socket at the first signal (new clients are refused, not
    told 503) and, after its timeout, cancels in-flight streams mid-token. We keep listening
    while draining, so new requests get a proper 503, and end streams with a final chunk.
    Overriding `handle_exit` also keeps uvicorn from re-raising the signal after shutdown, so
    the process exits 0.
    """

    def __init__(self, config, ctx, shutdown_timeout: float):
        super().__init__(config)
        self.ctx = ctx
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig, frame) -> None:
        if self._draining or self._loop is None or not self.started:
            # A second signal, or one before we serve: stop now.
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        log.info("signal %s: draining (up to %.0f s) before shutting down", sig, self.shutdown_timeout)
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.ctx.drain(self.shutdown_timeout)
        finally:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        engine = self.ctx.engine
        if engine.state == "failed" and self.exit_code == 0 and not self.should_exit:
            # /health already answers 503 (the engine is not ready); answer every open request
            # (503 for new work), then exit non-zero so that a supervisor restarts the server.
            log.error("the engine failed (%s): answering the open requests, then exiting", engine.failure)
            self.exit_code = 1
            self._draining = True
            self._drain_task = asyncio.ensure_future(self._fail())
        return await super().on_tick(counter)

    async def _fail(self) -> None:
        try:
            await self.ctx.fail(self.shutdown_timeout)
        finally:
            self.should_exit = True
