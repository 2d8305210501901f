"""Scheduler: phase and bucket choice, admission limits, chunked prefill, preemption.

Pure bookkeeping: no simulator runs; each test plays the engine's part by marking the
scheduled span computed and appending a token where a row caught up.
"""

from __future__ import annotations

import pytest

from furiosa_runtime.engine.block_manager import BlockManager
from furiosa_runtime.engine.sampling_params import SamplingParams
from furiosa_runtime.engine.scheduler import Batch, Scheduler
from furiosa_runtime.engine.sequence import Sequence
from furiosa_runtime.npu.artifact import Bucket, SchedulerConfig

PREFILL = [Bucket.prefill(1, 16), Bucket.prefill(2, 32)]
DECODE = [Bucket.decode(1, 64), Bucket.decode(4, 64)]


def make(num_blocks: int = 65, block_size: int = 4, **config) -> Scheduler:
    config = {"spare_blocks_ratio": 0.0, **config}
    return Scheduler(PREFILL, DECODE, BlockManager(num_blocks, block_size), SchedulerConfig(**config))


def seq(name: str, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(name, None, list(range(1, prompt_len + 1)), SamplingParams(temperature=0), None, max_tokens)


def advance(batch: Batch) -> None:
    """What the engine does after a step: spans computed, a token where a row caught up."""
    for s, (_, end) in zip(batch.seqs, batch.spans):
        s.num_computed_tokens = end
        if end == s.num_tokens:
            s.output_token_ids.append(7)


def test_prefill_first_in_the_smallest_bucket_then_decode_together() -> None:
    sched = make()
    for name, length in [("a", 10), ("b", 20)]:
        sched.add(seq(name, length))
    batch = sched.schedule()
    assert batch.phase == "prefill" and batch.bucket == Bucket.prefill(2, 32)
    assert batch.spans == [(0, 10), (0, 20)]
    advance(batch)
    batch = sched.schedule()
    assert batch.phase == "decode" and batch.bucket == Bucket.decode(4, 64)
    assert batch.spans == [(10, 11), (20, 21)]
    sched.blocks.check_invariants()


def test_a_single_short_prompt_takes_the_smallest_prefill_bucket() -> None:
    sched = make()
    sched.add(seq("a", 5))
    assert sched.schedule().bucket == Bucket.prefill(1, 16)


def test_max_processing_samples_caps_running_and_batch() -> None:
    sched = make(max_processing_samples=1)
    sched.add(seq("a", 4))
    sched.add(seq("b", 4))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a"] and len(sched.running) == 1
    advance(batch)
    assert [s.request_id for s in sched.schedule().seqs] == ["a"]  # b waits until a finishes


def test_spare_blocks_hold_back_admission_while_others_run() -> None:
    sched = make(num_blocks=11, spare_blocks_ratio=0.5)  # 10 usable, 5 spare while running
    sched.add(seq("a", 16))  # 4 blocks: admitted (nothing running, no spare)
    sched.add(seq("b", 8))  # 2 blocks: 6 - 2 = 4 < 5 spare, so it waits
    sched.schedule()
    assert [s.request_id for s in sched.running] == ["a"] and len(sched.waiting) == 1


def test_offline_mode_admits_only_a_decode_batch() -> None:
    online, offline = make(), make(is_offline=True)
    for sched in (online, offline):
        for i in range(6):
            sched.add(seq(f"r{i}", 4))
        sched.schedule()
    assert len(online.running) == 6
    assert len(offline.running) == 4  # the largest decode batch


def test_decode_rotates_when_more_run_than_a_batch_holds() -> None:
    sched = make()
    for i in range(6):
        sched.add(seq(f"r{i}", 4))
    while (batch := sched.schedule()).phase == "prefill":
        advance(batch)
    first = {s.request_id for s in batch.seqs}
    advance(batch)
    second = {s.request_id for s in sched.schedule().seqs}
    assert len(first) == 4 and {"r4", "r5"} <= second


def test_chunked_prefill_interleaves_decode_steps() -> None:
    sched = make(prefill_chunk_size=8)
    sched.add(seq("short", 3))
    batch = sched.schedule()
    advance(batch)  # short is decoding now
    sched.add(seq("long", 30))
    phases = []
    for _ in range(6):
        batch = sched.schedule()
        phases.append((batch.phase, [(s.request_id, span) for s, span in zip(batch.seqs, batch.spans)]))
        advance(batch)
    prefills = [rows for phase, rows in phases if phase == "prefill"]
    assert [rows[0][1] for rows in prefills] == [(0, 8), (8, 16), (16, 24)]
    assert [phase for phase, _ in phases] == ["decode", "prefill", "decode", "prefill", "decode", "prefill"]


def test_context_past_every_prefill_bucket_continues_in_decode_buckets() -> None:
    sched = make(prefill_chunk_size=32)
    sched.add(seq("long", 40))
    batch = sched.schedule()
    assert batch.phase == "prefill" and batch.spans == [(0, 32)]
    advance(batch)
    for position in range(32, 40):
        batch = sched.schedule()
        assert batch.phase == "decode" and batch.spans == [(position, position + 1)]
        advance(batch)
    assert sched.running[0].output_token_ids == [7]  # the last prompt position gave a token


def test_preemption_frees_the_latest_admitted_and_recomputes_it() -> None:
    sched = make(num_blocks=5, block_size=4)  # 4 usable blocks = 16 tokens
    sched.add(seq("a", 8))
    sched.add(seq("b", 8))
    advance(sched.schedule())  # both prefilled: 2 blocks each, 9 tokens now
    batch = sched.schedule()  # a needs a 3rd block for position 8: b is preempted
    assert [s.request_id for s in batch.seqs] == ["a"]
    assert sched.num_preemptions == 1
    b = sched.waiting[0]
    assert b.request_id == "b" and b.num_computed_tokens == 0 and "b" not in sched.blocks.tables
    sched.blocks.check_invariants()


def test_abort_returns_blocks_wherever_the_sequence_is() -> None:
    sched = make()
    running, waiting = seq("a", 8), seq("b", 8)
    sched.add(running)
    sched.schedule()
    sched.add(waiting)
    sched.abort(running)
    sched.abort(waiting)
    assert not sched.has_unfinished() and sched.blocks.num_free == sched.blocks.num_usable


@pytest.mark.parametrize(
    ("config", "field"),
    [({"npu_queue_limit": 0}, "npu_queue_limit"), ({"max_processing_samples": 0}, "max_processing_samples"),
     ({"spare_blocks_ratio": 1.0}, "spare_blocks_ratio"), ({"prefill_chunk_size": 0}, "prefill_chunk_size")],
)  # fmt: skip
def test_bad_scheduler_config_names_the_field(config: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^scheduler_config\.{field} must be"):
        make(**config)
