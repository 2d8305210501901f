"""Data-parallel replicas each have their own KV pool (``BlockManager``), in one global id
space: replica r owns blocks ``[r * num_blocks, (r + 1) * num_blocks)``.  A sequence is
placed at admission on a replica whose pool holds it, a sequence that cannot grow
preempts only sequences of its own replica, and the beam deadlock breaker preempts on the
replica where that makes room."""

from __future__ import annotations

from pathlib import Path

import pytest

from furiosa_runtime import LLM, LLMEngine, SamplingParams, SchedulerConfig
from furiosa_runtime.engine.block_manager import BlockManager
from furiosa_runtime.engine.scheduler import Batch
from furiosa_runtime.engine.sequence import Sequence
from furiosa_runtime.engine.simulate import TimingCore
from tests.helpers import build

NUM_BLOCKS = 13  # per replica: 12 usable blocks of 4 tokens (the least the buckets allow)
ROOMY = SchedulerConfig(spare_blocks_ratio=0.0, is_offline=False, max_processing_samples=64)


@pytest.fixture(scope="module")
def small_pools(tmp_path_factory, cache_dir) -> Path:
    """tiny-llama on one PE with a KV cache of 13 blocks of 4 tokens."""
    out = tmp_path_factory.mktemp("artifacts") / "tiny-llama-small-pools"
    build(["model=tiny-llama", "buckets.prefill=[[1,16],[2,16]]", "buckets.decode=[[1,24],[2,24]]",
           "buckets.max_seq_len_to_capture=24", "buckets.paged_attention_block_size=4",
           f"buckets.paged_attention_num_blocks={NUM_BLOCKS}"], out, cache_dir)  # fmt: skip
    return out


