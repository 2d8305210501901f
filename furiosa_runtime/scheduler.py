"""Continuous-batching scheduler: each step is a prefill of waiting requests or a decode
of running ones, in the smallest bucket that fits.

Prefill goes first whenever a waiting request fits in a prefill bucket and in the free
KV blocks beyond the spare share (``spare_blocks_ratio``) kept for running requests to
grow into.  Otherwise every running request decodes one token, in batches of at most the
largest decode bucket.  When a running request cannot grow, the most recently admitted
one is preempted: its blocks are freed and it re-enters the waiting queue to be
recomputed later (greedy results are unchanged by this).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from furiosa_runtime.artifact import Bucket, SchedulerConfig
from furiosa_runtime.block_manager import BlockManager
from furiosa_runtime.model_runner import smallest_bucket
from furiosa_runtime.sequence import Sequence, Status


@dataclass
class Batch:
    phase: str  # "prefill" | "decode"
    bucket: Bucket
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, prefill: list[Bucket], decode: list[Bucket], blocks: BlockManager, config: SchedulerConfig) -> None:
        self.prefill_buckets = prefill
        self.decode_buckets = decode
        self.blocks = blocks
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.blocks.free(request_id)
                    return seq
        return None

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)

    def schedule(self) -> Batch | None:
        return self._schedule_prefill() or self._schedule_decode()

    def _spare_blocks(self) -> int:
        return int(self.blocks.num_blocks * self.config.spare_blocks_ratio) if self.running else 0

    def _schedule_prefill(self) -> Batch | None:
        chosen: list[Sequence] = []
        max_batch = min(max(b.batch_size for b in self.prefill_buckets), self.config.max_processing_samples)
        needed = 0
        for seq in self.waiting:
            if len(chosen) == max_batch:
                break
            longest = max([seq.num_tokens, *(s.num_tokens for s in chosen)])
            if smallest_bucket(self.prefill_buckets, len(chosen) + 1, longest) is None:
                break
            blocks = self.blocks.blocks_needed(seq.num_tokens)
            if needed + blocks + self._spare_blocks() > self.blocks.num_free:
                break
            needed += blocks
            chosen.append(seq)
        if not chosen:
            return None
        bucket = smallest_bucket(self.prefill_buckets, len(chosen), max(s.num_tokens for s in chosen))
        assert bucket is not None
        for seq in chosen:
            self.waiting.remove(seq)
            self.blocks.allocate(seq.request_id, seq.num_tokens)
            seq.status = Status.RUNNING
            self.running.append(seq)
        return Batch("prefill", bucket, chosen)

    def _schedule_decode(self) -> Batch | None:
        max_batch = min(max(b.batch_size for b in self.decode_buckets), self.config.max_processing_samples)
        batch: list[Sequence] = []
        for seq in list(self.running):
            if len(batch) == max_batch:
                break
            while not self.blocks.can_append(seq.request_id, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.allocate(seq.request_id, seq.num_tokens)
                batch.append(seq)
        if not batch:
            return None
        bucket = smallest_bucket(self.decode_buckets, len(batch), max(s.num_tokens for s in batch))
        assert bucket is not None, "admission control guarantees a decode bucket"
        return Batch("decode", bucket, batch)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
