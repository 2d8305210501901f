"""``AsyncLLMEngine``: streaming generation for asyncio servers (vLLM's async API).

    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model="artifacts/tiny-llama"))
    async for output in engine.generate("Hello", SamplingParams(max_tokens=8), "request-1"):
        print(output.outputs[0].text)

One driver task runs the engine core's steps in a worker thread, so the event loop keeps
accepting requests while the simulator computes.  Requests and aborts go through a queue
that is applied under one lock: at once when no step is running, otherwise between two
steps, so the core is only ever touched from one thread at a time and an abort is never
left behind when the event loop ends mid-step.  The driver starts with the first request
and stops when nothing is left to do.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

from furiosa_runtime.engine.core import EngineStats
from furiosa_runtime.engine.inputs import PromptType
from furiosa_runtime.engine.outputs import RequestOutput
from furiosa_runtime.engine.pooling import Embedder, PoolingRequestOutput, encode_stream, require_task
from furiosa_runtime.engine.sampling_params import SamplingParams
from furiosa_runtime.entrypoints.llm_engine import LLMEngineBase

_ABORTED = None  # what a stream receives when its request is aborted


class AsyncLLMEngine(LLMEngineBase):
    """Receives requests and streams their outputs asynchronously."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException | None]] = {}
        self._commands: deque[tuple[str, Callable[[], object]]] = deque()  # applied under _core_lock
        self._core_lock = threading.Lock()  # held while the core runs a step or applies commands
        self._failures: list[tuple[str, Exception]] = []  # commands that raised, for their streams
        self._driver: asyncio.Task[None] | None = None
        self._stats = self.native_engine.stats()  # taken between steps, under _core_lock

    def __enter__(self) -> AsyncLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None  # owns nothing beyond the LLM that created it

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams, request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """Stream the outputs of one request as it advances, ending with the finished one.

        Closing the generator early (a client that disconnects) aborts the request.
        """
        self.try_add_request_id(request_id)
        try:  # in a worker thread: a long prompt's tokenization does not stall the other streams
            text, token_ids = await asyncio.to_thread(self._prepare, prompt, sampling_params)
        except BaseException:  # a bad request, or a client gone (cancelled) while it was tokenized
            self.try_remove_request_id(request_id)
            raise
        if request_id not in self.request_ids:  # aborted while it was tokenized
            return
        stream: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self._streams[request_id] = stream
        self._submit(request_id, lambda: self.native_engine.add_request(request_id, text, token_ids, sampling_params))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if item is _ABORTED:
                    return
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and request_id in self.request_ids:
                self._submit(request_id, lambda: self.native_engine.abort_request(request_id))
            self.try_remove_request_id(request_id)

    async def encode(
        self, prompt: PromptType, pooling_params: None = None, request_id: str = "embed-0"
    ) -> AsyncGenerator[PoolingRequestOutput, None]:
        """vLLM's ``encode`` for an embed artifact: yields the prompt's one, final pooled output.

        The NPU run happens in a worker thread (see ``furiosa_runtime.engine.pooling``); vLLM's
        ``PoolingParams`` are not supported yet, so ``pooling_params`` must be None.
        """
        if pooling_params is not None:
            raise ValueError("pooling_params: not supported yet (only None; the artifact's pooling config applies)")
        require_task(self.native_engine.artifact, "embed", "AsyncLLMEngine.encode")
        self.try_add_request_id(request_id)
        try:
            async for output in encode_stream(Embedder.of(self.native_engine), prompt, request_id):
                yield output
        finally:
            self.try_remove_request_id(request_id)

    async def abort(self, request_id: str) -> None:
        """Abort a request: its stream ends; unknown ids are ignored."""
        if not isinstance(request_id, str):
            raise ValueError(f"Request ID {request_id!r} must be a string.")
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put_nowait(_ABORTED)
        if request_id in self.request_ids:
            self._submit(request_id, lambda: self.native_engine.abort_request(request_id))
        self.try_remove_request_id(request_id)

    def stats(self) -> EngineStats:
        """The core's load and counters without waiting for a running step: read now when no
        step runs, otherwise the snapshot taken right after the last step."""
        if self._core_lock.acquire(blocking=False):
            try:
                self._stats = self.native_engine.stats()
            finally:
                self._core_lock.release()
        return self._stats

    def _submit(self, request_id: str, command: Callable[[], object]) -> None:
        """Queue a change to the core, apply it now unless a step is running, and make sure
        the driver is running."""
        self._commands.append((request_id, command))
        if self._core_lock.acquire(blocking=False):
            try:
                self._apply_commands()
            finally:
                self._core_lock.release()
        if self._driver is None or self._driver.done():
            self._driver = asyncio.get_running_loop().create_task(self._drive())

    async def _drive(self) -> None:
        """Step the core in a worker thread until no request is left, routing outputs."""
        while self._commands or self._failures or self.native_engine.has_unfinished_requests():
            try:
                outputs, failures = await asyncio.to_thread(self._step)
            except Exception as err:  # an engine failure ends every open stream with the error
                for stream in self._streams.values():
                    stream.put_nowait(err)
                return
            for request_id, item in [*failures, *((o.request_id, o) for o in outputs)]:
                stream = self._streams.get(request_id)
                if stream is not None:
                    stream.put_nowait(item)

    def _step(self) -> tuple[list[RequestOutput], list[tuple[str, Exception]]]:
        """Apply queued adds and aborts, run one core step, and apply what was queued
        meanwhile (in the worker thread); returns the outputs and the failed commands."""
        with self._core_lock:
            self._apply_commands()
            outputs = self.native_engine.step() if self.native_engine.has_unfinished_requests() else []
            self._apply_commands()
            self._stats = self.native_engine.stats()
            failures, self._failures = self._failures, []
        return outputs, failures

    def _apply_commands(self) -> None:
        """Run every queued command (the caller holds the lock); a command that fails is
        reported to its own request's stream only."""
        while self._commands:
            request_id, command = self._commands.popleft()
            try:
                command()
            except Exception as err:
                self._failures.append((request_id, err))
