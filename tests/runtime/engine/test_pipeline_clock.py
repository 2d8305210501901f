"""The pipelined modelled clock (``engine/replica_timer.py``): with pipeline stages on several
PEs the steps of the scheduler's virtual engines overlap, so an offline workload runs at the
rate of the slowest stage; one request's steps never overlap; one stage keeps the serial
clock to the bit; data-parallel replicas do not wait for each other; and the functional
engine's clock still equals ``simulate``'s.
"""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path
from typing import Any

import pytest

from furiosa_runtime import LLM, SamplingParams
from furiosa_runtime.engine.core import EngineCore
from furiosa_runtime.engine.replica_timer import ReplicaRun
from furiosa_runtime.engine.sequence import Sequence
from furiosa_runtime.engine.simulate import EngineClock, TimingCore, serve, serve_report
from furiosa_runtime.engine.workload import Shape, TimedRequest, make_requests, parse_workload
from furiosa_runtime.npu.artifact import Bucket, open_artifact
from furiosa_runtime.npu.step_times import StepTimes, load_programs
from furiosa_runtime.npu.timing import StageTimes
from tests.helpers import build

#: Each pipeline-parallel layout of the deep artifact: one PE per stage.
STAGES = {1: "npu:0:0", 2: "npu:0:0-1", 4: "npu:0:0-3"}


@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """tiny-llama with 16 layers, shape-only, with room for every request of the offline
    workload: a stage's compute outweighs the transfers between stages (a few microseconds)."""
    out = tmp_path_factory.mktemp("pipeline") / "deep-tiny"
    build(["model=tiny-llama", "buckets=tiny", "model.hf_config.num_hidden_layers=16", "build.weights=none",
           "buckets.paged_attention_num_blocks=128"], out, cache_dir)  # fmt: skip
    return out


def stage_times(path: Path, pp: int) -> dict[Bucket, StageTimes]:
    """Every bucket's step, stage by stage, with ``pp`` stages."""
    artifact, files = open_artifact(path)
    times = StepTimes(artifact, load_programs(files, artifact), devices=STAGES[pp], pipeline_parallel_size=pp)
    return {p.bucket: times.stages[p.name] for p in artifact.pipelines}


def offline(path: Path, pp: int, spec: str = "fixed:8:32", num_prompts: int = 96) -> tuple[TimingCore, list[TimedRequest]]:
    """The deep artifact over ``pp`` stages serving ``spec`` offline."""
    core = TimingCore.open(path, devices=STAGES[pp], pipeline_parallel_size=pp, scheduler_overrides={"is_offline": True})
    return core, make_requests(parse_workload(spec, num_prompts, None), core.vocab_size)


