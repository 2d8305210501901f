"""Continuous-batching scheduler: each step gives every data-parallel replica with work its own
batch, a prefill or a decode in the smallest bucket that fits.

Every admitted sequence holds KV blocks for all its tokens and a count of those already in
the cache (``num_computed_tokens``).  A step computes, per row, a span of positions:

* **prefill**: the next chunk of a sequence's uncomputed tokens, at most
  ``prefill_chunk_size`` long, in a prefill bucket whose attention size covers the chunk's
  end (the paged-attention instruction reads earlier positions through the block table);
* **decode**: one position per row: the newest token of a sequence that is caught up, or
  the next uncomputed token of one whose context is past every prefill bucket (a prompt
  longer than the prefill buckets, or a long sequence recomputed after preemption).

The scheduler config (furiosa-llm ``SchedulerConfig``) is honoured as follows:

* ``max_processing_samples``: at most this many sequences hold KV blocks at once on a
  replica, and no bucket batch is larger;
* ``spare_blocks_ratio``: while others run, a new sequence is admitted only if this share of
  all blocks stays free afterwards, so running sequences can grow without preemption;
* ``is_offline``: throughput mode, admits new sequences on a replica only while its running
  set fits in the largest decode batch of every virtual engine; online mode admits whatever
  fits (lowest time to first token) and decodes the running set in rotating batches;
* ``prefill_chunk_size``: prompts are prefilled in chunks and a decode step runs between two
  chunks, so a long prompt does not stall the requests already generating;
* ``npu_queue_limit``: accepted, not modelled as a bound: the host submits each step as soon
  as it is scheduled, and on the modelled clock the step waits for the pipeline stages it
  needs (``replica_timer.py``).

With ``virtual_engines`` > 1 (one per pipeline stage, as vLLM runs ``pipeline_parallel_size``
virtual engines), the running sequences are split into that many groups and each step takes
its rows from one group, the groups in turn: a sequence joins the group of a running
sibling (a sample or beam of its request) or else the one with the fewest running, and stays
there while it runs.  Consecutive steps of a request thus depend on each other while the
other groups' steps fill the other pipeline stages (the modelled clock,
``replica_timer.py``); with one virtual engine every step takes from all running sequences.

With data-parallel replicas each replica runs as its own engine would: it has its own KV pool
(``BlockManager``), a sequence is admitted on a replica whose pool and limits hold it, which
the ``placement`` (``ReplicaTimer.admit``) picks, and the admission rules
(``max_processing_samples``, the offline limit, ``spare_blocks_ratio``) and preemption apply
per replica.  A step (``schedule_step``) gives every replica with something to run its own
batch: its own virtual engine in turn, phase, rows and bucket, chosen from its own sequences
alone.  The engine puts each batch on the modelled clock (each replica's stages,
``replica_timer.py``) and runs the batches of a phase together on the host where a bucket
holds them (``ModelRunner.run``); ``schedule`` hands the batches out one at a time (with one
replica, one per step).

When a sequence cannot grow, the most recently admitted one on its replica is preempted: its
blocks are freed and it waits to be recomputed (greedy results are unchanged by this).  The waiting
queue is kept in request order, so a preempted sequence, or a beam forked off a running
request, goes ahead of younger requests; when nothing can run because running beams wait
for siblings that wait for blocks, the youngest request gives its blocks up, on the replica
where that makes room for the first waiting sequence soonest (``_unblock``).

With automatic prefix caching (``BlockManager``), a sequence is admitted on the cached
blocks of its longest cached prefix and starts with those tokens computed; before each
step, a running sequence whose next blocks another sequence has computed since (requests
sharing a system prompt, admitted together) swaps its fresh blocks for them.  A prefill
bucket computes its whole attention size whatever the span, so the few uncached tokens
after a long cached prefix are caught up in decode steps, one position per step next to
the decoding rows, when they are at most ``1 / DECODE_TAIL_RATIO`` of the prefill bucket
that would hold them (a decode row costs about one prefill column; the bound caps the
extra steps before the first token).

The samples of an ``n > 1`` request are forks: only the first one prefills the prompt; the
engine then admits the others on its KV (``can_fork`` / ``admit_fork``), or queues them to
prefill on their own when there is no room.  Beam search forks the same way at every step;
a beam whose next-token logits are computed waits, with nothing to compute, until its
siblings' are too.  A request asking for prompt logprobs takes nothing from the prefix
cache: every prompt position must be computed to give its logits.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from furiosa_runtime.engine.block_manager import BlockManager, block_hashes
from furiosa_runtime.engine.replica_timer import ReplicaTimer
from furiosa_runtime.engine.sequence import Sequence, Status
from furiosa_runtime.npu.artifact import Bucket, SchedulerConfig, smallest_bucket

logger = logging.getLogger(__name__)

Span = tuple[int, int]  # positions [start, end) a step computes for one row
DECODE_TAIL_RATIO = 4  # decode a tail of at most this share (1/4) of its prefill bucket


@dataclass
class Batch:
    phase: str  # "prefill" | "decode"
    bucket: Bucket
    seqs: list[Sequence]
    spans: list[Span]
    virtual_engine: int = 0  # the group of running sequences the rows come from
    replica: int = 0  # the data-parallel replica holding every row's KV


def _group(seq: Sequence) -> str:
    """The request ``seq`` belongs to (a sample or beam's parent request)."""
    return seq.group_id or seq.request_id


def validate_scheduler_config(config: SchedulerConfig) -> None:
    """Raise a one-line ValueError for a scheduler value outside its domain."""
    checks = [
        (config.npu_queue_limit >= 1, "npu_queue_limit", "an integer >= 1", config.npu_queue_limit),
        (config.max_processing_samples >= 1, "max_processing_samples", "an integer >= 1", config.max_processing_samples),
        (0.0 <= config.spare_blocks_ratio < 1.0, "spare_blocks_ratio", "in [0, 1)", config.spare_blocks_ratio),
        (config.prefill_chunk_size is None or config.prefill_chunk_size >= 1, "prefill_chunk_size",
         "None or an integer >= 1", config.prefill_chunk_size),
    ]  # fmt: skip
    for ok, name, allowed, value in checks:
        if not ok:
            raise ValueError(f"scheduler_config.{name} must be {allowed}, got {value!r}")


def _reach(buckets: list[Bucket]) -> list[int]:
    """``reach[n]``: the longest context some bucket of at least ``n`` rows holds, for n up
    to the largest batch (what ``smallest_bucket`` finds a bucket for, as a table lookup:
    the scheduler asks once per candidate row and step)."""
    reach = [0] * (max((b.batch_size for b in buckets), default=0) + 1)
    for b in buckets:
        for n in range(b.batch_size + 1):
            reach[n] = max(reach[n], b.attention_size)
    return reach


def _fits(reach: list[int], batch: int, length: int) -> bool:
    """Whether some bucket holds ``batch`` rows of ``length`` context (see ``_reach``)."""
    return batch < len(reach) and length <= reach[batch]


class Scheduler:
    def __init__(self, prefill: list[Bucket], decode: list[Bucket], blocks: BlockManager, config: SchedulerConfig,
                 virtual_engines: int = 1, placement: ReplicaTimer | None = None) -> None:  # fmt: skip
        """``placement`` picks the replica of each admitted sequence (with none, every one goes
        to replica 0)."""
        validate_scheduler_config(config)
        self.virtual_engines = virtual_engines  # batches in flight at once: one per pipeline stage
        self.placement = placement
        self.prefill_buckets = prefill
        self.decode_buckets = decode
        self.blocks = blocks
        self.config = config
        self._index_buckets()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_steps = 0
        self.num_preemptions = 0
        self.prefix_cache_queried_tokens = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_cache_hit_tokens = 0  # of which were found computed in cached blocks
        self.replicas = blocks.replicas  # data-parallel replicas: each schedules as an engine of its own
        # each replica's virtual engines' last phase (chunked prefill interleaves)
        self._last_phase = [["decode"] * virtual_engines for _ in range(self.replicas)]
        self._engine: dict[str, int] = {}  # running sequence id -> its virtual engine
        self._turn = [0] * self.replicas  # the virtual engine each replica's next batch takes its rows from first
        self._handed: deque[Batch] = deque()  # batches of the current step ``schedule`` has not handed out yet
        self._ages: dict[str, int] = {}  # request id -> the order it was first queued in (``_age``)
        self._held: Counter[str] = Counter()  # request id -> its sequences waiting or running
        self._running_groups: Counter[str] = Counter()  # request id -> its running sequences
        self._running_on = [0] * self.replicas  # running sequences per replica
        self._age_counter = itertools.count()

    def _index_buckets(self) -> None:
        """What the scheduling rules read of the bucket lists."""
        self.max_prefill_len = max(b.attention_size for b in self.prefill_buckets)
        # An embedding artifact (task=embed) has no decode buckets.
        self.max_decode_batch = min(max((b.batch_size for b in self.decode_buckets), default=0), self.config.max_processing_samples)
        self._prefill_reach = _reach(self.prefill_buckets)
        self._decode_reach = _reach(self.decode_buckets)

    def add_bucket(self, bucket: Bucket) -> None:
        """Schedule steps in one more bucket (compiled after the artifact, ``jit.py``) from the next step on."""
        (self.prefill_buckets if bucket.is_prefill else self.decode_buckets).append(bucket)
        self._index_buckets()

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` behind every sequence of an older request (a new request's goes last;
        a beam or sample forked off a running request's goes ahead of younger requests)."""
        self._held[_group(seq)] += 1
        self._enqueue(seq)

    def _enqueue(self, seq: Sequence) -> None:
        """Put ``seq`` in the waiting queue, which is kept in request order (``_age``): after
        the last one of its age or older (at the end for a new request, without a scan)."""
        age = self._age(seq)
        if not self.waiting or self._age(self.waiting[-1]) <= age:
            self.waiting.append(seq)
            return
        position = next(i for i, other in enumerate(self.waiting) if self._age(other) > age)
        self.waiting.insert(position, seq)

    def _age(self, seq: Sequence) -> int:
        """The order in which ``seq``'s request was first seen: the older request goes first."""
        group = _group(seq)
        if group not in self._ages:
            self._ages[group] = next(self._age_counter)
        return self._ages[group]

    def _forget(self, seq: Sequence) -> None:
        """``seq`` has left the queue and the running set for good: drop its request's age
        once none of the request's sequences is queued or running."""
        group = _group(seq)
        self._held[group] -= 1
        if self._held[group] <= 0:
            del self._held[group]
            self._ages.pop(group, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, seq: Sequence) -> None:
        """Drop ``seq`` wherever it is and return its blocks."""
        held = seq in self.waiting or seq in self.running
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self._stop(seq)
        self.blocks.free(seq.request_id)
        if held:
            self._forget(seq)

    def finish(self, seq: Sequence) -> None:
        self._stop(seq)
        self.blocks.free(seq.request_id)
        self._forget(seq)

    def computed(self, seq: Sequence, end: int) -> None:
        """Record that a step computed ``seq`` up to position ``end``; its full blocks join
        the prefix cache."""
        seq.num_computed_tokens = end
        self.blocks.cache_computed(seq.request_id, self._hashes(seq), end)

    def schedule(self) -> Batch | None:
        """The next batch to run: the next replica's of the current step, or, once every one
        has been handed out, the first of a new step (``schedule_step``); None when nothing
        can run.  With one replica every call is a step."""
        if not self._handed:
            self._handed.extend(self.schedule_step())
        return self._handed.popleft() if self._handed else None

    def schedule_step(self) -> list[Batch]:
        """Admit what fits, reuse what others cached since, then give every replica with
        something to run its batch of this step, in replica order: its virtual engine (its
        next in turn with something to run), phase, rows, spans and bucket.  Empty when
        nothing can run."""
        assert not self._handed, "the batches of the previous step are still being handed out (schedule)"
        self.num_steps += 1
        self._admit()
        self._reuse_cached()
        while True:
            batches = [batch for replica in range(self.replicas) if (batch := self._schedule_replica(replica)) is not None]
            if batches:
                return batches
            if not self._unblock():
                return []
            self._admit()

    def _schedule_replica(self, replica: int) -> Batch | None:
        """The batch of ``replica``: from its next virtual engine in turn that has one."""
        for offset in range(self.virtual_engines):
            engine = (self._turn[replica] + offset) % self.virtual_engines
            batch = self._schedule_engine(replica, engine)
            if batch is not None:
                self._turn[replica] = (engine + 1) % self.virtual_engines
                return batch
        return None

    def _schedule_engine(self, replica: int, engine: int) -> Batch | None:
        """A batch of the running sequences of virtual engine ``engine`` on ``replica``, if they have one."""
        members = [s for s in self.running if self._engine[s.request_id] == engine and self._replica(s) == replica]
        order: list[Callable[[list[Sequence], int, int], Batch | None]] = [self._schedule_prefill, self._schedule_decode]
        if self.config.prefill_chunk_size is not None and self._last_phase[replica][engine] == "prefill":
            order.reverse()  # interleave: a decode step between two prefill chunks
        for make in order:
            batch = make(members, engine, replica)
            if batch is not None:
                self._last_phase[replica][engine] = batch.phase
                return batch
        return None

    def _replica(self, seq: Sequence) -> int:
        """The replica holding the KV of running ``seq``."""
        return self.blocks.replica_of(seq.request_id) if self.replicas > 1 else 0

    def _unblock(self) -> bool:
        """Nothing can run although sequences wait: every running sequence is a beam waiting
        for a sibling's logits while that sibling waits for KV blocks the running ones hold.
        Preempt the youngest running request's latest sequence, if it is younger than the
        first waiting one, and say whether something was freed; with several replicas, the
        youngest of the replica that is short of blocks (``_short_replica``).  The oldest
        request thus always progresses (it fits a replica's cache alone: ``EngineCore``
        refuses beams that do not), so this never cycles."""
        if not self.waiting:
            return False
        first = self._age(self.waiting[0])
        younger = [seq for seq in self.running if self._age(seq) > first]
        if not younger:
            return False
        if self.replicas > 1:
            younger = self._short_replica(self.waiting[0], younger)
        self._preempt(max(reversed(younger), key=self._age))  # the latest admitted of the youngest request
        return True

    def _short_replica(self, seq: Sequence, younger: list[Sequence]) -> list[Sequence]:
        """Of ``younger`` (running sequences of younger requests than waiting ``seq``), those of
        the replica where preempting them, youngest first, admits ``seq`` after the fewest
        (the replica short of the blocks ``seq`` needs; the first such, on a tie); all of
        them if no replica would hold it."""
        needed, limit = self.blocks.blocks_needed(seq.num_tokens), self._admission_limit()
        counts = self._running_on
        best: tuple[int, int] | None = None  # (preemptions, replica)
        for replica in range(self.replicas):
            here = [s for s in younger if self._replica(s) == replica]
            here.sort(key=lambda s: (self._age(s), self.running.index(s)), reverse=True)  # the order _unblock preempts them in
            for count in range(1, len(here) + 1):
                freed = self.blocks.num_released_by([s.request_id for s in here[:count]])
                reserve = 0 if count == counts[replica] else self._spare_blocks(replica, seq)
                if counts[replica] - count < limit and needed + reserve <= self.blocks.num_free_on(replica) + freed:
                    best = min(best or (count, replica), (count, replica))
                    break
        if best is None:
            return younger
        return [s for s in younger if self._replica(s) == best[1]]

    # -- admission ------------------------------------------------------------------

    def _admission_limit(self) -> int:
        """The most sequences one replica runs at once."""
        limit = self.config.max_processing_samples
        return min(limit, self.max_decode_batch * self.virtual_engines) if self.config.is_offline else limit

    def _admit(self) -> None:
        limit = self._admission_limit()
        while self.waiting and min(self._running_on) < limit:
            seq = self.waiting[0]
            engine = self._engine_for(seq)
            placed = self._place(seq, engine)
            if placed is None:
                return
            replica, cached = placed
            self.waiting.popleft()
            self.blocks.allocate(seq.request_id, seq.num_tokens, cached, replica=replica)
            if self.blocks.enable_caching:
                self.prefix_cache_queried_tokens += seq.num_tokens
            self._start(seq, len(cached) * self.blocks.block_size, engine)
            self._count_hit(seq, seq.num_computed_tokens)

    def _place(self, seq: Sequence, engine: int) -> tuple[int, list[int]] | None:
        """The replica to admit ``seq`` (of virtual engine ``engine``) on, if one has room
        (below the admission limit, and blocks for it), and the cached blocks of its prefix
        there: the replica caching the longest prefix of it when that one has room, else the
        ``placement``'s pick."""
        limit = self._admission_limit()
        hashes = self._hashes(seq) if seq.params.prompt_logprobs is None else []
        cached = [self.blocks.cached_prefix(hashes, seq.num_tokens, replica=r) for r in range(self.replicas)]

        def fits(replica: int) -> bool:
            if self._running_on[replica] >= limit:
                return False
            reserve = self._spare_blocks(replica, seq)
            return self.blocks.can_allocate(seq.num_tokens, reserve=reserve, cached=cached[replica], replica=replica)

        def admit(allowed: Callable[[int], bool]) -> int | None:
            if self.placement is None:
                return 0 if allowed(0) else None
            return self.placement.admit(seq.request_id, engine, allowed)

        warm = max(range(self.replicas), key=lambda r: (len(cached[r]), -r))  # the longest cached prefix, lowest replica on a tie
        replica = admit(lambda r: r == warm and fits(r)) if cached[warm] else None
        if replica is None:
            replica = admit(fits)
        return None if replica is None else (replica, cached[replica])

    def _reuse_cached(self) -> None:
        """Let running sequences take over cached blocks of their still uncomputed prefix."""
        if not self.blocks.enable_caching:
            return
        for seq in self.running:
            if seq.num_uncomputed > self.blocks.block_size and seq.params.prompt_logprobs is None:
                computed = self.blocks.reuse_cached(seq.request_id, self._hashes(seq), seq.num_computed_tokens, seq.num_tokens)
                self._count_hit(seq, computed - seq.num_computed_tokens)
                seq.num_computed_tokens = computed

    def _count_hit(self, seq: Sequence, tokens: int) -> None:
        """Count ``tokens`` of ``seq`` found in the prefix cache."""
        self.prefix_cache_hit_tokens += tokens
        if not seq.output_token_ids:  # a prompt's hits, not a preempted sequence's recomputation
            seq.num_cached_tokens += tokens

    def _hashes(self, seq: Sequence) -> list[bytes]:
        """The prefix-cache keys of ``seq``'s full blocks (extended as it grows)."""
        if not self.blocks.enable_caching:
            return []
        if len(seq.block_hashes) == seq.num_tokens // self.blocks.block_size:  # no new full block: skip joining the tokens
            return seq.block_hashes
        return block_hashes(seq.token_ids, self.blocks.block_size, seq.block_hashes)

    def _spare_blocks(self, replica: int, seq: Sequence | None = None) -> int:
        """Blocks an admission on ``replica`` must leave free: ``spare_blocks_ratio`` of its pool,
        while others run there, unless ``seq`` belongs to a running request (a beam or sample
        of it: the spare blocks are there for the running requests to grow)."""
        if not self._running_on[replica] or (seq is not None and self._running_groups[_group(seq)]):
            return 0
        return int(self.blocks.num_blocks * self.config.spare_blocks_ratio)

    def _start(self, seq: Sequence, computed: int, engine: int) -> None:
        seq.status, seq.num_computed_tokens, seq.admitted_at = Status.RUNNING, computed, self.num_steps
        self._engine[seq.request_id] = engine
        self.running.append(seq)
        self._running_on[self._replica(seq)] += 1
        self._running_groups[_group(seq)] += 1

    def _stop(self, seq: Sequence) -> None:
        """Take running ``seq`` out of the running set (before its blocks are freed)."""
        self.running.remove(seq)
        self._engine.pop(seq.request_id)
        self._running_on[self._replica(seq)] -= 1
        self._running_groups[_group(seq)] -= 1
        if not self._running_groups[_group(seq)]:
            del self._running_groups[_group(seq)]

    def _engine_for(self, seq: Sequence) -> int:
        """The virtual engine of a running sibling of ``seq`` (its steps depend on theirs), or
        else the one running the fewest sequences."""
        if self.virtual_engines == 1:
            return 0
        request = _group(seq)
        sibling = next((s for s in self.running if _group(s) == request), None)
        if sibling is not None:
            return self._engine[sibling.request_id]
        load = Counter(self._engine.values())
        return min(range(self.virtual_engines), key=lambda engine: (load[engine], engine))

    def can_fork(self, parent: Sequence) -> bool:
        """Whether a sample of ``parent``'s request can be admitted on its computed prompt
        now on its replica (the same admission rules as a new sequence, for the one block a
        fork may need)."""
        replica = self._replica(parent)
        return self._running_on[replica] < self._admission_limit() and self.blocks.can_fork(
            parent.num_computed_tokens, reserve=self._spare_blocks(replica), replica=replica)  # fmt: skip

    def admit_fork(self, child: Sequence) -> None:
        """Run ``child``, whose KV (its whole prompt) the model runner has just forked."""
        self._held[_group(child)] += 1
        self._start(child, child.num_tokens, self._engine_for(child))

    # -- prefill --------------------------------------------------------------------

    def _prefill_span(self, seq: Sequence) -> Span | None:
        """The next chunk of ``seq`` a prefill bucket can compute, if any."""
        start = seq.num_computed_tokens
        if seq.num_tokens - start < 2 or start >= self.max_prefill_len:
            return None
        end = min(seq.num_tokens, self.max_prefill_len)
        if self.config.prefill_chunk_size is not None:
            end = min(end, start + self.config.prefill_chunk_size)
        if start and self._cheaper_in_decode(seq, end):
            return None
        return start, end

    def _cheaper_in_decode(self, seq: Sequence, end: int) -> bool:
        """Whether ``seq``'s uncomputed tail is short enough to catch up in decode steps
        rather than pad out a prefill bucket reaching position ``end``."""
        prefill = smallest_bucket(self.prefill_buckets, 1, end)
        fits_decode = smallest_bucket(self.decode_buckets, 1, seq.num_tokens) is not None
        return fits_decode and prefill is not None and seq.num_uncomputed * DECODE_TAIL_RATIO <= prefill.attention_size

    def _schedule_prefill(self, running: list[Sequence], engine: int, replica: int) -> Batch | None:
        seqs: list[Sequence] = []
        spans: list[Span] = []
        longest = 0  # the furthest span end of the rows taken
        for seq in running:
            span = self._prefill_span(seq)
            if span is None or len(seqs) == self.config.max_processing_samples:
                continue
            if not _fits(self._prefill_reach, len(seqs) + 1, max(longest, span[1])):
                continue
            seqs.append(seq)
            spans.append(span)
            longest = max(longest, span[1])
        if not seqs:
            return None
        bucket = smallest_bucket(self.prefill_buckets, len(seqs), max(end for _, end in spans))
        assert bucket is not None
        return Batch("prefill", bucket, seqs, spans, engine, replica)

    # -- decode ---------------------------------------------------------------------

    def _schedule_decode(self, running: list[Sequence], engine: int, replica: int) -> Batch | None:
        candidates = [s for s in running if s.num_uncomputed and self._prefill_span(s) is None]
        candidates.sort(key=lambda s: (s.last_step, s.admitted_at))  # least recently decoded first
        seqs: list[Sequence] = []
        longest = 0  # the longest context of the rows taken
        for seq in candidates:
            if len(seqs) == self.max_decode_batch:
                break
            if seq.status is not Status.RUNNING:  # preempted to make room for an earlier row
                continue
            position = seq.num_computed_tokens
            if not _fits(self._decode_reach, len(seqs) + 1, max(longest, position + 1)):
                continue
            if self._make_room(seq, position + 1, seqs):
                seqs.append(seq)
                longest = max(longest, position + 1)
        if not seqs:
            return None
        for seq in seqs:
            seq.last_step = self.num_steps
        spans = [(s.num_computed_tokens, s.num_computed_tokens + 1) for s in seqs]
        bucket = smallest_bucket(self.decode_buckets, len(seqs), max(end for _, end in spans))
        assert bucket is not None
        return Batch("decode", bucket, seqs, spans, engine, replica)

    def _make_room(self, seq: Sequence, num_tokens: int, keep: list[Sequence]) -> bool:
        """Grow ``seq`` to ``num_tokens``, preempting the latest admitted others of its replica
        if needed.

        Returns False when ``seq`` itself had to be preempted.
        """
        replica = self._replica(seq)
        while not self.blocks.can_append(seq.request_id, num_tokens):
            # running is in admission order; only the sequences of seq's replica free blocks it can use
            victim = next(s for s in reversed(self.running) if s not in keep and self._replica(s) == replica)
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.append(seq.request_id, num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks; it is recomputed from scratch when readmitted."""
        self._stop(seq)
        self.blocks.free(seq.request_id)
        self.num_preemptions += 1
        logger.warning("sequence %s preempted (recomputed when readmitted) because the KV cache is full: %d preemptions "
                       "so far; more KV blocks (paged_attention_num_blocks) or a higher spare_blocks_ratio avoid it",
                       seq.request_id, self.num_preemptions)  # fmt: skip
        seq.status, seq.num_computed_tokens = Status.WAITING, 0
        self._enqueue(seq)
