"""Modelled serving: the engine's schedule on a workload, timed by the NPU's timing model.

``simulate`` runs the engine's own ``Scheduler`` and ``BlockManager`` (admission, buckets,
preemption, prefix caching) over a workload (``workload.py``), with no numerics: each step
lasts what the timing model says its bucket takes (``npu/step_times.py``, on the replicas
``replica_timer.py`` places the rows on), every scheduled row's token is computed, and a
request ends when it has its forced number of output tokens (``ignore_eos``).  It needs only
the artifact's programs, so shape-only artifacts (``build.weights=none``) simulate too.

``serve`` is the one driver of the modelled clock, shared by ``TimingCore`` and by the
functional engine (``EngineClock`` around an ``EngineCore``): a request whose arrival is
later than the clock waits; when nothing runs the clock jumps to the next arrival; every
step runs on the pipelined clock of ``replica_timer.py`` (with pipeline parallelism, the
steps of the scheduler's virtual engines overlap across stages; data-parallel replicas run
side by side), and a request's tokens come when its steps leave the last stage.  Given the
same requests, both cores make the same schedule and so report the same modelled times, to
the last bit (``tests/runtime/engine/test_simulate.py``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from furiosa_runtime.engine.block_manager import BlockManager
from furiosa_runtime.engine.core import EngineCore
from furiosa_runtime.engine.errors import validate_context_length
from furiosa_runtime.engine.outputs import RequestMetrics
from furiosa_runtime.engine.replica_timer import ReplicaTimer
from furiosa_runtime.engine.sampling_params import SamplingParams
from furiosa_runtime.engine.scheduler import Scheduler
from furiosa_runtime.engine.sequence import Sequence, Status
from furiosa_runtime.engine.serving_report import (
    RequestTiming,
    ServingReport,
    ServingStats,
)
from furiosa_runtime.engine.workload import (
    DISTRIBUTIONS,
    TimedRequest,
    WorkloadError,
    make_requests,
    parse_workload,
)
from furiosa_runtime.npu.artifact import Artifact, SchedulerConfig, open_artifact
from furiosa_runtime.npu.step_times import StepTimes, load_programs

#: The token a simulated step "generates": its value matters only to the prefix cache's
#: keys, and no two requests of a workload share a whole prompt.
OUTPUT_TOKEN = 0
#: Prompts per unit of concurrency (the largest decode batch of every virtual engine of every
#: data-parallel replica) when a distribution gives no count: the published methodology runs
#: ``num_prompts = 3 x concurrency`` requests offline.
PROMPTS_PER_SLOT = 3

#: Sampling of every request: greedy, and the output length is forced.
FORCED_LENGTH = {"temperature": 0.0, "ignore_eos": True}


class ServingCore(Protocol):
    """What ``serve`` drives: a modelled clock, requests in, steps, finished requests out."""

    npu_seconds: float

    def add(self, request: TimedRequest) -> None: ...

    def has_unfinished(self) -> bool: ...

    def wait_until(self, npu_time: float) -> None: ...

    def step(self) -> list[RequestTiming]: ...


def serve(core: ServingCore, requests: list[TimedRequest]) -> list[RequestTiming]:
    """Feed ``requests`` to ``core`` on its modelled clock and step it until all finish;
    the finished requests in the order they finished."""
    pending = deque(sorted(requests, key=lambda r: r.arrival))
    finished: list[RequestTiming] = []
    while pending or core.has_unfinished():
        if not core.has_unfinished() and pending[0].arrival > core.npu_seconds:
            core.wait_until(pending[0].arrival)
        while pending and pending[0].arrival <= core.npu_seconds:
            core.add(pending.popleft())
        finished += core.step()
    return finished


class TimingCore:
    """The engine's scheduler and block manager over an artifact, stepped without numerics."""

    def __init__(self, artifact: Artifact, times: StepTimes, scheduler_config: SchedulerConfig, enable_prefix_caching: bool = True) -> None:
        paged = artifact.generator_config.paged_attention_config
        self.blocks = BlockManager(paged.num_blocks, paged.block_size, enable_caching=enable_prefix_caching, replicas=times.mesh.dp)
        gen = artifact.generator_config
        self.timer = ReplicaTimer(artifact, times, self.blocks)
        self.scheduler = Scheduler(list(gen.prefill_buckets), list(gen.decode_buckets), self.blocks, scheduler_config,
                                   virtual_engines=times.mesh.pp, placement=self.timer)  # fmt: skip
        self.stats = ServingStats(self.blocks.num_usable)
        decode = [b.attention_size for b in gen.decode_buckets]
        self.max_model_len = min(max(decode), self.blocks.capacity_tokens)
        prefill = max(b.attention_size for b in gen.prefill_buckets)
        self.max_prompt_len = self.max_model_len if scheduler_config.prefill_chunk_size is not None else min(prefill, self.max_model_len)
        self.vocab_size = int(artifact.hf_config.get("vocab_size", 2**15))  # the prompt ids a workload may draw
        self._params = SamplingParams(**FORCED_LENGTH)  # one for every sequence: the scheduler reads it, no sampler does

    @classmethod
    def open(
        cls,
        artifact_path: str | Path,
        *,
        enable_prefix_caching: bool = True,
        scheduler_overrides: dict[str, Any] | None = None,
        devices: str | None = None,
        pipeline_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
    ) -> TimingCore:
        """The artifact's core as ``EngineCore`` would lay it out and schedule it (the same
        load-time settings); ``scheduler_overrides`` replace values of its scheduler config."""
        artifact, files = open_artifact(artifact_path)
        if artifact.model_metadata.task != "generate":
            raise ValueError(f"artifact: {artifact.metadata.name} is a {artifact.model_metadata.task} artifact; simulate serves generation")
        times = StepTimes(artifact, load_programs(files, artifact), devices=devices,
                          pipeline_parallel_size=pipeline_parallel_size, data_parallel_size=data_parallel_size)  # fmt: skip
        config = SchedulerConfig(**{**artifact.scheduler_config.model_dump(), **(scheduler_overrides or {})})
        return cls(artifact, times, config, enable_prefix_caching)

    def check(self, request: TimedRequest) -> None:
        """Raise the engine's context-length error for a request that does not fit."""
        prompt = len(request.prompt_token_ids)
        if prompt > self.max_prompt_len:
            validate_context_length(self.max_prompt_len, prompt, None)
        validate_context_length(self.max_model_len, prompt, request.output_tokens)

    def add(self, request: TimedRequest) -> None:
        metrics = RequestMetrics(arrival_time=0.0, npu_arrival_time=request.arrival)
        seq = Sequence(request.request_id, None, list(request.prompt_token_ids), self._params, None, request.output_tokens,
                       group_id=request.request_id, metrics=metrics)  # fmt: skip
        self.scheduler.add(seq)

    @property
    def npu_seconds(self) -> float:
        """The modelled clock: when every step so far has left the last stage (``ReplicaTimer.now``)."""
        return self.timer.now

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def wait_until(self, npu_time: float) -> None:
        self.timer.wait_until(npu_time)

    def step(self) -> list[RequestTiming]:
        """One scheduled step: its modelled time, then a token for every row that caught up
        (``EngineCore.step`` with the sampling left out).  The step counts in the statistics
        for what it moved the clock on (with pipelining, less than its own latency)."""
        batch = self.scheduler.schedule()
        assert batch is not None, "admission control guarantees every request can be scheduled"
        before = self.timer.now
        runs = self.timer.step(batch.bucket, batch.seqs)
        tokens = [end - start for start, end in batch.spans]
        self.stats.record([(bucket, sum(tokens[r] for r in rows)) for bucket, rows in runs], self.timer.now - before,
                          self.blocks.num_usable - self.blocks.num_free)  # fmt: skip
        finished = []
        for seq, (_, end) in zip(batch.seqs, batch.spans):
            self.scheduler.computed(seq, end)
            if end == seq.num_tokens and self._append(seq):
                finished.append(_timing(seq))
        return finished

    def _append(self, seq: Sequence) -> bool:
        """Add the row's token; finish the sequence at its length (True) as the engine does."""
        seq.output_token_ids.append(OUTPUT_TOKEN)
        sampled = self.timer.done(seq.group_id)
        if seq.metrics.npu_first_token_time is None:
            seq.metrics.npu_first_token_time = sampled
        if len(seq.output_token_ids) < seq.max_tokens and seq.num_tokens < self.max_model_len:
            return False
        seq.status = Status.FINISHED
        seq.metrics.npu_finished_time = sampled
        self.scheduler.finish(seq)
        self.timer.forget(seq.group_id)
        return True


