"""HTTP side of the server: routes, auth, error mapping, and streaming engine events as SSE.

Why it is thin: everything that touches the model runs on the engine's worker thread and
everything that decides tokens lives in render.py; handlers here validate, render (on a
single render thread, so the event loop never blocks), queue a job, and hand its events to
relay.py (an SSE stream or one JSON response).
Every failure is answered with Anthropic's error JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cache_backend.chat_messages import tool_dict
from cache_backend.engine import Engine
from cache_backend.errors import (
    APIError,
    AuthenticationFailed,
    ClientClosed,
    InvalidRequest,
    NotFound,
    RequestTooLarge,
    error_body,
)
from cache_backend.hermes import tool_call_markup
from cache_backend.jobs import GenerationParams, Job
from cache_backend.metrics import ServerMetrics
from cache_backend.output import new_id
from cache_backend.progress import ProgressBlock
from cache_backend.prompt import RenderedPrompt
from cache_backend.relay import collect, stream_events
from cache_backend.render import Renderer
from cache_backend.request import MessagesRequest
from cache_backend.sampling import SamplingDefaults
from cache_backend.structured import opening_for
from cache_backend.toolcalls import syntax_for
from cache_backend.validate import parse_json_body, parse_messages_request

log = logging.getLogger("cache_backend.app")


@dataclass
class ServerConfig:
    model_name: str
    model_aliases: tuple[str, ...] = ()
    api_key: str | None = None
    max_output_tokens: int | None = None
    max_context: int | None = None
    max_body_bytes: int = 32 * 2**20  # Anthropic's own limit for the Messages API
    ping_interval: float = 5.0
    structured_deadline_s: float = 60.0
    progress_after_s: float = 3.0  # a prefill longer than this streams a progress thinking block; < 0: never
    sampling: SamplingDefaults = SamplingDefaults()  # for the settings a request leaves unset
    # May rewrite a request's generation settings; None in production (tests: testing/scripted.py).
    params_hook: Callable[[dict[str, Any], GenerationParams], GenerationParams] | None = None
    created_at: str = "2025-01-01T00:00:00Z"


@dataclass
class ServerState:
    config: ServerConfig
    engine: Engine
    renderer: Renderer
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    render_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="render"))


def _error(exc: APIError, request_id: str | None = None) -> JSONResponse:
    headers = {"request-id": request_id} if request_id else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def create_app(state: ServerState, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The ASGI app; the engine must already be started.

    `on_shutdown` runs (on a thread) once in-flight requests are done. It must run here and not
    after uvicorn returns: uvicorn re-raises SIGTERM/SIGINT on its way out, which ends the process
    before any code after `uvicorn.run` (queued snapshot writes would be lost).
    """
    cfg = state.config

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="ccwarm cache_backend", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        log.info("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.error_type, exc.message)
        return _error(exc)

    @app.exception_handler(ClientClosed)
    async def _client_closed(request: Request, exc: ClientClosed) -> Response:
        log.info(
            "%s %s: the client closed the connection before sending its whole body", request.method, request.url.path
        )
        return Response(status_code=400)  # nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"not found: {request.method} {request.url.path}"
            return JSONResponse(error_body("not_found_error", msg), status_code=404)
        if exc.status_code == 405:
            msg = f"method {request.method} is not allowed for {request.url.path}"
            return JSONResponse(error_body("invalid_request_error", msg), status_code=405)
        return JSONResponse(error_body("invalid_request_error", str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("api_error", f"internal error: {type(exc).__name__}: {exc}"), status_code=500)

    def check_auth(request: Request) -> None:
        if not cfg.api_key:
            return
        key = request.headers.get("x-api-key")
        if key is None:
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                key = auth[7:].strip()
        if key != cfg.api_key:
            raise AuthenticationFailed(
                "invalid x-api-key" if key else "missing API key: send x-api-key or Authorization: Bearer"
            )

    def check_model(name: str) -> None:
        if name.startswith("claude") or name == cfg.model_name or name in cfg.model_aliases:
            return
        raise NotFound(
            f"model: {name!r} is not served here (serving {cfg.model_name!r}; any claude-* name is an alias for it)"
        )

    def model_obj(name: str) -> dict[str, Any]:
        return {
            "type": "model",
            "id": name,
            "display_name": f"{name} (served by {cfg.model_name})",
            "created_at": cfg.created_at,
        }

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": cfg.model_name,
            "queued": state.engine.queued,
            "busy": state.engine.busy,
            "max_context": cfg.max_context,
        }

    def cache_stats() -> dict[str, Any]:
        out: dict[str, Any] = dict(state.engine.prefix_cache.stats())
        out.update(requests_in_flight=state.engine.in_flight, resumed_prefills=state.engine.resumed_prefills)
        return out

    @app.get("/v1/cache/stats")
    async def get_cache_stats(request: Request) -> dict[str, Any]:
        check_auth(request)
        return state.metrics.snapshot(cache_stats())

    @app.get("/v1/cache/requests")
    async def get_recent_requests(request: Request, limit: int = 100) -> dict[str, Any]:
        """Per-request figures (prompt, restored, prefilled, TTFT, queue wait, outcome), newest last:
        what benchmarks and the end-to-end scripts read, instead of parsing the log."""
        check_auth(request)
        return {"data": state.metrics.recent(max(1, min(limit, ServerMetrics.RECENT)))}

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        check_auth(request)
        return Response(state.metrics.prometheus(cache_stats()), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        check_auth(request)
        data = [model_obj(cfg.model_name)]
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        check_model(model_id)
        return model_obj(model_id)

    async def read_body(request: Request) -> bytes:
        """The body, refused with a 413 as soon as it passes max_body_bytes (before reading it all)."""
        limit = cfg.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = f"request body is larger than the server's limit of {limit} bytes (--max-body)"
        if declared.isdigit() and int(declared) > limit:
            raise RequestTooLarge(f"{too_large}: content-length is {declared}")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(too_large)
                chunks.append(chunk)
        except ClientDisconnect:
            raise ClientClosed() from None
        return b"".join(chunks)

    async def parse(request: Request, *, count_tokens: bool) -> tuple[dict[str, Any], MessagesRequest, RenderedPrompt]:
        check_auth(request)
        body = parse_json_body(await read_body(request))
        req = parse_messages_request(body, count_tokens=count_tokens)
        check_model(req.model)
        loop = asyncio.get_running_loop()
        prompt = await loop.run_in_executor(state.render_pool, state.renderer.render, req)
        return body, req, prompt

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict[str, Any]:
        _, _, prompt = await parse(request, count_tokens=True)
        return {"input_tokens": len(prompt.tokens)}

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        request_id = new_id("req_")
        body, req, prompt = await parse(request, count_tokens=False)
        n_prompt = len(prompt.tokens)
        if cfg.max_context is not None and n_prompt > cfg.max_context:
            raise InvalidRequest(f"prompt is too long: {n_prompt} tokens > {cfg.max_context} maximum")
        params = build_params(state, body, req, prompt)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()

        def sink(ev: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # loop closed: the server is shutting down
                pass

        job = Job(prompt=prompt, params=params, sink=sink, request_id=request_id)
        state.engine.submit(job)
        msg_id = new_id("msg_")
        if req.stream:
            return StreamingResponse(
                stream_events(job, events, msg_id, req.model, cfg.ping_interval, progress_block(cfg, body)),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "request-id": request_id},
            )
        return await collect(request, job, events, msg_id, req.model, request_id)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def unknown(path: str, request: Request) -> Response:
        known = {"v1/messages": "POST", "v1/messages/count_tokens": "POST", "v1/models": "GET", "health": "GET"}
        if path.rstrip("/") in known:
            raise StarletteHTTPException(405)
        raise StarletteHTTPException(404)

    return app


def progress_block(cfg: ServerConfig, body: dict[str, Any]) -> ProgressBlock | None:
    """A progress block for clients that asked for thinking (Claude Code does): others get pings."""
    thinking = body.get("thinking")
    wants = isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive")
    return ProgressBlock(after_s=cfg.progress_after_s) if wants and cfg.progress_after_s >= 0 else None


def build_params(
    state: ServerState, body: dict[str, Any], req: MessagesRequest, prompt: RenderedPrompt
) -> GenerationParams:
    """Generation settings for one request: caps, sampling, stop rules, tool syntax, forced tokens."""
    cfg = state.config
    sampling = cfg.sampling
    tok = state.engine.tokenizer
    max_tokens = req.max_tokens or 1
    if cfg.max_output_tokens:
        max_tokens = min(max_tokens, cfg.max_output_tokens)
    context_cut = False
    if cfg.max_context and cfg.max_context - len(prompt.tokens) < max_tokens:
        max_tokens, context_cut = max(1, cfg.max_context - len(prompt.tokens)), True
    tools = [tool_dict(t) for t in req.tools] or None
    syntax = None
    if req.tools and req.tool_choice.type != "none" and req.json_schema is None:
        syntax = syntax_for(tok, tools)
    forced: tuple[int, ...] = ()
    if syntax is not None and req.tool_choice.type in ("any", "tool"):
        if req.tool_choice.type == "tool" and syntax.json_body:
            head = tool_call_markup(req.tool_choice.name or "", {})
            head = head[: head.index('"arguments": ') + len('"arguments": ')]
        else:
            head = syntax.start
        forced = tuple(state.renderer.encode(head))
    elif req.json_schema is not None:
        opening = opening_for(req.json_schema)
        if opening:
            forced = tuple(state.renderer.encode(opening))
    params = GenerationParams(
        max_tokens=max_tokens,
        context_cut=context_cut,
        temperature=sampling.temperature if req.temperature is None else req.temperature,
        top_p=sampling.top_p if req.top_p is None else req.top_p,
        top_k=sampling.top_k if req.top_k is None else req.top_k,
        min_p=sampling.min_p,
        repetition_penalty=sampling.repetition_penalty,
        stop_sequences=req.stop_sequences,
        tool_syntax=syntax,
        json_schema=req.json_schema,
        deadline_s=cfg.structured_deadline_s if req.json_schema is not None else None,
        forced_tokens=forced,
    )
    return cfg.params_hook(body, params) if cfg.params_hook else params
