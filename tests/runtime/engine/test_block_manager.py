"""BlockManager: paired verbs, block 0 reserved, forks share full blocks, no block ever lost,
and the prefix cache: keyed full blocks kept after their sequence ends, reused, evicted LRU."""

from __future__ import annotations

import pytest

from furiosa_runtime.engine.block_manager import BlockManager, block_hashes


def test_allocate_append_free_round_trip() -> None:
    blocks = BlockManager(num_blocks=9, block_size=4)
    assert blocks.num_free == blocks.num_usable == 8
    assert blocks.can_allocate(10)  # 3 blocks
    assert blocks.allocate("a", 10) == [1, 2, 3]
    assert blocks.can_append("a", 12) and blocks.append("a", 12) == [1, 2, 3]  # still fits
    assert blocks.append("a", 13) == [1, 2, 3, 4]
    assert blocks.slot("a", 13) == 4 * 4 + 1
    blocks.check_invariants()
    blocks.free("a")
    assert blocks.num_free == 8
    blocks.check_invariants()


def test_reserve_and_exhaustion() -> None:
    blocks = BlockManager(num_blocks=5, block_size=2)
    assert blocks.capacity_tokens == 8
    blocks.allocate("a", 6)
    assert not blocks.can_allocate(2, reserve=1)
    assert blocks.can_allocate(2)
    assert not blocks.can_append("a", 9)
    with pytest.raises(MemoryError, match="KV cache exhausted"):
        blocks.append("a", 9)


def test_block_zero_is_never_handed_out_and_free_is_idempotent() -> None:
    blocks = BlockManager(num_blocks=4, block_size=1)
    blocks.allocate("a", 3)
    assert 0 not in blocks.tables["a"]
    blocks.free("a")
    blocks.free("a")
    blocks.free("never-seen")
    blocks.check_invariants()


def test_invariant_check_catches_a_leak_and_a_double_owner() -> None:
    blocks = BlockManager(num_blocks=6, block_size=1)
    blocks.allocate("a", 2)
    blocks.tables.pop("a")  # forgotten without free: leaked
    with pytest.raises(AssertionError, match="leaked"):
        blocks.check_invariants()
    blocks = BlockManager(num_blocks=6, block_size=1)
    blocks.allocate("a", 2)
    blocks.tables["b"] = list(blocks.tables["a"])
    with pytest.raises(AssertionError, match="shared"):
        blocks.check_invariants()


def test_a_fork_shares_full_prompt_blocks_and_copies_the_partial_one() -> None:
    blocks = BlockManager(num_blocks=9, block_size=4)
    blocks.allocate("parent", 10)  # blocks 1, 2 full; block 3 holds tokens 8-9
    assert blocks.can_fork(10)
    assert blocks.fork("parent", "child", 10) == (3, 4)  # copy block 3's KV into block 4
    assert blocks.tables["child"] == [1, 2, 4]
    blocks.check_invariants()
    assert blocks.fork("parent", "aligned", 8) is None  # nothing partial: nothing to copy
    blocks.append("child", 13)
    blocks.free("parent")  # the shared blocks stay with their other holders
    assert blocks.num_free == 8 - 4
    blocks.check_invariants()
    blocks.free("child")
    blocks.free("aligned")
    assert blocks.num_free == 8
    blocks.check_invariants()


def test_a_fork_needs_a_free_block_only_for_a_partial_tail() -> None:
    blocks = BlockManager(num_blocks=4, block_size=2)
    blocks.allocate("parent", 5)  # all 3 usable blocks
    assert blocks.can_fork(4) and not blocks.can_fork(5)


def test_too_few_blocks_is_a_user_error() -> None:
    with pytest.raises(ValueError, match="paged_attention_num_blocks"):
        BlockManager(num_blocks=1, block_size=16)


# -- prefix caching -------------------------------------------------------------------


def run_prompt(blocks: BlockManager, seq_id: str, tokens: list[int]) -> int:
    """Admit ``tokens`` on its cached prefix, "compute" the rest and key its full blocks;
    returns how many tokens the cache supplied."""
    hashes = block_hashes(tokens, blocks.block_size, [])
    cached = blocks.cached_prefix(hashes, len(tokens))
    assert blocks.can_allocate(len(tokens), cached=cached)
    blocks.allocate(seq_id, len(tokens), cached)
    blocks.cache_computed(seq_id, hashes, len(tokens))
    blocks.check_invariants()
    return len(cached) * blocks.block_size


def test_a_block_key_stands_for_its_tokens_and_everything_before_them() -> None:
    keys = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4, [])
    assert len(keys) == 2  # the partial third block has no key
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4, list(keys))[:2] == keys  # extended, not recomputed
    assert block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4, [])[1] != keys[1]  # same tokens after another prefix: another key


def test_a_finished_prompt_s_blocks_are_reused_by_the_next_with_the_same_prefix() -> None:
    blocks = BlockManager(num_blocks=9, block_size=4)
    system = list(range(100, 108))  # two full blocks
    assert run_prompt(blocks, "a", system + [1, 2, 3]) == 0
    shared = blocks.tables["a"][:2]
    blocks.free("a")
    assert blocks.num_free == 8 and blocks.num_cached == 2  # kept, but still counted as room
    assert run_prompt(blocks, "b", system + [4, 5]) == 8  # both system blocks found
    assert blocks.tables["b"][:2] == shared
    assert run_prompt(blocks, "c", system[:4] + [9, 9, 9, 9, 9]) == 4  # the first block only: the second differs
    assert blocks.tables["c"][0] == shared[0]
    blocks.free("b")
    assert blocks.num_free == 8 - 1 - 2  # "c" holds the first system block and two of its own
    blocks.free("c")
    assert blocks.num_free == 8
    blocks.check_invariants()