def _timing(seq: Sequence) -> RequestTiming:
    m = seq.metrics
    assert m.npu_first_token_time is not None and m.npu_finished_time is not None
    return RequestTiming(seq.group_id, m.npu_arrival_time, m.npu_first_token_time, m.npu_finished_time,
                         len(seq.prompt_token_ids), len(seq.output_token_ids))  # fmt: skip


class EngineClock:
    """The functional engine (real numerics on the NPU simulator) as a ``ServingCore``: the
    same requests, greedy with forced lengths, on the engine's modelled clock."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    @property
    def npu_seconds(self) -> float:  # type: ignore[override]
        return self.core.npu_seconds

    def add(self, request: TimedRequest) -> None:
        params = SamplingParams(max_tokens=request.output_tokens, **FORCED_LENGTH)
        self.core.add_request(request.request_id, None, list(request.prompt_token_ids), params, npu_arrival_time=request.arrival)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished_requests()

    def wait_until(self, npu_time: float) -> None:
        self.core.wait_until(npu_time)

    def step(self) -> list[RequestTiming]:
        finished = []
        for out in self.core.step():
            if out.finished:
                m = out.metrics
                assert m is not None and m.npu_first_token_time is not None and m.npu_finished_time is not None
                finished.append(RequestTiming(out.request_id, m.npu_arrival_time, m.npu_first_token_time, m.npu_finished_time,
                                              len(out.prompt_token_ids or ()), len(out.outputs[0].token_ids)))  # fmt: skip
        return finished


def simulate(
    artifact_path: str | Path,
    workload: str,
    *,
    num_prompts: int | None = None,
    request_rate: float | None = None,
    seed: int = 0,
    shared_prefix: int = 0,
    enable_prefix_caching: bool = True,
    scheduler_overrides: dict[str, Any] | None = None,
    devices: str | None = None,
    pipeline_parallel_size: int | None = None,
    data_parallel_size: int | None = None,
) -> ServingReport:
    """Serve ``workload`` (``workload.py``'s grammar) on the artifact's modelled NPU and
    report what ``vllm bench serve`` would measure.

    ``num_prompts`` None draws ``PROMPTS_PER_SLOT`` x the largest decode batch of every
    virtual engine (one per pipeline stage) of every data-parallel replica from a
    distribution (a trace: all its lines).
    ``scheduler_overrides`` replace values of the artifact's scheduler config; the mesh
    settings are ``EngineCore``'s.  A workload that cannot be read, or has a request the
    artifact cannot hold, raises ``WorkloadError``.
    """
    core = TimingCore.open(artifact_path, enable_prefix_caching=enable_prefix_caching, scheduler_overrides=scheduler_overrides,
                           devices=devices, pipeline_parallel_size=pipeline_parallel_size, data_parallel_size=data_parallel_size)
    if num_prompts is None and workload.split(":", 1)[0] in DISTRIBUTIONS:
        scheduler = core.scheduler
        num_prompts = PROMPTS_PER_SLOT * scheduler.max_decode_batch * scheduler.virtual_engines * scheduler.replicas
    shapes = parse_workload(workload, num_prompts, request_rate, seed)
    requests = make_requests(shapes, core.vocab_size, shared_prefix, seed)
    rate = "" if request_rate is None else f", {'offline' if math.isinf(request_rate) else f'{request_rate:g} requests/s'}"
    return serve_report(core, requests, workload + rate)


def serve_report(core: TimingCore, requests: list[TimedRequest], label: str) -> ServingReport:
    """Serve ``requests`` on a fresh ``core`` and report it as ``simulate`` does (``label``
    names the workload); ``WorkloadError`` for a request the artifact cannot hold.  The
    bucket advisor (``furiosa_build/advise.py``) calls it on views of one artifact."""
    _check_fits(core, requests)
    with _quiet_preemptions():
        timings = serve(core, requests)
    hit_rate = core.scheduler.prefix_cache_hit_tokens / max(core.scheduler.prefix_cache_queried_tokens, 1)
    return ServingReport.of(label, timings, core.stats, core.npu_seconds, core.scheduler.num_preemptions, hit_rate)


@contextmanager
def _quiet_preemptions() -> Iterator[None]:
    """The scheduler warns at every preemption; the report counts them instead."""
    log = logging.getLogger("furiosa_runtime.engine.scheduler")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_fits(core: TimingCore, requests: list[TimedRequest]) -> None:
    """Refuse a workload with a request the artifact cannot hold, naming the first one."""
    for request in requests:
        try:
            core.check(request)
        except ValueError as err:
            raise WorkloadError(f"{request.request_id} ({len(request.prompt_token_ids)} prompt + {request.output_tokens} "
                                f"output tokens) does not fit the artifact: {err}") from None  # fmt: skip
