"""Paged KV-cache block manager: which physical blocks hold each sequence's tokens.

Block 0 is never handed out: padding entries of block tables point to it, so a padded
row can only ever read (never write) a block that no sequence owns.
"""

from __future__ import annotations

import math


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"paged attention needs at least 2 KV blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_allocate(self, num_tokens: int, reserve: int = 0) -> bool:
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
        return self.blocks_needed(num_tokens) - len(self.tables.get(seq_id, [])) <= self.num_free

    def free(self, seq_id: str) -> None:
        self._free.extend(reversed(self.tables.pop(seq_id, [])))

    def slot(self, seq_id: str, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size