def test_one_stage_keeps_the_serial_clock(tiny_llama_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without pipeline stages each step starts when the previous one ends: the clock and every
    request's token times are running sums of the step latencies, bit for bit."""
    core = TimingCore.open(tiny_llama_artifact)
    latencies: list[float] = []
    step = core.timer.step

    def timed(bucket: Bucket, seqs: list[Sequence]) -> list[ReplicaRun]:
        latencies.append(core.timer.seconds(bucket, core.timer.place(seqs)))
        return step(bucket, seqs)

    monkeypatch.setattr(core.timer, "step", timed)
    timings = serve(core, make_requests(parse_workload("uniform:4-30:1-24", 10, None, seed=2), 512, seed=2))
    clock = list(accumulate(latencies))
    assert core.npu_seconds == clock[-1]
    assert all(t.first_token in clock and t.finished in clock for t in timings)


@pytest.mark.parametrize("pp", [2, 4])
def test_a_lone_request_waits_for_every_stage(deep_tiny: Path, pp: int) -> None:
    """A request's next step needs its previous token: alone, nothing overlaps, and its time to
    first token and per output token are the sums of the stage and transfer times."""
    core, [request] = offline(deep_tiny, pp, "fixed:8:4", 1)
    [timing] = serve(core, [request])
    times = stage_times(deep_tiny, pp)
    assert timing.ttft == pytest.approx(times[Bucket.prefill(1, 32)].seconds)
    assert timing.tpot == pytest.approx(times[Bucket.decode(1, 64)].seconds)


@pytest.mark.parametrize("pp", [2, 4])
def test_offline_throughput_approaches_the_slowest_stage(deep_tiny: Path, pp: int) -> None:
    """With ``pp`` virtual engines in flight, a step leaves the pipeline about every slowest
    stage's time, not every sum of the stages: about ``pp`` times the one-stage throughput."""
    core, requests = offline(deep_tiny, pp)
    report = serve_report(core, requests, "offline")
    one_stage = serve_report(*offline(deep_tiny, 1), "offline")
    assert report.steps == one_stage.steps  # the same work, in as many steps
    times = stage_times(deep_tiny, pp).values()
    per_step = report.duration_s / report.steps
    assert min(max(t.busy) for t in times) < per_step < 1.2 * max(max(t.busy) for t in times)
    assert per_step < 1.2 * min(t.seconds for t in times) / pp
    assert report.output_tokens_per_s > 0.8 * pp * one_stage.output_tokens_per_s


@pytest.mark.parametrize("rate", [None, 4000.0], ids=["offline", "poisson"])
def test_the_engine_clock_equals_simulate_over_stages_and_replicas(tiny_llama_artifact: Path, rate: float | None) -> None:
    """Two pipeline stages of two replicas (four PEs): the same schedule and clock in both cores."""
    requests = make_requests(parse_workload("uniform:4-30:1-24", 12, rate, seed=3), 512, seed=3)
    layout: dict[str, Any] = {"devices": "npu:0:0-3", "pipeline_parallel_size": 2}
    timing, engine = TimingCore.open(tiny_llama_artifact, **layout), EngineCore(tiny_llama_artifact, seed=0, **layout)
    assert (engine.scheduler.virtual_engines, engine.runner.timer.replicas) == (timing.scheduler.virtual_engines, timing.timer.replicas) == (2, 2)
    assert serve(timing, requests) == serve(EngineClock(engine), requests)
    assert timing.npu_seconds == engine.npu_seconds


def test_virtual_engines_change_no_token(tiny_llama_artifact: Path) -> None:
    """Splitting the running requests over two virtual engines changes the batches, not the tokens."""
    prompts = [{"prompt_token_ids": list(range(3 + i, 9 + 2 * i))} for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    one = LLM(tiny_llama_artifact).generate(prompts, params, use_tqdm=False)
    two = LLM(tiny_llama_artifact, devices="npu:0:0-1", pipeline_parallel_size=2)
    assert two.engine.scheduler.virtual_engines == 2
    assert [o.outputs[0].token_ids for o in two.generate(prompts, params, use_tqdm=False)] == [o.outputs[0].token_ids for o in one]


def test_a_prefill_on_one_replica_does_not_hold_the_other(tiny_llama_artifact: Path) -> None:
    """Replicas are separate devices: a request arriving mid-way is prefilled on the other
    replica, and the first request's tokens come exactly when they would alone.  On one
    replica the same arrival delays them."""

    def first_request(devices: str, second: bool) -> float:
        core = TimingCore.open(tiny_llama_artifact, devices=devices)
        shapes = [Shape(0.0, 8, 12)] + ([Shape(alone.first_token, 8, 2)] if second else [])
        return next(t.finished for t in serve(core, make_requests(shapes, core.vocab_size)) if t.request_id == "req-0")

    [alone] = serve(TimingCore.open(tiny_llama_artifact, devices="npu:0:0-1"), make_requests([Shape(0.0, 8, 12)], 512))
    assert first_request("npu:0:0-1", second=True) == first_request("npu:0:0-1", second=False) == alone.finished
    assert first_request("npu:0:0", second=True) > first_request("npu:0:0", second=False)
