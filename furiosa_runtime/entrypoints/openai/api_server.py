"""The OpenAI-compatible HTTP server: FastAPI routes over one ``AsyncLLMEngine``, run by uvicorn.

    furiosa-llm serve artifacts/smollm2-135m-instruct --port 8000
    python -m furiosa_runtime serve artifacts/smollm2-135m-instruct --host 127.0.0.1 --api-key secret

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``,
``POST /v1/embeddings`` (every ``/v1`` path behind ``--api-key`` when set, known route or
not, as vLLM guards them; ``/health``, ``/version`` and ``/metrics`` stay open, as in vLLM),
``GET /health``, ``GET /version``, ``GET /metrics``.  Every error is an OpenAI-shaped body
with its status (400 bad request, 401 key, 404 model or route, 405 method, 413 body over
``ServerConfig.max_body_bytes``, 500 internal).  A body must be a JSON object sent as
``application/json`` (or with no Content-Type); fields are checked by ``protocol``.

A client that goes away aborts its request in the engine: a stream's generator is
cancelled by Starlette, and a non-streamed request is watched for the disconnect.
SIGTERM (and Ctrl-C) stop accepting connections, let the requests in flight finish, then
exit; SIGTERM then exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import signal
import socket
import types
from collections.abc import AsyncIterator, Coroutine
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import uvicorn
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from furiosa_runtime.entrypoints.async_llm_engine import AsyncLLMEngine
from furiosa_runtime.entrypoints.engine_args import AsyncEngineArgs
from furiosa_runtime.entrypoints.openai.cli_args import artifact_path
from furiosa_runtime.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from furiosa_runtime.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ModelList,
)
from furiosa_runtime.entrypoints.openai.serving_chat import OpenAIServingChat
from furiosa_runtime.entrypoints.openai.serving_completion import OpenAIServingCompletion
from furiosa_runtime.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from furiosa_runtime.entrypoints.openai.serving_engine import OpenAIError, OpenAIServing, ServerConfig

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)


def build_app(engine: AsyncLLMEngine, config: ServerConfig) -> FastAPI:
    """The FastAPI application serving ``engine`` (``app.state`` holds the engine and metrics)."""
    app = FastAPI(title="furiosa_runtime OpenAI-compatible server", version=_version())
    metrics = ServerMetrics(engine.stats, config.served_model_names[0])
    app.state.engine, app.state.metrics = engine, metrics
    serving = OpenAIServing(engine, config, metrics)
    completion = OpenAIServingCompletion(engine, config, metrics)
    chat = OpenAIServingChat(engine, config, metrics)
    embedding = OpenAIServingEmbedding(engine, config, metrics)
    if config.api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=config.api_key)
    if config.allowed_origins:  # added last, so outermost: preflights and 401s get CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"], allow_headers=["*"])

    async def parse(raw: Request, model: type[R]) -> R:
        return await _parse(raw, model, config.max_body_bytes)

    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models() -> Response:
        card = serving.model_card()
        return _json(ModelList(data=[card.model_copy(update={"id": name}) for name in config.served_model_names]))

    @v1.post("/completions")
    async def completions(raw: Request) -> Response:
        return await _respond(raw, completion.create_completion(await parse(raw, CompletionRequest)))

    @v1.post("/chat/completions")
    async def chat_completions(raw: Request) -> Response:
        return await _respond(raw, chat.create_chat_completion(await parse(raw, ChatCompletionRequest)))

    @v1.post("/embeddings")
    async def embeddings(raw: Request) -> Response:
        return await _respond(raw, embedding.create_embedding(await parse(raw, EmbeddingRequest)))

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/version")
    async def version_() -> Response:
        return JSONResponse({"version": _version()})

    @app.get("/metrics")
    async def metrics_() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    app.add_exception_handler(OpenAIError, _openai_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal_error)
    return app


class _APIKeyMiddleware:
    """Refuses every ``/v1`` request without ``Authorization: Bearer <api_key>``, before
    routing, so an unknown route or a wrong method under ``/v1`` is a 401 too (vLLM's
    middleware does the same); CORS preflights (OPTIONS) pass, browsers send them keyless."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _under_v1(scope["path"]) and not self._authorized(scope):
            error = OpenAIError(401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
            response = await _openai_error(Request(scope), error)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.expected)


def _under_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


async def _parse(raw: Request, model: type[R], max_body_bytes: int) -> R:
    """The JSON body as ``model``; a 400 naming the first bad field (or a body that is not
    JSON), a 413 for a body over ``max_body_bytes``."""
    media_type = raw.headers.get("content-type", "application/json").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise OpenAIError(400, f"Unsupported Content-Type {media_type!r}: send the body as application/json")
    try:
        return model.model_validate_json(await _body(raw, max_body_bytes))
    except ValidationError as err:
        raise _invalid(err, model) from None


