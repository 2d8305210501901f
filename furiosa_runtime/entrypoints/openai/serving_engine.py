"""What every endpoint shares: the model check, OpenAI-shaped errors, request metrics and
logging around the engine's streams, and server-sent events (``stream_events``: the loop
and tail of every streamed response, given how an endpoint turns a sample into a choice).

Each ``serving_*`` module subclasses ``OpenAIServing`` and turns one kind of request into
engine calls.  A bad request raises ``OpenAIError`` before anything reaches the engine
(the prompt is tokenized and checked against the buckets up front), so a streamed
response never starts with an error the client could have been told about in the status.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from pydantic import BaseModel

from furiosa_runtime.engine.errors import ContextLengthExceededError
from furiosa_runtime.engine.outputs import CompletionOutput, Logprob, RequestOutput
from furiosa_runtime.engine.sampling_params import SamplingParams
from furiosa_runtime.entrypoints.async_llm_engine import AsyncLLMEngine
from furiosa_runtime.entrypoints.openai.metrics import ServerMetrics
from furiosa_runtime.entrypoints.openai.protocol import ErrorInfo, ErrorResponse, ModelCard, OpenAIRequest, usage

logger = logging.getLogger(__name__)

_SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class ServerConfig:
    """The operator's choices beyond the engine's own settings."""

    served_model_names: Sequence[str]  # the first one names the model in responses
    api_key: str | None = None  # required as "Authorization: Bearer <key>" on /v1/* when set
    allowed_origins: Sequence[str] = ()  # CORS origins; none: no CORS headers
    chat_template: str | None = None  # replaces the tokenizer's template (source text)
    # Larger request bodies are refused (413) before they are parsed or tokenized (which
    # blocks the event loop, about 2 s per MB of text): 4 MiB holds a 128k-token prompt
    # several times over, and more than OpenAI's 300k tokens of one embeddings request.
    max_body_bytes: int = 4 * 2**20


class OpenAIError(Exception):
    """An error reply: HTTP status plus OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=self.info)


def bad_request(err: ValueError, request: OpenAIRequest, prompt_field: str) -> OpenAIError:
    """A 400 for a ValueError raised while preparing ``request``: the context-length errors
    name ``prompt_field`` (or the length limit that does not fit); otherwise the field the
    message starts with, by the request's name for it (``temperature must be ...``; chat's
    ``n`` for ``best_of``, the prompt's field for the engine's ``prompt_token_ids``), when the
    request has it; a renamed field is renamed in the message too."""
    message = " ".join(str(err).split())
    if isinstance(err, ContextLengthExceededError):
        fits = err.prompt_tokens < err.max_model_len
        limit = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) is not None else "max_tokens"
        param = limit if fits and err.max_completion_tokens is not None else prompt_field
        return OpenAIError(400, message, param=param, code="context_length_exceeded")
    lead = re.match(r"[a-z_]+", message)
    name = type(request).engine_names.get(lead[0], lead[0]) if lead else None
    if lead and name != lead[0]:
        message = f"{name}{message[lead.end():]}"
    param = name if name in type(request).model_fields else None
    return OpenAIError(400, message, param=param)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(body: BaseModel) -> str:
    """One server-sent event carrying ``body`` as JSON."""
    return f"data: {body.model_dump_json()}\n\n"


def _sse_error(err: Exception) -> str:
    """The event that ends a stream the engine failed in the middle of (status already sent)."""
    logger.error("stream failed: %s", err, exc_info=err)
    return sse(OpenAIError(500, f"internal error: {err}", type="internal_server_error").response())


def token_text(token_id: int, logprob: Logprob, as_ids: bool) -> str:
    """How a logprob names its token: its text, or ``token_id:<id>`` when asked (or when
    the artifact has no tokenizer to decode it with)."""
    return f"token_id:{token_id}" if as_ids or logprob.decoded_token is None else logprob.decoded_token


@dataclass
class RequestRecord:
    """One engine request as the server saw it, for metrics and the finished-request log."""

    request_id: str
    prompt_tokens: int
    received_at: float  # time.time() when the HTTP request arrived
    completion_tokens: dict[int, int] = field(default_factory=dict)  # per sample index
    first_token_time: float | None = None
    finish_reasons: list[str] = field(default_factory=list)

    def update(self, output: RequestOutput) -> None:
        for completion in output.outputs:  # deltas or one final output: adding counts both right
            self.completion_tokens[completion.index] = self.completion_tokens.get(completion.index, 0) + len(completion.token_ids)
        if output.metrics is not None and output.metrics.first_token_time is not None:
            self.first_token_time = output.metrics.first_token_time
        if output.finished:
            self.finish_reasons = [c.finish_reason or "stop" for c in output.outputs]


