"""Which data-parallel replica serves each sequence, and how long a step takes on them.

The model runner's placement rule, without the runner: a new sequence goes to the replica
serving the fewest live sequences (ties to the lowest) and stays there while it holds KV
blocks; a step lasts as long as its slowest replica, each replica running its own rows in
the smallest bucket of the step's shape that holds them.  ``simulate`` times steps with
it, and so does ``ModelRunner``, so that its schedule and clock are the functional engine's.
"""

from __future__ import annotations

from collections import Counter

from furiosa_runtime.engine.block_manager import BlockManager
from furiosa_runtime.engine.sequence import Sequence
from furiosa_runtime.npu.artifact import Artifact, Bucket, smallest_bucket

#: One replica's part of a step: the bucket it runs and the rows (batch indices) it holds.
ReplicaRun = tuple[Bucket, list[int]]


class ReplicaTimer:
    """Replica placement and modelled step latency over ``replicas`` data-parallel replicas.

    ``seconds`` is one step of each pipeline by name (``StepTimes.seconds``); ``blocks`` the
    block manager whose tables say which sequences are live.
    """

    def __init__(self, artifact: Artifact, seconds: dict[str, float], replicas: int, blocks: BlockManager) -> None:
        self.artifact = artifact
        self.replicas = replicas
        self.blocks = blocks
        self._seconds = {p.bucket: seconds[p.name] for p in artifact.pipelines}
        self._replica: dict[str, int] = {}  # sequence id -> its replica

    def step(self, bucket: Bucket, seqs: list[Sequence]) -> tuple[float, list[ReplicaRun]]:
        """Place new sequences, then the step's modelled seconds and what each replica ran."""
        replicas = self.place(seqs)
        rows: dict[int, list[int]] = {}
        for row, replica in enumerate(replicas):
            rows.setdefault(replica, []).append(row)
        if len(rows) == 1:
            return self._seconds[bucket], [(bucket, list(range(len(seqs))))]
        runs = [(self._same_shape_bucket(bucket, len(held)), held) for held in rows.values()]
        return max(self._seconds[run] for run, _ in runs), runs

    def add_bucket(self, artifact: Artifact, bucket: Bucket, seconds: float) -> None:
        """Time one more bucket (compiled after the artifact, ``jit.py``); ``artifact`` is the
        artifact as served with it."""
        self.artifact = artifact
        self._seconds[bucket] = seconds

    def place(self, seqs: list[Sequence]) -> list[int]:
        """The replica of each row, giving new sequences one first."""
        if self.replicas == 1:
            return [0] * len(seqs)
        self._assign([seq for seq in seqs if seq.request_id not in self._replica])
        return [self._replica[seq.request_id] for seq in seqs]

    def seconds(self, bucket: Bucket, replicas: list[int]) -> float:
        """A step of ``bucket`` whose rows sit on ``replicas``: the slowest replica, each running
        its rows in the smallest bucket of this shape that holds them."""
        rows = Counter(replicas)
        if len(rows) == 1:
            return self._seconds[bucket]
        return max(self._seconds[self._same_shape_bucket(bucket, n)] for n in rows.values())

    def follow(self, child_id: str, parent_id: str) -> int:
        """Put a fork on its parent's replica (its KV is there) and return that replica."""
        replica = self._replica[child_id] = self._replica.get(parent_id, 0)
        return replica

    def _assign(self, seqs: list[Sequence]) -> None:
        """Give each new sequence the replica serving the fewest live sequences."""
        live = {rid: r for rid, r in self._replica.items() if rid in self.blocks.tables}
        load = Counter(live.values())
        for seq in seqs:
            replica = min(range(self.replicas), key=lambda r: (load[r], r))
            live[seq.request_id] = replica
            load[replica] += 1
        self._replica = live

    def _same_shape_bucket(self, bucket: Bucket, rows: int) -> Bucket:
        """The smallest bucket with ``bucket``'s context shape holding ``rows`` rows."""
        gen = self.artifact.generator_config
        buckets = gen.prefill_buckets if bucket.is_prefill else gen.decode_buckets
        same = [b for b in buckets if (b.attention_size, b.kv_cache_size) == (bucket.attention_size, bucket.kv_cache_size)]
        part = smallest_bucket(same, rows, bucket.attention_size)
        assert part is not None, "bucket itself holds the rows"
        return part
