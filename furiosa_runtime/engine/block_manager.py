"""Paged KV-cache block manager: which physical blocks hold each sequence's tokens.

The protocol is a set of paired verbs: ``can_allocate`` / ``allocate`` when a sequence is
admitted, ``can_append`` / ``append`` before a step writes positions beyond its table,
``can_fork`` / ``fork`` when a sample of an ``n > 1`` request takes over its parent's
computed prompt, and ``free`` when it finishes, is aborted or is preempted.

Forked sequences share the prompt's *full* blocks (reference-counted; nobody writes a
full prompt block again) and get a private copy of the partly filled last block, into
which they write their own tokens.  ``check_invariants`` proves that no block is lost and
that every shared block is counted once per table holding it (tests call it after every
step).

Block 0 is never handed out: padding entries of block tables point to it, so a padded
row can only ever read (never write) a block that no sequence owns.
"""

from __future__ import annotations

import math


class BlockManager:
    """Free list, one block table per sequence id, and a reference count per held block."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"paged_attention_num_blocks: needs at least 2 KV blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.tables: dict[str, list[int]] = {}
        self._refs: dict[int, int] = {}  # held block -> number of tables holding it

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        """Blocks a sequence may ever hold (all but the padding block 0)."""
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence can keep in the cache."""
        return self.num_usable * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_allocate(self, num_tokens: int, reserve: int = 0) -> bool:
        """Room for a new sequence of ``num_tokens`` while keeping ``reserve`` blocks free."""
        return self.blocks_needed(num_tokens) + reserve <= self.num_free

    def allocate(self, seq_id: str, num_tokens: int) -> list[int]:
        """Give ``seq_id`` enough blocks for ``num_tokens`` tokens (grows an existing table)."""
        table = self.tables.setdefault(seq_id, [])
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > self.num_free:
            raise MemoryError(f"KV cache exhausted: {seq_id} needs {extra} more blocks, {self.num_free} free")
        table.extend(self._take() for _ in range(max(extra, 0)))
        return table

    def _take(self) -> int:
        block = self._free.pop()
        self._refs[block] = 1
        return block

    def can_append(self, seq_id: str, num_tokens: int) -> bool:
        """Whether ``seq_id``'s table can grow to hold ``num_tokens`` tokens."""
        return self.blocks_needed(num_tokens) - len(self.tables.get(seq_id, [])) <= self.num_free

    def append(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow the table of an admitted sequence to hold ``num_tokens`` tokens."""
        assert seq_id in self.tables, f"append to unallocated sequence {seq_id}"
        return self.allocate(seq_id, num_tokens)

    def can_fork(self, num_tokens: int, reserve: int = 0) -> bool:
        """Room for a fork of a ``num_tokens`` prefix (one private block for a partial tail)
        while keeping ``reserve`` blocks free."""
        return (1 if num_tokens % self.block_size else 0) + reserve <= self.num_free

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> tuple[int, int] | None:
        """Give ``child_id`` the first ``num_tokens`` tokens of ``parent_id``'s table.

        Full blocks are shared; a partly filled last block is replaced by a fresh one, and
        the ``(source, copy)`` pair is returned so the caller copies its KV contents.
        """
        assert child_id not in self.tables, f"fork into existing sequence {child_id}"
        full, tail = divmod(num_tokens, self.block_size)
        shared = self.tables[parent_id][:full]
        for block in shared:
            self._refs[block] += 1
        self.tables[child_id] = list(shared)
        if not tail:
            return None
        copy = self._take()
        self.tables[child_id].append(copy)
        return self.tables[parent_id][full], copy

    def free(self, seq_id: str) -> None:
        """Drop ``seq_id``'s hold on its blocks; blocks nobody holds return to the free list
        (a no-op for unknown ids)."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self._refs[block] -= 1
            if not self._refs[block]:
                del self._refs[block]
                self._free.append(block)

    def slot(self, seq_id: str, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def check_invariants(self) -> None:
        """Every usable block is either free or held, block 0 neither; a held block's count is
        the number of tables holding it, and no table holds a block twice."""
        held: dict[int, int] = {}
        for table in self.tables.values():
            assert len(table) == len(set(table)), "a block table lists a KV block twice"
            for block in table:
                held[block] = held.get(block, 0) + 1
        everything = list(held) + self._free
        assert len(everything) == len(set(everything)), "a KV block is both held and free, or freed twice"
        assert sorted(everything) == list(range(1, self.num_blocks)), "a KV block leaked"
        assert held == self._refs, "a KV block is shared without a fork (its reference count is wrong)"