class OpenAIServing:
    """The engine, the served names and the metrics, shared by the endpoint handlers."""

    def __init__(self, engine: AsyncLLMEngine, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.model_name = config.served_model_names[0]

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.model_name, root=str(self.engine.model_path), max_model_len=self.engine.max_model_len)

    def check_model(self, model: str, task: str) -> None:
        """404 for a model this server does not serve; 400 for an endpoint of another task."""
        if model not in self.config.served_model_names:
            raise OpenAIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")
        if self.engine.task_type != task:
            raise OpenAIError(400, f"The model `{model}` serves task={self.engine.task_type}; this endpoint needs task={task}.",
                              param="model")  # fmt: skip

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The engine's own checks (buckets, context length, vocabulary), before the request is queued."""
        self.engine.native_engine.validate_request(prompt_token_ids, params)

    async def generate(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams, received_at: float
    ) -> AsyncGenerator[RequestOutput, None]:
        """The engine's outputs for one request; when the stream ends (finished, or closed
        because the client went away, which aborts the request) the request is counted in
        the metrics and logged."""
        record = RequestRecord(request_id, len(prompt_token_ids), received_at)
        inputs = {"prompt_token_ids": prompt_token_ids} if prompt is None else {"prompt": prompt, "prompt_token_ids": prompt_token_ids}
        try:
            async with aclosing(self.engine.generate(inputs, params, request_id)) as outputs:
                async for output in outputs:
                    record.update(output)
                    yield output
        finally:
            self.finish(record)

    def finish(self, record: RequestRecord) -> None:
        """Count an ended request in the metrics and log it (one INFO line)."""
        now = time.time()
        reasons = record.finish_reasons or ["abort"]
        completion = sum(record.completion_tokens.values())
        ttft = None if record.first_token_time is None else record.first_token_time - record.received_at
        longest = max(record.completion_tokens.values(), default=0)
        tpot = (now - record.first_token_time) / (longest - 1) if record.first_token_time is not None and longest > 1 else None
        self.metrics.observe(record.prompt_tokens, completion, reasons[0], ttft=ttft, tpot=tpot, e2e=now - record.received_at)
        logger.info("request %s %s: %d prompt + %d completion tokens, TTFT %s, e2e %.3f s",
                    record.request_id, "aborted" if not record.finish_reasons else f"finished ({', '.join(sorted(set(reasons)))})",
                    record.prompt_tokens, completion, "-" if ttft is None else f"{ttft:.3f} s", now - record.received_at)  # fmt: skip


def _new_completions(output: RequestOutput, done: set[int]) -> list[CompletionOutput]:
    """The samples of a streamed (delta) output that have something to send: new tokens or
    their finish; ``done`` collects the finished ones, which later outputs repeat empty."""
    fresh = [c for c in output.outputs if c.index not in done and (c.token_ids or c.text or c.finish_reason is not None)]
    done.update(c.index for c in fresh if c.finish_reason is not None)
    return fresh


async def stream_events(head: BaseModel, outputs: AsyncGenerator[tuple[int, RequestOutput], None],
                        choice: Callable[[int, CompletionOutput], BaseModel], prompt_tokens: int, include_usage: bool,
                        opening: Sequence[BaseModel] = ()) -> AsyncIterator[str]:  # fmt: skip
    """A streamed response's server-sent events: ``head`` (a chunk with no choices) carrying
    the ``opening`` choices, if any; then, per engine output with something new, the choices
    ``choice`` makes of its samples (given the index of the output's stream in ``merge``);
    the usage when asked; an error event if the engine fails midway; ``[DONE]``.  Closing
    the events (a client gone) closes ``outputs``, which aborts their requests."""
    if opening:
        yield sse(head.model_copy(update={"choices": list(opening)}))
    done: dict[int, set[int]] = {}  # stream index -> finished sample indexes
    completion_tokens = 0
    try:
        async with aclosing(outputs):
            async for index, output in outputs:
                fresh = _new_completions(output, done.setdefault(index, set()))
                completion_tokens += sum(len(c.token_ids) for c in fresh)
                if fresh:
                    yield sse(head.model_copy(update={"choices": [choice(index, c) for c in fresh]}))
        if include_usage:
            yield sse(head.model_copy(update={"usage": usage(prompt_tokens, completion_tokens)}))
    except Exception as err:
        yield _sse_error(err)
    yield _SSE_DONE


async def merge(streams: Sequence[AsyncGenerator[RequestOutput, None]]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Interleave several requests' streams as their outputs arrive, tagged with the index
    of their stream; closing the merged stream closes (so aborts) all of them."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for output in only:
                yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async with aclosing(stream) as outputs:
                async for output in outputs:
                    queue.put_nowait((index, output))
            queue.put_nowait(None)
        except Exception as err:
            queue.put_nowait(err)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