def test_a_fully_cached_prompt_recomputes_its_last_block_in_a_fresh_one() -> None:
    blocks = BlockManager(num_blocks=9, block_size=4)
    prompt = list(range(8))
    run_prompt(blocks, "a", prompt)
    first, last = blocks.tables["a"]
    blocks.free("a")
    # Its last token must be computed again for its logits: the last block is not shared,
    # so that write lands in a block "b" holds alone.
    assert run_prompt(blocks, "b", prompt) == 4
    assert blocks.tables["b"][0] == first and blocks.tables["b"][1] != last
    assert run_prompt(blocks, "c", prompt + [8]) == 8  # one more token: both full blocks are found


def test_least_recently_released_cached_blocks_are_evicted_first_and_forgotten() -> None:
    blocks = BlockManager(num_blocks=7, block_size=2)  # 6 usable blocks
    old, new = [1, 1, 2, 2, 0], [3, 3, 4, 4, 0]
    run_prompt(blocks, "old", old)
    blocks.free("old")
    run_prompt(blocks, "new", new)
    blocks.free("new")
    assert blocks.num_free == 6 and blocks.num_cached == 4  # 2 free, 4 evictable
    run_prompt(blocks, "big", [9] * 9)  # 5 blocks: the 2 free, then "old"'s two and "new"'s tail
    assert blocks.cached_prefix(block_hashes(old, 2, []), len(old)) == []  # evicted: its key is gone
    assert len(blocks.cached_prefix(block_hashes(new, 2, []), len(new))) == 1  # its first block survived
    blocks.check_invariants()


def test_admission_counts_a_reused_evictable_block_as_no_longer_free() -> None:
    blocks = BlockManager(num_blocks=4, block_size=2)  # 3 usable blocks
    run_prompt(blocks, "a", [1, 1, 2, 2, 3])
    blocks.free("a")
    cached = blocks.cached_prefix(block_hashes([1, 1, 2, 2, 5, 5], 2, []), 6)
    assert len(cached) == 2 and blocks.num_free == 3  # 1 free, 2 evictable
    assert blocks.can_allocate(6, cached=cached)  # 3 blocks: the 2 cached and the free one
    assert not blocks.can_allocate(6, reserve=1, cached=cached)  # reusing them leaves nothing to spare
    assert not blocks.can_allocate(7, cached=cached)


def test_a_sequence_admitted_before_its_prefix_was_cached_swaps_its_fresh_blocks_for_it() -> None:
    blocks = BlockManager(num_blocks=9, block_size=4)
    system = list(range(100, 108))
    a, b = system + [1], system + [2, 2]
    hashes_b = block_hashes(b, 4, [])
    blocks.allocate("a", len(a))  # both admitted in one step: nothing cached yet
    blocks.allocate("b", len(b))
    blocks.cache_computed("a", block_hashes(a, 4, []), len(a))  # "a" prefilled first
    assert blocks.reuse_cached("b", hashes_b, 0, len(b)) == 8
    assert blocks.tables["b"][:2] == blocks.tables["a"][:2]
    assert blocks.num_free == 8 - 3 - 1  # "b"'s two fresh blocks went back
    assert blocks.reuse_cached("b", hashes_b, 8, len(b)) == 8  # nothing more to find
    blocks.check_invariants()


def test_a_fork_shares_cached_blocks_and_they_stay_cached_after_both_end() -> None:
    blocks = BlockManager(num_blocks=9, block_size=4)
    prompt = list(range(10))
    run_prompt(blocks, "parent", prompt)
    assert blocks.fork("parent", "child", 10) == (blocks.tables["parent"][2], blocks.tables["child"][2])
    blocks.check_invariants()
    blocks.append("child", 12)
    blocks.cache_computed("child", block_hashes(prompt + [7, 7], 4, []), 12)  # its own third block: a new key
    blocks.free("parent")
    blocks.free("child")
    assert blocks.num_free == 8 and blocks.num_cached == 3
    assert run_prompt(blocks, "again", prompt + [7, 7, 7]) == 12
    blocks.check_invariants()


def test_preempted_or_aborted_sequences_leave_only_their_computed_full_blocks_cached() -> None:
    blocks = BlockManager(num_blocks=9, block_size=4)
    prompt = list(range(14))
    hashes = block_hashes(prompt, 4, [])
    blocks.allocate("a", len(prompt))
    blocks.cache_computed("a", hashes, 6)  # a chunk of 6 computed: one full block
    blocks.free("a")  # preempted or aborted mid-prefill
    assert blocks.num_cached == 1 and blocks.num_free == 8
    assert run_prompt(blocks, "a", prompt) == 4  # readmitted: the computed block is found again
    blocks.check_invariants()


def test_with_caching_off_nothing_is_kept_or_found() -> None:
    blocks = BlockManager(num_blocks=9, block_size=4, enable_caching=False)
    prompt = list(range(9))
    run_prompt(blocks, "a", prompt)
    blocks.free("a")
    assert blocks.num_cached == 0 and run_prompt(blocks, "b", prompt) == 0


def test_invariant_check_catches_a_free_block_still_in_the_cache() -> None:
    blocks = BlockManager(num_blocks=5, block_size=2)
    run_prompt(blocks, "a", [1, 2, 3])
    blocks.free("a")
    block = next(iter(blocks._evictable[0]))
    del blocks._evictable[0][block]
    blocks._free[0].append(block)  # freed without dropping its key
    with pytest.raises(AssertionError, match="keyed"):
        blocks.check_invariants()
