"""Paged KV-cache block manager: which physical blocks hold each sequence's tokens.

The protocol is a set of paired verbs: ``can_allocate`` / ``allocate`` when a sequence is
admitted, ``can_append`` / ``append`` before a step writes positions beyond its table,
``can_fork`` / ``fork`` when a sample of an ``n > 1`` request takes over its parent's
computed prompt, and ``free`` when it finishes, is aborted or is preempted.

Forked sequences share the prompt's *full* blocks (reference-counted; nobody writes a
full prompt block again) and get a private copy of the partly filled last block, into
which they write their own tokens.

**Automatic prefix caching** (on unless ``enable_caching=False``), as in vLLM: once a block
is full and computed (``cache_computed``) it is keyed by ``block_hashes``, a hash chain over
its tokens and every token before it.  When its last holder lets go, a keyed block is not
freed but kept *evictable* (reference count 0, least recently released first); a later
sequence whose tokens start with the same blocks takes them over (``allocate`` with the
sequence's hashes, or ``reuse_cached`` for blocks allocated but not computed yet) and
skips their prefill.  When the free list is empty, handing out a block evicts the least
recently used evictable one and drops its key, so ``num_free`` counts both.

A cached prefix never covers a sequence's last token (at most ``(num_tokens - 1) //
block_size`` blocks are reused): the step that computes it gives the logits of the next
token.  When the whole prompt is cached this recomputes its last block into a fresh one,
as vLLM does, so a reused block is only ever read, never written: the KV a step writes
always lands in a block its sequence holds alone.

``check_invariants`` proves that no block is lost, that every shared block is counted
once per table holding it, and that the cache's keys and blocks agree (tests call it after
every step).

Block 0 is never handed out: padding entries of block tables point to it, so a padded
row can only ever read (never write) a block that no sequence owns.

**Data-parallel replicas** each hold a whole KV cache on their own PEs, so the manager
keeps one pool per replica in one global id space: replica r owns ids ``[r * num_blocks,
(r + 1) * num_blocks)`` (the rows of the simulator's host KV arrays), its first one its
padding block.  A new table draws from the pool of the replica it is given (chosen at
admission, ``ReplicaTimer.admit``), grows and forks from that same pool.  A cached block's
KV lives on one replica, so each replica has its own prefix cache (keys are looked up per
replica, evictable blocks go back to their replica's queue): the scheduler admits a sequence
on the replica holding the longest cached prefix of it when that replica has room.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import Counter, OrderedDict


def block_hashes(token_ids: list[int], block_size: int, hashes: list[bytes]) -> list[bytes]:
    """Extend ``hashes`` (the keys of the first full blocks of ``token_ids``) to every full block.

    A block's key is the SHA-256 of its parent's key and its token ids, so it stands for
    the whole prefix up to the block's end; a cryptographic hash because a collision would
    silently hand one prompt another's KV.
    """
    for index in range(len(hashes), len(token_ids) // block_size):
        tokens = array("q", token_ids[index * block_size : (index + 1) * block_size])
        hashes.append(hashlib.sha256((hashes[-1] if hashes else b"") + tokens.tobytes()).digest())
    return hashes


class BlockManager:
    """A free list per replica, one block table per sequence id (and the replica whose pool
    it draws from), a reference count per held block, and the prefix cache: keyed blocks,
    the evictable ones in least-recently-released order."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True, replicas: int = 1) -> None:
        """``num_blocks`` per replica (``paged_attention_config.num_blocks``), ``replicas`` pools."""
        if num_blocks < 2:
            raise ValueError(f"paged_attention_num_blocks: needs at least 2 KV blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.replicas = replicas
        self.enable_caching = enable_caching
        # replica r's free blocks, its padding block r * num_blocks left out; pop() hands out low ids first
        self._free: list[list[int]] = [list(range((r + 1) * num_blocks - 1, r * num_blocks, -1)) for r in range(replicas)]
        self.tables: dict[str, list[int]] = {}
        self._replica: dict[str, int] = {}  # sequence -> the replica whose pool its table draws from
        self._refs: dict[int, int] = {}  # held block -> number of tables holding it
        # per replica: its keyed blocks nobody holds, oldest first
        self._evictable: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(replicas)]
        self._block_of: dict[tuple[int, bytes], int] = {}  # (replica, key) -> the block holding that prefix's KV there
        self._key_of: dict[int, bytes] = {}  # keyed block -> its key (its replica is block // num_blocks)
        self._num_keyed: dict[str, int] = {}  # sequence -> leading table blocks already offered to the cache

    @property
    def num_free(self) -> int:
        """Blocks sequences can be given, over every replica: the free ones and the evictable cached ones."""
        return sum(map(len, self._free)) + sum(map(len, self._evictable))

    def num_free_on(self, replica: int) -> int:
        """Blocks a sequence of ``replica`` can be given."""
        return len(self._free[replica]) + len(self._evictable[replica])

    @property
    def num_usable(self) -> int:
        """Blocks sequences may ever hold, over every replica (all but each one's padding block)."""
        return self.replicas * self.num_usable_per_replica

    @property
    def num_usable_per_replica(self) -> int:
        """Blocks the sequences of one replica may ever hold (all of its pool but the padding block)."""
        return self.num_blocks - 1

    @property
    def num_cached(self) -> int:
        """Blocks holding a cached prefix (held or evictable)."""
        return len(self._key_of)

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one sequence can keep in the cache (its replica's)."""
        return self.num_usable_per_replica * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # -- admission ------------------------------------------------------------------

    def cached_prefix(self, hashes: list[bytes], num_tokens: int, start: int = 0, replica: int = 0) -> list[int]:
        """The blocks of ``replica`` caching the prefix keyed by ``hashes[start:]``, stopping at
        the first miss and before the block of the last of ``num_tokens`` tokens."""
        if not self.enable_caching:
            return []
        found = []
        for key in hashes[start : (num_tokens - 1) // self.block_size]:
            block = self._block_of.get((replica, key))
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, num_tokens: int, reserve: int = 0, cached: list[int] | None = None, replica: int = 0) -> bool:
        """Room on ``replica`` for a new sequence of ``num_tokens`` whose first blocks are the
        ``cached`` ones (from ``cached_prefix``) while keeping ``reserve`` blocks free."""
        cached = cached or []
        evictable_hits = sum(block in self._evictable[replica] for block in cached)
        return self.blocks_needed(num_tokens) - len(cached) + evictable_hits + reserve <= self.num_free_on(replica)

    def allocate(self, seq_id: str, num_tokens: int, cached: list[int] | None = None, replica: int = 0) -> list[int]:
        """Give ``seq_id`` enough blocks for ``num_tokens`` tokens: a new table draws from
        ``replica``'s pool and starts with the ``cached`` blocks (from ``cached_prefix``); an
        existing one grows from its own replica's pool."""
        table = self.tables.get(seq_id)
        if table is None:
            table = self.tables[seq_id] = [self._hold(block) for block in cached or []]
            self._num_keyed[seq_id] = len(table)
            self._replica[seq_id] = replica
        replica = self._replica[seq_id]
        extra = self.blocks_needed(num_tokens) - len(table)
        if extra > self.num_free_on(replica):
            raise MemoryError(f"KV cache exhausted: {seq_id} needs {extra} more blocks, {self.num_free_on(replica)} free "
                              f"on replica {replica}")  # fmt: skip
        table.extend(self._take(replica) for _ in range(max(extra, 0)))
        return table

    def replica_of(self, seq_id: str) -> int:
        """The replica holding ``seq_id``'s KV: the one whose pool its table draws from."""
        return self._replica[seq_id]

    def padding_block(self, seq_id: str) -> int:
        """The block the padding entries of ``seq_id``'s table point to: its replica's first."""
        return self._replica[seq_id] * self.num_blocks

    def reuse_cached(self, seq_id: str, hashes: list[bytes], num_computed: int, num_tokens: int) -> int:
        """Swap the allocated but uncomputed blocks after ``num_computed`` tokens for cached
        ones holding the same prefix (another sequence computed it since this one was
        admitted); returns how many tokens are computed now."""
        if num_computed % self.block_size:  # the next block is partly computed: it is this sequence's own
            return num_computed
        start = num_computed // self.block_size
        table = self.tables[seq_id]
        for index, block in enumerate(self.cached_prefix(hashes, num_tokens, start, self._replica[seq_id]), start):
            fresh, table[index] = table[index], self._hold(block)
            self._release(fresh)
            self._num_keyed[seq_id] = index + 1
            num_computed += self.block_size
        return num_computed

    def _hold(self, block: int) -> int:
        """Take a hold on a cached block (it leaves the evictable queue on its first hold)."""
        self._evictable[block // self.num_blocks].pop(block, None)
        self._refs[block] = self._refs.get(block, 0) + 1
        return block

    def _take(self, replica: int) -> int:
        """A block for new KV on ``replica``: a free one, else the least recently used evictable one."""
        if self._free[replica]:
            block = self._free[replica].pop()
        else:
            block, _ = self._evictable[replica].popitem(last=False)
            del self._block_of[(replica, self._key_of.pop(block))]
        self._refs[block] = 1
        return block

    # -- growth, forks, release -----------------------------------------------------

    def can_append(self, seq_id: str, num_tokens: int) -> bool:
        """Whether ``seq_id``'s table can grow to hold ``num_tokens`` tokens (from its replica's pool)."""
        return self.blocks_needed(num_tokens) - len(self.tables[seq_id]) <= self.num_free_on(self._replica[seq_id])

    def append(self, seq_id: str, num_tokens: int) -> list[int]:
        """Grow the table of an admitted sequence to hold ``num_tokens`` tokens."""
        assert seq_id in self.tables, f"append to unallocated sequence {seq_id}"
        return self.allocate(seq_id, num_tokens)

    def can_fork(self, num_tokens: int, reserve: int = 0, replica: int = 0) -> bool:
        """Room on ``replica`` (the parent's) for a fork of a ``num_tokens`` prefix (one private
        block for a partial tail) while keeping ``reserve`` blocks free."""
        return (1 if num_tokens % self.block_size else 0) + reserve <= self.num_free_on(replica)

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> tuple[int, int] | None:
        """Give ``child_id`` the first ``num_tokens`` tokens of ``parent_id``'s table.

        Full blocks are shared; a partly filled last block is replaced by a fresh one of the
        parent's replica, and the ``(source, copy)`` pair is returned so the caller copies
        its KV contents.
        """
        assert child_id not in self.tables, f"fork into existing sequence {child_id}"
        full, tail = divmod(num_tokens, self.block_size)
        self.tables[child_id] = [self._hold(block) for block in self.tables[parent_id][:full]]
        self._num_keyed[child_id] = min(self._num_keyed[parent_id], full)
        replica = self._replica[child_id] = self._replica[parent_id]
        if not tail:
            return None
        copy = self._take(replica)
        self.tables[child_id].append(copy)
        return self.tables[parent_id][full], copy

    def cache_computed(self, seq_id: str, hashes: list[bytes], num_computed: int) -> None:
        """Key the blocks of ``seq_id`` that its first ``num_computed`` tokens fill, so later
        sequences can reuse them; ``hashes`` must cover those blocks (``block_hashes``).
        A prefix some other block already holds keeps that block as its cached copy."""
        if not self.enable_caching:
            return
        table, first, replica = self.tables[seq_id], self._num_keyed[seq_id], self._replica[seq_id]
        for index in range(first, num_computed // self.block_size):
            key, block = hashes[index], table[index]
            if (replica, key) not in self._block_of:
                self._block_of[(replica, key)], self._key_of[block] = block, key
        self._num_keyed[seq_id] = max(first, num_computed // self.block_size)

    def free(self, seq_id: str) -> None:
        """Drop ``seq_id``'s hold on its blocks (a no-op for unknown ids).  A block nobody
        holds any more returns to the free list, or, when it holds a cached prefix, to the
        end of the evictable queue (the table's last blocks first, so they go first)."""
        self._num_keyed.pop(seq_id, None)
        self._replica.pop(seq_id, None)
        for block in reversed(self.tables.pop(seq_id, [])):
            self._release(block)

    def num_released_by(self, seq_ids: list[str]) -> int:
        """Blocks freeing every one of ``seq_ids`` would give back: those no other table holds."""
        held = Counter(block for seq_id in seq_ids for block in self.tables[seq_id])
        return sum(self._refs[block] == count for block, count in held.items())

    def _release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block]:
            return
        del self._refs[block]
        if block in self._key_of:
            self._evictable[block // self.num_blocks][block] = None
        else:
            self._free[block // self.num_blocks].append(block)

    def slot(self, seq_id: str, position: int) -> int:
        table = self.tables[seq_id]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def check_invariants(self) -> None:
        """Every usable block is exactly one of free, held or evictable, each replica's padding
        block none of them; a table and a free list hold only blocks of their replica; a held
        block's count is the number of tables holding it, and no table holds a block twice;
        cache keys and keyed blocks map one to one, every evictable block is keyed and no
        free block is."""
        held: dict[int, int] = {}
        for table in self.tables.values():
            assert len(table) == len(set(table)), "a block table lists a KV block twice"
            for block in table:
                held[block] = held.get(block, 0) + 1
        for replica, pool in enumerate(self._free):
            assert all(block // self.num_blocks == replica for block in pool), "a free list holds another replica's block"
        free = [block for pool in self._free for block in pool]
        evictable = [block for queue in self._evictable for block in queue]
        assert all(block // self.num_blocks == r for r, queue in enumerate(self._evictable) for block in queue), \
            "an evictable queue holds another replica's block"
        everything = list(held) + free + evictable
        assert len(everything) == len(set(everything)), "a KV block is two of held, free and evictable, or freed twice"
        usable = [block for block in range(self.replicas * self.num_blocks) if block % self.num_blocks]
        assert sorted(everything) == usable, "a KV block leaked"
        assert held == self._refs, "a KV block is shared without a fork (its reference count is wrong)"
        for seq_id, table in self.tables.items():
            assert all(block // self.num_blocks == self._replica.get(seq_id) for block in table), "a table holds another replica's block"
        assert {b: k for (r, k), b in self._block_of.items()} == self._key_of, "prefix-cache keys and blocks disagree"
        assert all(b // self.num_blocks == r for (r, _), b in self._block_of.items()), "a replica's key names another replica's block"
        assert set(evictable) <= set(self._key_of), "an evictable KV block holds no cached prefix"
        assert not set(free) & set(self._key_of), "a free KV block is still keyed in the prefix cache"
        assert self._num_keyed.keys() == self.tables.keys() == self._replica.keys(), "a sequence's bookkeeping outlived its table"
        assert self.enable_caching or not self._key_of, "prefix caching is off but blocks are cached"