async def _body(raw: Request, max_body_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``max_body_bytes``:
    by its Content-Length, or while it streams in."""
    too_large = OpenAIError(413, f"The request body is larger than this server accepts ({max_body_bytes} bytes).",
                            code="request_too_large")  # fmt: skip
    declared = raw.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in raw.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _invalid(err: ValidationError, model: type[BaseModel]) -> OpenAIError:
    """A 400 naming the first bad field and, for a field of several types, every one allowed."""
    errors = err.errors()
    first = errors[0]
    loc = first["loc"]
    param = str(loc[0]) if loc else None
    got = f", got {first['input']!r:.60}"
    if first["type"] == "json_invalid":
        message = f"The request body is not valid JSON: {first['msg']}"
    elif first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {_where(loc)}"
    elif first["type"] == "value_error":  # the models' own cross-field checks
        message = str(first["ctx"]["error"])
        param = message.split(":")[0]
    elif param is not None and len(loc) > 1 and _union_field(model, param):  # loc[1] names the union member tried
        members = list(dict.fromkeys(str(e["loc"][1]) for e in errors if e["loc"][:1] == loc[:1] and len(e["loc"]) > 1))
        message = f"{param}: must be {' or '.join(members)}{got}"
    else:
        message = f"{_where(loc) or 'body'}: {first['msg']}" + (got if first["type"] != "missing" else "")
    return OpenAIError(400, message, param=param)


def _where(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as a client writes it: ``messages[0].role``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _union_field(model: type[BaseModel], name: str) -> bool:
    """Whether ``model``'s field ``name`` takes values of several types (None aside)."""
    field = model.model_fields.get(name)
    if field is None or get_origin(field.annotation) not in (Union, types.UnionType):
        return False
    return len([arg for arg in get_args(field.annotation) if arg is not type(None)]) > 1


async def _respond(raw: Request, work: Coroutine[Any, Any, BaseModel | AsyncIterator[str]]) -> Response:
    """Run an endpoint's work, unless the client goes away first (then cancel it, which
    aborts its engine requests); a stream becomes server-sent events."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(raw))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        logger.info("client went away: %s %s cancelled", raw.method, raw.url.path)
        return Response(status_code=499)  # never delivered; the code nginx logs for it
    result = task.result()
    if isinstance(result, BaseModel):
        return _json(result)
    return StreamingResponse(result, media_type="text/event-stream")


async def _disconnected(raw: Request) -> None:
    """Return when the client disconnects (the body has been read: only that message is left)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _json(body: BaseModel, status: int = 200) -> Response:
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


async def _openai_error(request: Request, exc: OpenAIError) -> Response:
    logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc)
    return _json(exc.response(), exc.status)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's routing errors (404 unknown route, 405 wrong method) in OpenAI's shape."""
    reason = "Invalid URL" if exc.status_code == 404 else str(exc.detail)
    return await _openai_error(request, OpenAIError(exc.status_code, f"{reason} ({request.method} {request.url.path})"))


async def _internal_error(request: Request, exc: Exception) -> Response:
    """A bug: 500 with an OpenAI body (uvicorn logs the traceback)."""
    return _json(OpenAIError(500, f"Internal server error: {exc}", type="internal_server_error").response(), 500)


def _version() -> str:
    try:
        return version("furiosa-build")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's contents, or the template itself (text with Jinja tags);
    a name that is neither is a mistyped path, refused rather than rendered as text."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template: {value!r} is neither a file nor a Jinja template")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the (slow) artifact load so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None


def run_server(args: argparse.Namespace) -> None:
    """``serve``: load the artifact, listen, serve until SIGTERM or Ctrl-C (a KeyboardInterrupt
    after the requests in flight finished)."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.model = artifact_path(args)
    engine_args = AsyncEngineArgs.from_cli_args(args)  # checks every engine flag before the load
    chat_template = _chat_template(args.chat_template)
    sock = _bind(args.host, args.port)
    engine: AsyncLLMEngine = AsyncLLMEngine.from_engine_args(engine_args)
    config = ServerConfig(served_model_names=args.served_model_name or [args.model], api_key=args.api_key,
                          allowed_origins=args.allowed_origins or (), chat_template=chat_template,
                          max_body_bytes=args.max_body_bytes)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(build_app(engine, config), log_config=None, log_level=args.log_level, access_log=False))
    generator = engine.native_engine.artifact.generator_config
    buckets = "; ".join(f"{phase} " + ", ".join(f"{b.batch_size}x{b.attention_size}" for b in phase_buckets)
                        for phase, phase_buckets in (("prefill", generator.prefill_buckets), ("decode", generator.decode_buckets))
                        if phase_buckets)  # fmt: skip
    host, port = sock.getsockname()[:2]
    logger.info("serving %s as %s (task %s, buckets: %s, max_model_len %d) on http://%s:%d",
                args.model, ", ".join(config.served_model_names), engine.task_type, buckets, engine.max_model_len,
                f"[{host}]" if ":" in host else host, port)  # fmt: skip
    # uvicorn drains, then raises the signal again once its own handler is removed: this one
    # turns that SIGTERM into a normal return (exit 0), and one that arrives before uvicorn
    # installs its handler into a prompt, graceful stop.
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True))
    server.run(sockets=[sock])
    logger.info("server stopped")
