"""Modelled serving: workloads, the timing-only core against the functional engine, the command.

The central promise: on the same requests, ``simulate``'s core (scheduler and block manager,
no numerics) and the functional engine (every step executed on the NPU simulator) make the
same schedule, so every request's modelled arrival, first token and finish, and the total
modelled time, are equal to the last bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from furiosa_runtime.engine.core import EngineCore
from furiosa_runtime.engine.simulate import EngineClock, TimingCore, serve, simulate
from furiosa_runtime.engine.workload import (
    Shape,
    WorkloadError,
    make_requests,
    parse_workload,
)
from furiosa_runtime.entrypoints.cli import main
from furiosa_runtime.npu.artifact import open_artifact
from furiosa_runtime.npu.simulator import NPUSimulator
from furiosa_runtime.npu.step_times import StepTimes, load_programs
from tests.helpers import build

# -- workloads ------------------------------------------------------------------------------


def test_fixed_and_uniform_lengths() -> None:
    assert parse_workload("fixed:128:4096", 3, None) == [Shape(0.0, 128, 4096)] * 3
    shapes = parse_workload("uniform:10-20:5", 200, None, seed=1)
    assert {s.prompt_tokens for s in shapes} == set(range(10, 21)) and {s.output_tokens for s in shapes} == {5}


@pytest.mark.parametrize("kind", ["normal", "lognormal"])
def test_distributions_have_the_mean_and_std_asked_for(kind: str) -> None:
    shapes = parse_workload(f"{kind}:500,100:200,50", 20000, None, seed=0)
    prompt = np.array([s.prompt_tokens for s in shapes])
    output = np.array([s.output_tokens for s in shapes])
    assert abs(prompt.mean() - 500) < 5 and abs(prompt.std() - 100) < 5
    assert abs(output.mean() - 200) < 3 and abs(output.std() - 50) < 3 and output.min() >= 1


def test_poisson_arrivals_are_seeded_at_the_rate_asked_for() -> None:
    shapes = parse_workload("fixed:8:8", 5000, 50.0, seed=3)
    arrivals = [s.arrival for s in shapes]
    assert arrivals == sorted(arrivals) and abs(arrivals[-1] / len(arrivals) - 1 / 50) < 1e-3
    assert shapes == parse_workload("fixed:8:8", 5000, 50.0, seed=3) != parse_workload("fixed:8:8", 5000, 50.0, seed=4)
    assert {s.arrival for s in parse_workload("fixed:8:8", 4, math.inf)} == {0.0}


def test_a_trace_keeps_its_arrivals_and_takes_vllm_field_names(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"arrival": 0.5, "prompt_tokens": 12, "output_tokens": 3}\n\n'
                     '{"timestamp": 0.25, "input_len": 7, "output_len": 9}\n{"prompt_len": 4, "output_tokens": 1}\n')
    assert parse_workload(str(trace), None, None) == [Shape(0.0, 4, 1), Shape(0.25, 7, 9), Shape(0.5, 12, 3)]
    assert parse_workload(str(trace), 1, math.inf) == [Shape(0.0, 12, 3)]


def test_prompts_share_the_prefix_asked_for_and_nothing_else() -> None:
    requests = make_requests([Shape(0.0, 20, 4), Shape(0.0, 6, 4), Shape(0.0, 20, 4)], 512, shared_prefix=8)
    first, short, last = (r.prompt_token_ids for r in requests)
    assert first[:8] == last[:8] and first[8:] != last[8:] and short[:5] == first[:5] and len(short) == 6


BAD_WORKLOADS = [
    ("fixed:128", "fixed:128: expected fixed:IN:OUT"),
    ("fixed:0:5", "fixed:0:5: '0' is not a token count >= 1"),
    ("uniform:9-3:5", "uniform:9-3:5: range 9-3 is empty"),
    ("normal:abc:1,1", "normal:abc:1,1: expected normal:MEAN,STD:MEAN,STD, got 'abc'"),
    ("lognormal:0,1:5,1", "lognormal:0,1:5,1: mean must be >= 1 and std >= 0, got 0,1"),
    ("nosuch:1:2", "'nosuch:1:2' is neither a file nor a distribution; expected fixed:IN:OUT, uniform:LO-HI:LO-HI"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_WORKLOADS)
def test_a_bad_spec_is_one_line(spec: str, message: str) -> None:
    with pytest.raises(WorkloadError) as err:
        parse_workload(spec, 4, None)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(("text", "message"), [
    ("not json\n", ":1: not JSON"),
    ('{"prompt_tokens": 3}\n', ":1: missing output_tokens (or output_len)"),
    ('{"prompt_tokens": 3, "output_tokens": 2}\n{"prompt_tokens": 0, "output_tokens": 2}\n', ":2: prompt_tokens must be a token count >= 1, got 0"),
    ('{"prompt_tokens": 3, "output_tokens": 2, "arrival": -1}\n', ":1: arrival must be seconds >= 0, got -1"),
    ("[1, 2]\n", ":1: expected an object"),
    ("\n", ": the trace has no requests"),
])  # fmt: skip
def test_a_bad_trace_names_its_line(tmp_path: Path, text: str, message: str) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(text)
    with pytest.raises(WorkloadError, match="^" + str(trace)) as err:
        parse_workload(str(trace), None, None)
    assert str(err.value) == f"{trace}{message}" or str(err.value).startswith(f"{trace}{message}")


# -- the timing-only core against the functional engine ------------------------------------

#: (workload, request rate): offline with preemptions (the tiny artifact holds 16 KV blocks),
#: and Poisson arrivals sparse enough that the clock idles between some of them.
CLOCK_WORKLOADS = [("uniform:4-30:1-24", None), ("uniform:4-30:1-24", 4000.0)]


@pytest.mark.parametrize(("spec", "rate"), CLOCK_WORKLOADS)
@pytest.mark.parametrize("caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_the_functional_engine_clock_equals_simulate(engine_artifact: Path, spec: str, rate: float | None, caching: bool) -> None:
    requests = make_requests(parse_workload(spec, 10, rate, seed=2), 512, shared_prefix=10, seed=2)
    timing = TimingCore.open(engine_artifact, enable_prefix_caching=caching)
    engine = EngineCore(engine_artifact, seed=0, enable_prefix_caching=caching)
    modelled, functional = serve(timing, requests), serve(EngineClock(engine), requests)
    assert modelled == functional  # every request's arrival, first token and finish, in finishing order, bit for bit
    assert timing.npu_seconds == engine.npu_seconds
    assert timing.scheduler.num_preemptions == engine.scheduler.num_preemptions
    assert timing.scheduler.prefix_cache_hit_tokens == engine.scheduler.prefix_cache_hit_tokens
    assert timing.scheduler.prefix_cache_hit_tokens > 0 or not caching  # the shared prefix is found


def test_the_clocks_agree_over_data_parallel_replicas(tiny_llama_artifact: Path) -> None:
    requests = make_requests(parse_workload("uniform:4-30:1-24", 12, None, seed=5), 512, seed=5)
    timing = TimingCore.open(tiny_llama_artifact, devices="npu:0:0-1")
    engine = EngineCore(tiny_llama_artifact, devices="npu:0:0-1")
    assert timing.timer.replicas == engine.simulator.mesh.dp == 2
    assert serve(timing, requests) == serve(EngineClock(engine), requests)
    assert timing.npu_seconds == engine.npu_seconds


def test_step_times_without_weights_are_the_simulators(tiny_llama_layouts: dict[str, Path]) -> None:
    for path in tiny_llama_layouts.values():
        artifact, files = open_artifact(path)
        for settings in ({}, {"devices": "npu:0"}, {"devices": "npu:0", "pipeline_parallel_size": 1},
                         {"devices": "npu:0", "pipeline_parallel_size": 2}):  # fmt: skip
            simulator = NPUSimulator(files, artifact, **settings)
            assert StepTimes(artifact, load_programs(files, artifact), **settings).seconds == simulator.step_seconds


# -- the command ----------------------------------------------------------------------------


def test_simulate_prints_and_writes_the_report(tiny_llama_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    assert main(["simulate", str(tiny_llama_artifact), "--workload", "fixed:8:8", "--num-prompts", "500", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("workload: fixed:8:8 (500 requests, 4,000 prompt and 4,000 output tokens)")
    report = json.loads(out.read_text())
    assert report["requests"] == 500 and report["output_tokens"] == 4000
    assert report["output_tokens_per_s"] == pytest.approx(4000 / report["duration_s"])
    assert 0 < report["ttft_ms"]["p50"] <= report["ttft_ms"]["p90"] <= report["ttft_ms"]["p99"]
    assert {b["bucket"] for b in report["buckets"]} <= {"prefill 1x32", "prefill 2x64", "decode 1x64", "decode 2x64"}
    assert all(0 <= b["padding"] < 1 for b in report["buckets"]) and report["kv_blocks_peak"] <= report["kv_blocks_total"]


def test_offline_defaults_to_three_prompts_per_decode_slot(tiny_llama_artifact: Path) -> None:
    report = simulate(tiny_llama_artifact, "fixed:8:8")
    assert report.requests == 3 * 2  # the largest tiny decode bucket holds 2 rows


def test_a_shape_only_artifact_simulates(tmp_path: Path, cache_dir: Path) -> None:
    shape_only = tmp_path / "shape"
    build(["model=tiny-llama", "buckets=tiny", "build.weights=none"], shape_only, cache_dir)
    report = simulate(shape_only, "uniform:4-30:1-24", num_prompts=50, request_rate=2000.0)
    assert report.requests == 50 and report.output_tokens_per_s > 0


@pytest.mark.parametrize(("workload", "message"), [
    ("fixed:8", "error: --workload: fixed:8: expected fixed:IN:OUT"),
    ("fixed:40:40", ("error: --workload: req-0 (40 prompt + 40 output tokens) does not fit the artifact: This model's maximum "
                     "context length is 64 tokens")),
])  # fmt: skip
def test_a_bad_workload_is_one_line_and_status_2(tiny_llama_artifact: Path, capsys: pytest.CaptureFixture[str], workload: str, message: str) -> None:
    assert main(["simulate", str(tiny_llama_artifact), "--workload", workload]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
