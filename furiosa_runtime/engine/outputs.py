"""vLLM-compatible request outputs: what `LLM.generate` returns and engines stream.

Field names and order follow vLLM's `vllm.outputs` so that client code (and the OpenAI
server glue) written for vLLM reads these objects unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CompletionOutput", "Logprob", "RequestMetrics", "RequestOutput"]


@dataclass
class Logprob:
    """The log-probability of one token at one position (vLLM's `Logprob`).

    `rank` is 1 for the most likely token; `decoded_token` is its text.
    """

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    `finish_reason` is None while the sequence is still growing, then `"stop"` (EOS, a
    stop token or a stop string) or `"length"` (max_tokens or the context limit).
    `stop_reason` says which stop fired: the stop string, the stop token id, or None
    for EOS / length.
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        """True once the sequence has a finish reason."""
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (seconds, `time.time()`) of one request's life.

    Everything but `arrival_time` is filled in by the engine as the request advances.
    The `npu_*` fields are the same moments on the engine's modelled NPU clock: seconds
    of modelled step latency since the engine started (`furiosa_runtime/npu/timing.py`), what
    the request would see on the hardware rather than in the simulator.
    """

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    npu_arrival_time: float = 0.0
    npu_first_token_time: float | None = None
    npu_finished_time: float | None = None

    @property
    def time_in_queue(self) -> float | None:
        """Seconds between arrival and first scheduling."""
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds between arrival and the first generated token (TTFT)."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def npu_time_to_first_token(self) -> float | None:
        """Modelled NPU seconds between arrival and the first generated token."""
        if self.npu_first_token_time is None:
            return None
        return self.npu_first_token_time - self.npu_arrival_time


@dataclass
class RequestOutput:
    """The state of one request: prompt, its completions so far, and timing.

    With `RequestOutputKind.DELTA` each streamed `RequestOutput` carries only the new
    text and token ids; otherwise the completions are cumulative.  `num_cached_tokens`
    counts the prompt tokens whose KV came from the prefix cache instead of a prefill.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[dict[int, Any] | None] | None = field(default=None, repr=False)
    num_cached_tokens: int | None = None
