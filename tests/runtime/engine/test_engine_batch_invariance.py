"""Batch invariance: whatever else is in flight, a greedy request gets the tokens it gets alone.

A tiny random-weight Llama with small buckets and a deliberately small KV cache (48 usable
blocks of 4 tokens, while up to 48-token requests run many at a time), so the scheduler
must batch, rotate, chunk and preempt.  Requests arrive at random steps and some are
aborted; every finished one is compared with the same request run alone with prefix
caching off, and every KV block must be free (or cached, evictable) at the end.  The
random prompts often start with one of a few shared prefixes, so with prefix caching on
(the default) later requests reuse the KV blocks of earlier ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from furiosa_runtime import LLM, LLMEngine, SamplingParams, SchedulerConfig
from tests.helpers import ENGINE_LAYOUTS, build

INVARIANCE_BUCKETS = [
    "model=tiny-llama",
    "buckets.prefill=[[1,16],[2,32]]",
    "buckets.decode=[[1,48],[4,48]]",
    "buckets.max_seq_len_to_capture=48",
    "buckets.paged_attention_block_size=4",
    "buckets.paged_attention_num_blocks=49",
]


@pytest.fixture(scope="module", params=list(ENGINE_LAYOUTS))
def small_cache_artifact(request, tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / f"tiny-llama-small-cache-{request.param}"
    build([*INVARIANCE_BUCKETS, *ENGINE_LAYOUTS[request.param]], out, cache_dir)
    return out


@pytest.fixture(scope="module")
def reference(small_cache_artifact: Path) -> LLM:
    """The engine without prefix caching: what every request must produce."""
    return LLM(small_cache_artifact, enable_prefix_caching=False)


SHARED_PREFIXES = [list(range(100, 100 + n)) for n in (5, 12, 20)]  # a "system prompt" of 1, 3 or 5 blocks (and a bit)


def random_request(rng: np.random.Generator, max_prompt: int) -> tuple[list[int], SamplingParams]:
    """Random tokens, half of the time after a shared prefix, and a random greedy budget."""
    prompt = rng.integers(3, 500, size=int(rng.integers(1, max_prompt + 1))).tolist()
    if rng.random() < 0.5:
        prompt = (SHARED_PREFIXES[int(rng.integers(len(SHARED_PREFIXES)))] + prompt)[:max_prompt]
    max_tokens = int(rng.integers(1, min(24, 48 - len(prompt)) + 1))
    return prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=bool(rng.random() < 0.5))


def serve_randomly(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], seed: int) -> dict[str, list[int]]:
    """Submit at random steps, abort at random; check the block invariants after every step."""
    rng = np.random.default_rng(seed)
    blocks = engine.native_engine.blocks
    pending = list(enumerate(requests))
    finished: dict[str, list[int]] = {}
    while pending or engine.has_unfinished_requests():
        for _ in range(int(rng.integers(0, 5)) if pending else 0):
            if pending:
                index, (prompt, params) = pending.pop(0)
                engine.add_request(f"req-{index}", {"prompt_token_ids": prompt}, params)
        live = sorted(engine.request_ids)
        if live and rng.random() < 0.08:
            doomed = list(rng.choice(live, size=min(len(live), int(rng.integers(1, 3))), replace=False))
            engine.abort_request(doomed[0] if len(doomed) == 1 else doomed)
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
        blocks.check_invariants()
    assert blocks.num_free == blocks.num_usable and not blocks.tables  # free or cached (evictable)
    return finished


def alone(llm: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    return llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.parametrize("enable_prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_two_hundred_random_requests_match_each_alone(
    small_cache_artifact: Path, reference: LLM, enable_prefix_caching: bool, caplog: pytest.LogCaptureFixture
) -> None:
    llm = LLM(small_cache_artifact, scheduler_config=SchedulerConfig(spare_blocks_ratio=0.0),  # admit greedily: preempt later
              enable_prefix_caching=enable_prefix_caching)  # fmt: skip
    rng = np.random.default_rng(0)
    requests = [random_request(rng, max_prompt=32) for _ in range(200)]
    finished = serve_randomly(LLMEngine.from_llm(llm), requests, seed=1)
    assert 100 <= len(finished) < 200  # most finish, some were aborted
    stats = llm.engine.stats()
    assert stats.preemptions > 0  # the small cache forced recomputation, and each one was logged
    assert sum("preempted" in r.message for r in caplog.records if r.levelno == logging.WARNING) == stats.preemptions
    assert (stats.prefix_cache_hit_tokens > 0) == enable_prefix_caching  # shared prefixes were reused, only when on
    for request_id, tokens in finished.items():
        prompt, params = requests[int(request_id.split("-")[1])]
        assert tokens == alone(reference, prompt, params), request_id


def test_two_replicas_with_a_prefix_cache_each_match_each_alone(small_cache_artifact: Path, reference: LLM, request) -> None:
    """The same random traffic on two data-parallel replicas of the artifact, each with its
    own small KV pool and prefix cache: requests follow their cached prefixes, preempt only
    on their replica, and still get the tokens of one PE alone."""
    if "single-pe" not in request.node.callspec.id:
        pytest.skip("two replicas of the single-PE artifact")
    llm = LLM(small_cache_artifact, devices="npu:0:0-1", scheduler_config=SchedulerConfig(spare_blocks_ratio=0.0))
    rng = np.random.default_rng(5)
    requests = [random_request(rng, max_prompt=32) for _ in range(200)]
    finished = serve_randomly(LLMEngine.from_llm(llm), requests, seed=6)
    stats = llm.engine.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hit_tokens > 0
    for request_id, tokens in finished.items():
        prompt, params = requests[int(request_id.split("-")[1])]
        assert tokens == alone(reference, prompt, params), request_id


@pytest.mark.parametrize("config", [SchedulerConfig(prefill_chunk_size=8), SchedulerConfig(prefill_chunk_size=8, is_offline=True, max_processing_samples=6)])
def test_chunked_prefill_and_long_prompts_match_each_alone(small_cache_artifact: Path, config: SchedulerConfig) -> None:
    llm = LLM(small_cache_artifact, scheduler_config=config)
    reference = LLM(small_cache_artifact, scheduler_config=config, enable_prefix_caching=False)
    rng = np.random.default_rng(2)
    requests = [random_request(rng, max_prompt=44) for _ in range(40)]  # up to 44 > the 32-token prefill buckets
    finished = serve_randomly(LLMEngine.from_llm(llm), requests, seed=3)
    for request_id, tokens in finished.items():
        prompt, params = requests[int(request_id.split("-")[1])]
        assert tokens == alone(reference, prompt, params), request_id


def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(small_cache_artifact: Path) -> None:
    whole, chunked = LLM(small_cache_artifact), LLM(small_cache_artifact, scheduler_config=SchedulerConfig(prefill_chunk_size=5))
    rng = np.random.default_rng(4)
    for _ in range(5):
        prompt, params = random_request(rng, max_prompt=32)
        assert alone(chunked, prompt, params) == alone(whole, prompt, params)


def test_prompts_past_the_prefill_buckets_need_chunked_prefill(small_cache_artifact: Path) -> None:
    prompt = list(range(3, 43))  # 40 tokens, prefill buckets hold 32
    with pytest.raises(ValueError, match="maximum context length is 32 tokens"):
        LLM(small_cache_artifact).generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2), use_tqdm=False)
    chunked = LLM(small_cache_artifact, scheduler_config=SchedulerConfig(prefill_chunk_size=16))
    assert len(alone(chunked, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))) == 8


def near_greedy(n: int, max_tokens: int) -> SamplingParams:
    """n samples that must all follow the argmax: top_k=1 keeps only the most likely token."""
    return SamplingParams(n=n, temperature=1.0, top_k=1, seed=0, max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize(("prompt_len", "copies"), [(10, 2), (8, 0)])  # block size 4: a partial last block is copied
def test_samples_of_one_request_fork_the_prompt_kv_instead_of_prefilling_it_again(
    small_cache_artifact: Path, prompt_len: int, copies: int
) -> None:
    llm = LLM(small_cache_artifact)
    prompt = list(range(7, 7 + prompt_len))
    [output] = llm.generate({"prompt_token_ids": prompt}, near_greedy(3, 12), use_tqdm=False)
    greedy = alone(llm, prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert [c.token_ids for c in output.outputs] == [greedy] * 3  # the forked KV is the prompt's
    assert llm.engine.simulator.stats["kv_block_copies"] == copies
    blocks = llm.engine.blocks
    assert blocks.num_free == blocks.num_usable and not blocks.tables


def test_a_fork_copies_the_partial_block_in_every_layer_of_every_pe(small_cache_artifact: Path) -> None:
    simulator = LLM(small_cache_artifact).engine.simulator
    rng = np.random.default_rng(6)
    layers = [layer for pe in simulator.pes.values() for layer in pe.kv.values()]
    for layer in layers:
        layer.k[:] = rng.standard_normal(layer.k.shape)
        layer.v[:] = rng.standard_normal(layer.v.shape)
    simulator.copy_kv_blocks(src=5, dst=7)
    block = slice(7 * simulator.block_size, 8 * simulator.block_size)
    source = slice(5 * simulator.block_size, 6 * simulator.block_size)
    for layer in layers:
        np.testing.assert_array_equal(layer.k[block], layer.k[source])
        np.testing.assert_array_equal(layer.v[block], layer.v[source])


def test_forked_samples_survive_preemption_and_aborts(small_cache_artifact: Path) -> None:
    llm = LLM(small_cache_artifact, scheduler_config=SchedulerConfig(spare_blocks_ratio=0.0))
    engine = LLMEngine.from_llm(llm)
    rng = np.random.default_rng(5)
    requests = []
    for index in range(40):
        prompt = rng.integers(3, 500, size=int(rng.integers(1, 25))).tolist()
        requests.append((prompt, near_greedy(int(rng.integers(1, 4)), int(rng.integers(1, 48 - len(prompt) + 1)))))
    finished = {}
    for index, (prompt, params) in enumerate(requests):
        engine.add_request(f"req-{index}", {"prompt_token_ids": prompt}, params)
    step = 0
    while engine.has_unfinished_requests():
        if step % 7 == 3:
            engine.abort_request(sorted(engine.request_ids)[0])
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = [c.token_ids for c in output.outputs]
        llm.engine.blocks.check_invariants()
        step += 1
    assert llm.engine.scheduler.num_preemptions > 0 and llm.engine.simulator.stats["kv_block_copies"] > 0
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_usable
    for request_id, samples in finished.items():
        prompt, params = requests[int(request_id.split("-")[1])]
        greedy = alone(llm, prompt, SamplingParams(temperature=0.0, max_tokens=params.max_tokens, ignore_eos=True))
        assert samples == [greedy] * params.n, request_id
