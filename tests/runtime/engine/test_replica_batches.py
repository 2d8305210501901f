"""Data-parallel replicas schedule as engines of their own: each admits up to its own limits
(``max_processing_samples``, the offline limit), and a step gives every replica with work its
own batch in the smallest bucket holding its rows, so the modelled throughput of an offline
workload grows with the replicas; the host still runs a step's batches of a phase as one
batch where a bucket holds them, and the tokens are one PE's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from furiosa_runtime import LLM, BeamSearchParams, SamplingParams, SchedulerConfig
from furiosa_runtime.engine.scheduler import Batch
from furiosa_runtime.engine.simulate import TimingCore, serve, serve_report
from furiosa_runtime.engine.workload import make_requests, parse_workload
from furiosa_runtime.npu.artifact import smallest_bucket

OFFLINE = {"is_offline": True}


def watch_steps(core: TimingCore) -> list[tuple[list[Batch], list[int]]]:
    """Record every step ``core``'s scheduler makes: its batches and how many sequences each
    replica runs (after the step's admissions); check that a batch's rows are its replica's."""
    scheduler, steps = core.scheduler, []
    schedule_step = scheduler.schedule_step

    def recorded() -> list[Batch]:
        batches = schedule_step()
        running = [sum(core.blocks.replica_of(s.request_id) == r for s in scheduler.running) for r in range(scheduler.replicas)]
        steps.append((batches, running))
        assert all(core.blocks.replica_of(s.request_id) == batch.replica for batch in batches for s in batch.seqs)
        return batches

    scheduler.schedule_step = recorded  # type: ignore[method-assign]
    return steps


@pytest.mark.parametrize(("overrides", "limit"), [(OFFLINE, 2), ({"max_processing_samples": 1}, 1)], ids=["offline", "max-samples-1"])
def test_each_replica_admits_up_to_its_own_limit_and_runs_its_own_batch(tiny_llama_artifact: Path, overrides: dict[str, Any], limit: int) -> None:
    """Four replicas of the tiny artifact (decode batches of at most 2 rows): offline, each
    runs up to one decode batch of sequences (2), with ``max_processing_samples=1`` one; so
    four times that are in flight, and every step gives each replica with work one batch of
    its own rows in the smallest bucket that holds them."""
    core = TimingCore.open(tiny_llama_artifact, devices="npu:0:0-3", scheduler_overrides=overrides)
    scheduler = core.scheduler
    assert scheduler.replicas == 4 and max(b.batch_size for b in scheduler.decode_buckets) == 2
    steps = watch_steps(core)
    serve(core, make_requests(parse_workload("uniform:4-30:4-24", 40, None, seed=1), core.vocab_size, seed=1))
    assert max(sum(running) for _, running in steps) == 4 * limit
    assert all(max(running) <= limit for _, running in steps)
    for batches, _ in steps:
        assert [b.replica for b in batches] == sorted({b.replica for b in batches})  # at most one batch per replica
        for batch in batches:
            buckets = scheduler.prefill_buckets if batch.phase == "prefill" else scheduler.decode_buckets
            assert batch.bucket == smallest_bucket(buckets, len(batch.seqs), max(end for _, end in batch.spans))
    assert any(len(batches) == 4 for batches, _ in steps)  # every replica busy at once


def test_offline_throughput_grows_with_the_replicas(tiny_llama_artifact: Path) -> None:
    """The modelled clock of 8 replicas (a whole device of the one-PE artifact) against one PE,
    offline, on enough requests to fill every replica's decode batches several times over."""
    requests = make_requests(parse_workload("fixed:16:32", 96, None), 512)
    one = serve_report(TimingCore.open(tiny_llama_artifact, scheduler_overrides=OFFLINE), requests, "offline")
    eight = serve_report(TimingCore.open(tiny_llama_artifact, devices="npu:0", scheduler_overrides=OFFLINE), requests, "offline")
    assert one.output_tokens == eight.output_tokens == 96 * 32
    assert eight.output_tokens_per_s > 6 * one.output_tokens_per_s


@pytest.mark.parametrize("overrides", [{}, OFFLINE], ids=["online", "offline"])
def test_replicas_generate_the_tokens_of_one_pe(tiny_llama_artifact: Path, overrides: dict[str, Any]) -> None:
    prompts = [{"prompt_token_ids": list(range(3 + i, 5 + i + (7 * i) % 23))} for i in range(20)]  # 2-24 tokens
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    config = SchedulerConfig(**overrides)
    one = LLM(tiny_llama_artifact, scheduler_config=config).generate(prompts, params, use_tqdm=False)
    eight = LLM(tiny_llama_artifact, devices="npu:0", scheduler_config=config)
    assert eight.engine.scheduler.replicas == 8
    assert [o.outputs[0].token_ids for o in eight.generate(prompts, params, use_tqdm=False)] == [o.outputs[0].token_ids for o in one]
    beams = BeamSearchParams(beam_width=2, max_tokens=6)
    want = LLM(tiny_llama_artifact).beam_search([[5, 9, 11], [7, 2]], beams)
    got = eight.beam_search([[5, 9, 11], [7, 2]], beams)
    assert [[s.tokens for s in o.sequences] for o in got] == [[s.tokens for s in o.sequences] for o in want]


def test_a_steps_batches_share_a_host_run_where_a_bucket_holds_them(tiny_llama_artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two replicas each run one row of their own (two 1-row batches on the modelled NPU).
    The host runs both decode rows as one batch of the 2-row bucket, but not the prompts: the
    2-row prefill bucket is twice as wide as theirs."""
    llm = LLM(tiny_llama_artifact, devices="npu:0:0-1")
    simulator = llm.engine.simulator
    runs: list[tuple[int, object]] = []
    run = simulator.run
    monkeypatch.setattr(simulator, "run", lambda bucket, feeds, replica=0: runs.append((bucket.batch_size, replica)) or run(bucket, feeds, replica))
    llm.generate([[5, 17, 33], [300, 2, 44, 12]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert runs == [(1, 0), (1, 1)] + [(2, [0, 1])] * 3  # the prompts' step in two host runs, every decode step in one
    assert llm.engine.scheduler.num_steps == 4
