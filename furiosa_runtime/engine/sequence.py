"""A request's state inside the engine: its sequences, tokens so far, sampling state, timing.

A request (``SequenceGroup``) holds one ``Sequence`` per sample it draws (``best_of``, or
``n``).  Each sequence has its own KV block table, keyed by ``Sequence.request_id``, which
is the request id itself for single-sample requests and ``"<request id>#<index>"``
otherwise, so the block manager and model runner never see two sequences under one key
(the samples' tables share the prompt's full blocks: the first sample prefills, the
others fork).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from furiosa_runtime.engine.outputs import RequestMetrics
from furiosa_runtime.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One stream of generated tokens.  ``num_computed_tokens`` of ``token_ids`` are in the
    KV cache; the next step computes from there (a prefill chunk or one decode token)."""

    request_id: str  # block-table key: unique per sequence
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    rng: np.random.Generator | None
    max_tokens: int
    group_id: str = ""  # the request this sequence samples for
    index: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, Any]] = field(default_factory=list)
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.time()))
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache instead of prefilled
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks so far
    admitted_at: int = -1  # scheduler step of admission (ties of the decode rotation)
    last_step: int = -1  # scheduler step of the last decode: decode batches rotate fairly

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.metrics.finished_time = time.time()


@dataclass
class SequenceGroup:
    """One request: its id, prompt, parameters, sequences and timing.

    With beam search ``seqs`` are the live beams (best first).  ``prompt_logprobs`` holds,
    when the request asks for them, the logprob dict of every prompt position (None for the
    first, which nothing predicts), filled as the prompt is computed.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Any] | None] = field(default_factory=list)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
