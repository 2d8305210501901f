"""BlockManager: paired verbs, block 0 reserved, forks share full blocks, no block ever lost."""

from __future__ import annotations

import pytest

from furiosa_runtime.engine.block_manager import BlockManager


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
