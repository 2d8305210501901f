"""Which data-parallel replica serves each sequence, and when each step runs on the modelled NPU.

**Placement.**  The scheduler admits a new sequence on the replica ``admit`` picks among
those whose KV pool and admission limits can hold it (``BlockManager``, ``scheduler.py``):
the one serving the fewest live sequences of its virtual engine (the scheduler's batch
group), then the fewest overall, then the one with the most free blocks (ties to the
lowest); the sequence's blocks come from that replica's pool and it stays there while it
holds them (a fork on its parent's).  Each step gives every replica with work its own batch
in its own bucket (``Scheduler.schedule_step``), which ``step`` puts on that replica's
stages; rows of several replicas handed to ``step`` at once (the model runner called on
its own) run each replica's in the smallest bucket of the same shape that holds them.
Balancing within a virtual engine keeps every engine's sequences spread over every replica.

**The clock**: what overlaps, and why.  Every pipeline stage of every replica is a resource
that holds one step at a time, taking steps in the order they are scheduled; a stage's part
of a step lasts its modelled busy time (``StageTimes``, from ``npu/step_times.py``).

* A replica's part of a step enters stage s when stage s is free and the activations from
  stage s - 1 have arrived (the transfers into s), so while one step is in stage 2 the next
  one can be in stage 1: with ``pp`` stages up to ``pp`` steps are in flight, as in a
  pipelined server (vLLM's virtual engines, furiosa-llm's pipeline parallelism over cards),
  and an offline workload runs at the rate of the slowest stage, not at the sum of them.
* It enters stage 0 no earlier than every one of its rows' requests is ready: arrived, and
  its previous step has left the last stage (the token it sampled is the next step's input).
  One request's steps therefore never overlap: a lone request still waits the sum of the
  stage times for each token, and only steps of other requests (the scheduler's other
  virtual engines) fill the pipeline.
* Data-parallel replicas are separate devices, each with its own stages: their parts of one
  step do not wait for each other, so a one-row prefill on one replica holds only that one.

``now`` is the clock: when every step run so far has left its last stage (or a later idle
wait); a request's (``Sequence.group_id``) token times are when its steps left the last
stage (``done``).  With one stage and one replica each step starts when the previous one
ends, and the clock is the sum of the step latencies.  Not modelled: contention for the
link between stages (a transfer is a delay, not a resource; activations are small next to a
stage's compute) and the host, which schedules each step at once, seeing the KV blocks
freed by steps still in flight (a stage holds its own layers' cache, and a later step
reaches each stage only after they left it).

``simulate`` times steps here, and so does the functional engine (``EngineCore.step``, with
``ModelRunner`` placing its rows here), so that their schedules and clocks are the same.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from furiosa_runtime.engine.block_manager import BlockManager
from furiosa_runtime.engine.sequence import Sequence
from furiosa_runtime.npu.artifact import Artifact, Bucket, smallest_bucket
from furiosa_runtime.npu.step_times import StepTimes
from furiosa_runtime.npu.timing import StageTimes

#: One replica's part of a step: the bucket it runs and the rows (batch indices) it holds.
ReplicaRun = tuple[Bucket, list[int]]


class ReplicaTimer:
    """Replica placement and the modelled clock over the mesh ``times`` was laid out on
    (``times.stages``: one step of each pipeline, stage by stage); ``blocks`` is the block
    manager whose tables say which sequences are live and on which replica."""

    def __init__(self, artifact: Artifact, times: StepTimes, blocks: BlockManager) -> None:
        self.artifact = artifact
        self.replicas = times.mesh.dp
        self.blocks = blocks
        self._stages = {p.bucket: times.stages[p.name] for p in artifact.pipelines}
        self._engine: dict[str, int] = {}  # placed sequence id -> its virtual engine
        self._free = [[0.0] * times.mesh.pp for _ in range(self.replicas)]  # when each replica's stage is next free
        self._ready: dict[str, float] = {}  # request id -> when its latest step left the last stage
        self.now = 0.0

    def step(self, bucket: Bucket, seqs: list[Sequence]) -> list[ReplicaRun]:
        """Run the batch of ``bucket`` over ``seqs`` on the clock (a scheduler's batch: one
        replica's rows), and return what each replica ran."""
        replicas = self.place(seqs)
        runs = self._runs(bucket, replicas)
        for run, rows in runs:
            self._through(replicas[rows[0]], self._stages[run], [seqs[row] for row in rows])
        return runs

    def admit(self, seq_id: str, virtual_engine: int, fits: Callable[[int], bool]) -> int | None:
        """The replica a new sequence of ``virtual_engine`` goes to, among those where ``fits``
        (its blocks fit that replica's pool), or None if it fits none (see the module docstring)."""
        if self.replicas == 1:
            return 0 if fits(0) else None
        replicas = [r for r in range(self.replicas) if fits(r)]
        if not replicas:
            return None
        self._engine = {sid: engine for sid, engine in self._engine.items() if sid in self.blocks.tables}  # the live ones
        load = Counter(self.blocks.replica_of(sid) for sid in self._engine)
        mine = Counter(self.blocks.replica_of(sid) for sid, engine in self._engine.items() if engine == virtual_engine)
        replica = min(replicas, key=lambda r: (mine[r], load[r], -self.blocks.num_free_on(r), r))
        self._engine[seq_id] = virtual_engine
        return replica

    def place(self, seqs: list[Sequence]) -> list[int]:
        """The replica of each row: the one holding its KV blocks."""
        if self.replicas == 1:
            return [0] * len(seqs)
        return [self.blocks.replica_of(seq.request_id) for seq in seqs]

    def seconds(self, bucket: Bucket, replicas: list[int]) -> float:
        """A lone step of ``bucket`` whose rows sit on ``replicas``: its slowest replica's part
        through every stage."""
        return max(self._stages[run].seconds for run, _ in self._runs(bucket, replicas))

    def done(self, request_id: str) -> float:
        """When the latest step of the request left the last stage: its newest token's time."""
        return self._ready[request_id]

    def forget(self, request_id: str) -> None:
        """Drop a request that has ended."""
        self._ready.pop(request_id, None)

    def wait_until(self, npu_time: float) -> None:
        """Let the clock idle until ``npu_time``; it never goes back."""
        self.now = max(self.now, npu_time)

    def add_bucket(self, artifact: Artifact, bucket: Bucket, stages: StageTimes) -> None:
        """Time one more bucket (compiled after the artifact, ``jit.py``); ``artifact`` is the
        artifact as served with it."""
        self.artifact = artifact
        self._stages[bucket] = stages

    def follow(self, child_id: str, parent_id: str) -> None:
        """Count a fork (on its parent's replica, where its KV is) in its parent's virtual engine."""
        if parent_id in self._engine:
            self._engine[child_id] = self._engine[parent_id]

    def _through(self, replica: int, stages: StageTimes, seqs: list[Sequence]) -> None:
        """Run one replica's part of a step, over the rows ``seqs``, through its stages (see
        the module docstring) and record when it leaves the last one."""
        free = self._free[replica]
        t = max(self._ready.get(seq.group_id, seq.metrics.npu_arrival_time) for seq in seqs)
        for stage, (busy, send) in enumerate(zip(stages.busy, stages.sends, strict=True)):
            t = free[stage] = max(t + send, free[stage]) + busy
        for seq in seqs:
            self._ready[seq.group_id] = max(t, self._ready.get(seq.group_id, t))  # a request's rows may sit on two replicas
        self.now = max(self.now, t)

    def _runs(self, bucket: Bucket, replicas: list[int]) -> list[ReplicaRun]:
        """Each replica's rows, in the smallest bucket of ``bucket``'s shape that holds them."""
        rows: dict[int, list[int]] = {}
        for row, replica in enumerate(replicas):
            rows.setdefault(replica, []).append(row)
        if len(rows) == 1:
            return [(bucket, list(range(len(replicas))))]
        return [(self._same_shape_bucket(bucket, len(held)), held) for held in rows.values()]

    def _same_shape_bucket(self, bucket: Bucket, rows: int) -> Bucket:
        """The smallest bucket with ``bucket``'s context shape holding ``rows`` rows."""
        gen = self.artifact.generator_config
        buckets = gen.prefill_buckets if bucket.is_prefill else gen.decode_buckets
        same = [b for b in buckets if (b.attention_size, b.kv_cache_size) == (bucket.attention_size, bucket.kv_cache_size)]
        part = smallest_bucket(same, rows, bucket.attention_size)
        assert part is not None, "bucket itself holds the rows"
        return part
