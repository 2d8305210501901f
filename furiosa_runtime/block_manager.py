"""Paged KV-cache block manager: which physical blocks hold each sequence's tokens.

The protocol is a set of paired verbs: ``can_allocate`` / ``allocate`` when a sequence is
admitted, ``can_append`` / ``append`` before a step writes positions beyond its table, and
``free`` when it finishes, is aborted or is preempted.  ``check_invariants`` proves that no
block is lost or shared (tests call it after every step).

Block 0 is never handed out: padding entries of block tables point to it, so a padded
row can only ever read (never write) a block that no sequence owns.
"""

from __future__ import annotations

import math


class BlockManager:
    """Free list plus one block table per sequence id."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"paged_attention_num_blocks: needs at least 2 KV blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.tables: dict[str, list[int]] = {}

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
        table.extend(self._free.pop() for _ in range(max(extra, 0)))
        return table

    def can_append(self, seq_id: str, num_tokens: int) -> bool:
        """Whether ``seq_id``'s table can grow to hold ``num_tokens`` tokens."""
        return self.blocks_needed(num_tokens) - len(self.tables.get(seq_id, [])) <= self.num_free

    def append(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow the table of an admitted sequence to hold ``num_tokens`` tokens."""
        assert seq_id in self.tables, f"append to unallocated sequence {seq_id}"
        return self.allocate(seq_id, num_tokens)

    def free(self, seq_id: str) -> None:
        """Return every block of ``seq_id`` (a no-op for unknown ids)."""
        self._free.extend(reversed(self.tables.pop(seq_id, [])))

    def slot(self, seq_id: str, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def check_invariants(self) -> None:
        """Every usable block is either free or in exactly one table; block 0 in neither."""
        owned = [b for table in self.tables.values() for b in table]
        everything = owned + self._free
        assert len(everything) == len(set(everything)), "a KV block is shared or freed twice"
        assert sorted(everything) == list(range(1, self.num_blocks)), "a KV block leaked"