def in_own_pool(blocks: BlockManager) -> bool:
    """Every table's blocks lie in its replica's range of the global ids."""
    return all(block // blocks.num_blocks == blocks.replica_of(seq_id) for seq_id, table in blocks.tables.items() for block in table)


def test_two_replicas_hold_twice_the_sequences_of_one_and_free_every_block(small_pools: Path) -> None:
    prompts = [{"prompt_token_ids": list(range(10 + i, 18 + i))} for i in range(16)]  # 8 tokens: 2 blocks each
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    admitted, outputs = [], []
    for devices in ("npu:0:0", "npu:0:0-1"):
        llm = LLM(small_pools, devices=devices, scheduler_config=ROOMY)
        engine, blocks = LLMEngine.from_llm(llm), llm.engine.blocks
        assert (blocks.replicas, blocks.num_usable) == (llm.engine.simulator.mesh.dp, blocks.replicas * (NUM_BLOCKS - 1))
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        finished = engine.step()
        admitted.append(len(llm.engine.scheduler.running))
        while engine.has_unfinished_requests():
            finished += engine.step()
            assert in_own_pool(blocks)
            blocks.check_invariants()
        assert blocks.num_free == blocks.num_usable and not blocks.tables
        outputs.append({o.request_id: o.outputs[0].token_ids for o in finished})
    assert admitted == [6, 12]  # a pool of 12 blocks holds 6 prompts of 2 blocks; each replica has one
    assert outputs[0] == outputs[1]  # placement changes where a request runs, not what it generates


def start(core: TimingCore, prompts: dict[str, int], request: str | None = None) -> list[Sequence]:
    """Queue one sequence per ``name: prompt length`` on ``core``'s scheduler (all of one
    ``request``, as beams are, if given)."""
    seqs = [Sequence(name, None, list(range(1, length + 1)), SamplingParams(temperature=0), None, 8, group_id=request)
            for name, length in prompts.items()]  # fmt: skip
    for seq in seqs:
        core.scheduler.add(seq)
    return seqs


def advance(batches: list[Batch], token: bool = True) -> None:
    """What the engine does after a step: spans computed, a token where a row caught up
    (none with ``token=False``: a beam whose logits wait for its siblings')."""
    for batch in batches:
        for seq, (_, end) in zip(batch.seqs, batch.spans):
            seq.num_computed_tokens = end
            if end == seq.num_tokens and token:
                seq.output_token_ids.append(7)


def rows(batches: list[Batch]) -> list[tuple[int, str, list[str]]]:
    """Each batch of a step as (replica, phase, sequence ids)."""
    return [(batch.replica, batch.phase, [s.request_id for s in batch.seqs]) for batch in batches]


def test_placement_at_admission_and_preemption_within_a_replica(small_pools: Path) -> None:
    core = TimingCore.open(small_pools, devices="npu:0:0-1", scheduler_overrides=ROOMY.model_dump())
    scheduler, blocks = core.scheduler, core.blocks
    # 4 blocks each: a, c, e of 16 tokens (full), b, d, f of 13 (3 free slots)
    seqs = start(core, {"a": 16, "b": 13, "c": 16, "d": 13, "e": 16, "f": 13})
    step = scheduler.schedule_step()  # all admitted, each on the replica with the fewest live, then the most free blocks
    assert [blocks.replica_of(s.request_id) for s in seqs] == [0, 1, 0, 1, 0, 1]
    assert blocks.num_free == 0 and in_own_pool(blocks)
    assert rows(step) == [(0, "prefill", ["a", "c"]), (1, "prefill", ["b", "d"])]  # each replica its own batch
    advance(step)
    advance(scheduler.schedule_step())  # e, f prefilled
    step = scheduler.schedule_step()  # a needs a 5th block: the latest admitted on its replica (e) gives way, not f
    assert rows(step) == [(0, "decode", ["a", "c"]), (1, "decode", ["b", "d"])]
    assert scheduler.num_preemptions == 1 and [s.request_id for s in scheduler.waiting] == ["e"]
    assert blocks.tables["a"][-1] // NUM_BLOCKS == 0 and in_own_pool(blocks)
    blocks.check_invariants()


def test_a_beam_deadlock_is_broken_on_the_replica_short_of_blocks(small_pools: Path) -> None:
    """Every running sequence waits (beams whose logits wait for a sibling's) and the first
    waiting one, a beam of request o, fits no replica.  Preempting the youngest request (y2)
    would not make room on its replica, which an older request fills; y1 gives way instead,
    on the other replica, and o's beam is admitted there after one preemption."""
    core = TimingCore.open(small_pools, devices="npu:0:0-1", scheduler_overrides=ROOMY.model_dump())
    scheduler, blocks = core.scheduler, core.blocks
    start(core, {"z": 16}), start(core, {"o#0": 12}, request="o"), start(core, {"y1": 16, "y2": 8})  # requests in age order
    advance(scheduler.schedule_step(), token=False)  # z -> 0, o#0 -> 1, y1 -> 1, y2 -> 0, all prefilled
    start(core, {"o#1": 16}, request="o")
    advance(scheduler.schedule_step(), token=False)  # o#1 -> replica 0: 10 of its 12 blocks held, 7 of replica 1's
    assert {s.request_id: blocks.replica_of(s.request_id) for s in scheduler.running} == {"z": 0, "o#0": 1, "y1": 1, "y2": 0, "o#1": 0}
    start(core, {"o#2": 24}, request="o")  # 6 blocks: ahead of the younger requests, on no replica
    step = scheduler.schedule_step()
    assert scheduler.num_preemptions == 1 and [s.request_id for s in scheduler.waiting] == ["y1"]
    assert rows(step) == [(1, "prefill", ["o#2"])] and blocks.replica_of("o#2") == 1
    assert in_own_pool(blocks)
    blocks.check_invariants()


def test_each_replica_caches_prefixes_and_a_prompt_goes_where_its_prefix_is(small_pools: Path) -> None:
    """Two system prompts: the first request of each lands on its own replica and caches its
    prefix there; later requests follow their prefix to that replica and skip its prefill,
    with the tokens of one PE and of two replicas without caching."""
    systems = {"a": list(range(100, 108)), "b": list(range(200, 208))}  # 8 tokens: two full blocks
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    def prompt(name: str, i: int) -> dict:
        return {"prompt_token_ids": systems[name] + [300 + 10 * i + j for j in range(4)]}

    tokens, placed = [], []
    for devices, caching in (("npu:0:0", False), ("npu:0:0-1", False), ("npu:0:0-1", True)):
        llm = LLM(small_pools, devices=devices, scheduler_config=ROOMY, enable_prefix_caching=caching)
        engine, blocks = LLMEngine.from_llm(llm), llm.engine.blocks
        finished = []
        # the first wave caches each system prompt on one replica; the second comes in the order
        # that balancing the load alone would send to the other replicas
        for wave, names in (([0], "ab"), ([1, 2, 3], "ba")):
            for i in wave:
                for name in names:
                    engine.add_request(f"{name}{i}", prompt(name, i), params)
            finished += engine.step()
            placed.append({seq_id: blocks.replica_of(seq_id) for seq_id in blocks.tables})
            while engine.has_unfinished_requests():
                finished += engine.step()
                blocks.check_invariants()
        assert blocks.num_free == blocks.num_usable and not blocks.tables
        tokens.append({o.request_id: o.outputs[0].token_ids for o in finished})
        hits = llm.engine.scheduler.prefix_cache_hit_tokens
        assert (hits >= 6 * 8) == caching  # each of the second wave's six prompts found its two system blocks
    assert tokens[0] == tokens[1] == tokens[2]
    first, later = placed[4], placed[5]  # the cached two-replica run's waves
    assert first["a0"] != first["b0"]  # the first two requests went to different replicas
    assert {later[f"a{i}"] for i in (1, 2, 3)} == {first["a0"]}
    assert {later[f"b{i}"] for i in (1, 2, 3)} == {first["b0"]}
