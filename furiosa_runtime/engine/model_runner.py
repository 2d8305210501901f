"""Model runner: pad a batch of sequences into a bucket, run its pipeline, return logits.

Prompts are left-padded inside a prefill bucket so every row's last real token sits in
the last column (the head may compute only that column).  Padding tokens get slot -1:
the paged-attention instruction neither stores nor attends to them, so padding can never
change a result.

With data parallelism a sequence is admitted on a replica and stays there, its KV cache on
that replica's PEs; its block ids are global (replica r's pool is ``[r * num_blocks, (r + 1)
* num_blocks)``, the rows of the simulator's host KV arrays), so the feeds carry them as they
are and one host batch may hold rows of several replicas.  A step gives each replica its own
batch in its own bucket (``Scheduler.schedule_step``); ``run`` runs the batches of a phase
as one host batch while a bucket holds them all, so more replicas cost the host little more
than their rows, and it runs every step to the end before the next.  The modelled clock
(``replica_timer.py``) is what overlaps them: each replica runs its own batch in its own
bucket, through its own pipeline stages.  (``prefill`` and ``decode`` called directly with
rows of several replicas time each replica's rows in the smallest bucket of the same shape
that holds them.)
"""

from __future__ import annotations

import numpy as np

from furiosa_runtime.engine.block_manager import BlockManager
from furiosa_runtime.engine.replica_timer import ReplicaTimer
from furiosa_runtime.engine.scheduler import Batch
from furiosa_runtime.engine.sequence import Sequence
from furiosa_runtime.npu.artifact import Artifact, Bucket, Pipeline, smallest_bucket
from furiosa_runtime.npu.isa import Program
from furiosa_runtime.npu.simulator import NPUSimulator
from furiosa_runtime.npu.step_times import StepTimes


class ModelRunner:
    def __init__(self, simulator: NPUSimulator, artifact: Artifact, blocks: BlockManager) -> None:
        self.simulator = simulator
        self.blocks = blocks
        self.prefill_buckets = list(artifact.generator_config.prefill_buckets)
        self.decode_buckets = list(artifact.generator_config.decode_buckets)
        self.timer = ReplicaTimer(artifact, self._step_times(), blocks)  # replica placement and the modelled clock
        self.last_step_seconds = 0.0  # modelled NPU latency of the last step alone (its slowest replica, every stage)
        self.last_logits = np.empty((0, 0, 0), dtype=np.float32)  # every column the last step's program computed

    def add_bucket(self, pipeline: Pipeline, programs: dict[str, Program]) -> None:
        """Run one more bucket (compiled after the artifact, ``jit.py``) from the next step on."""
        self.simulator.add_pipeline(pipeline, programs)
        self.timer.add_bucket(self.simulator.artifact, pipeline.bucket, self._step_times().stages[pipeline.name])
        (self.prefill_buckets if pipeline.bucket.is_prefill else self.decode_buckets).append(pipeline.bucket)

    def _step_times(self) -> StepTimes:
        """The stage times of every pipeline on the simulator's very mesh (what its ``step_seconds`` sum)."""
        sim, mesh = self.simulator, self.simulator.mesh
        return StepTimes(sim.artifact, sim.programs, sim.hw, devices=",".join(mesh.pes), pipeline_parallel_size=mesh.pp,
                         data_parallel_size=mesh.dp)  # fmt: skip

    @property
    def max_prefill_len(self) -> int:
        return max(b.attention_size for b in self.prefill_buckets)

    @property
    def max_model_len(self) -> int:
        return max(b.attention_size for b in [*self.decode_buckets, *self.prefill_buckets])

    def run(self, batches: list[Batch]) -> list[np.ndarray]:
        """Run a step's batches (one per replica with work) and return, per batch, every
        column its rows' program computed: (rows, 1 or S, vocab), S a prefill's width.

        Batches of one phase share a host run, in replica order, while some bucket holds all
        their rows at the widest one's input length (a decode row is one column whatever its
        context; a prefill row is not padded out to a longer prompt); a lone batch runs in
        its own bucket.  ``last_step_seconds`` is the slowest replica's batch alone.
        """
        runs: list[list[Batch]] = []
        for batch in batches:
            run = next((run for run in runs if self._host_bucket([*run, batch]) is not None), None)
            if run is None:
                runs.append([batch])
            else:
                run.append(batch)
        logits: dict[int, np.ndarray] = {}  # id of a batch -> its rows' logits
        for run in runs:
            bucket = run[0].bucket if len(run) == 1 else self._host_bucket(run)
            assert bucket is not None
            seqs = [seq for batch in run for seq in batch.seqs]
            spans = [span for batch in run for span in batch.spans]
            if run[0].phase == "prefill":
                self.prefill(seqs, bucket, spans)
            else:
                self.decode(seqs, bucket, [start for start, _ in spans])
            first = 0
            for batch in run:
                logits[id(batch)] = self.last_logits[first : first + len(batch.seqs)]  # (rows, 1 or S, vocab)
                first += len(batch.seqs)
        self.last_step_seconds = max(self.timer.seconds(batch.bucket, [batch.replica] * len(batch.seqs)) for batch in batches)
        return [logits[id(batch)] for batch in batches]

    def _host_bucket(self, batches: list[Batch]) -> Bucket | None:
        """The bucket running ``batches`` (of one phase) as one host batch, if one holds all
        their rows at the widest one's input length (see ``run``)."""
        if len({batch.phase for batch in batches}) > 1:
            return None
        buckets = self.prefill_buckets if batches[0].phase == "prefill" else self.decode_buckets
        rows = sum(len(batch.seqs) for batch in batches)
        bucket = smallest_bucket(buckets, rows, max(end for batch in batches for _, end in batch.spans))
        width = max(batch.bucket.input_len for batch in batches)
        return bucket if bucket is not None and bucket.input_len == width else None

    def prefill(self, seqs: list[Sequence], bucket: Bucket, spans: list[tuple[int, int]] | None = None) -> np.ndarray:
        """Write the KV of every token of ``seqs``; logits of each last token, (n, vocab).

        ``spans`` (chunked prefill) limits row i to positions ``[start, end)`` of its
        sequence; earlier positions must already be in the KV cache.
        """
        spans = spans if spans is not None else [(0, seq.num_tokens) for seq in seqs]
        rows = [(seq.request_id, seq.token_ids[first:last], first) for seq, (first, last) in zip(seqs, spans)]
        return self._last_logits(bucket, self.prefill_feeds(bucket, rows), seqs)

    def prefill_feeds(self, bucket: Bucket, rows: list[tuple[str, list[int], int]]) -> dict[str, np.ndarray]:
        """The inputs of a prefill bucket: row i holds ``(request_id, tokens, first position)``,
        left-padded so its last token sits in the last column; the request's KV blocks must
        already be allocated."""
        feeds = self._empty_feeds(bucket)
        width = bucket.input_len
        for row, (request_id, tokens, first) in enumerate(rows):
            start, last = width - len(tokens), first + len(tokens)
            feeds["input_ids"][row, start:] = tokens
            feeds["positions"][row, start:] = np.arange(first, last)
            feeds["slot_mapping"][row, start:] = [self.blocks.slot(request_id, p) for p in range(first, last)]
            self._fill_table(feeds, row, request_id)
        return feeds

    def decode(self, seqs: list[Sequence], bucket: Bucket, positions: list[int] | None = None) -> np.ndarray:
        """Feed each sequence's newest token (or the token at ``positions[i]``, to catch up
        a context longer than the prefill buckets); logits of the next one, (n, vocab)."""
        feeds = self._empty_feeds(bucket)
        for row, seq in enumerate(seqs):
            position = positions[row] if positions is not None else seq.num_tokens - 1
            feeds["input_ids"][row, 0] = seq.token_ids[position]
            feeds["positions"][row, 0] = position
            feeds["slot_mapping"][row, 0] = self.blocks.slot(seq.request_id, position)
            self._fill_table(feeds, row, seq.request_id)
        return self._last_logits(bucket, feeds, seqs)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Give ``child`` the KV of ``parent``'s computed tokens, on ``parent``'s replica:
        full blocks are shared, the partly filled last one is copied."""
        copy = self.blocks.fork(parent.request_id, child.request_id, parent.num_computed_tokens)
        self.timer.follow(child.request_id, parent.request_id)
        if copy is not None:
            self.simulator.copy_kv_blocks(*copy)

    def _empty_feeds(self, bucket: Bucket) -> dict[str, np.ndarray]:
        """All-padding inputs of ``bucket``; ``position_ids`` is the same array as ``positions``."""
        shape = (bucket.batch_size, bucket.input_len)
        positions = np.zeros(shape, dtype=np.int64)
        return {
            "input_ids": np.zeros(shape, dtype=np.int64),
            "positions": positions,
            "position_ids": positions,
            "slot_mapping": np.full(shape, -1, dtype=np.int64),
            "block_tables": np.zeros((bucket.batch_size, bucket.num_kv_blocks(self.blocks.block_size)), dtype=np.int64),
        }

    def _fill_table(self, feeds: dict[str, np.ndarray], row: int, request_id: str) -> None:
        table = self.blocks.tables[request_id][: feeds["block_tables"].shape[1]]  # a chunk's bucket may not span them all
        feeds["block_tables"][row, : len(table)] = table
        feeds["block_tables"][row, len(table) :] = self.blocks.padding_block(request_id)  # on the row's own replica

    def _last_logits(self, bucket: Bucket, feeds: dict[str, np.ndarray], seqs: list[Sequence]) -> np.ndarray:
        """Logits of each row's last column, each row served by its sequence's replica.

        The rows of every replica run as one batch on the host (``NPUSimulator.run``); on
        the modelled NPU each replica runs its own rows in the smallest bucket of this shape
        that holds them (the engine puts the step on the clock: ``ReplicaTimer.step``).
        """
        replicas = self.timer.place(seqs)
        self.last_step_seconds = self.timer.seconds(bucket, replicas)
        if len(set(replicas)) == 1:
            return self._run(bucket, feeds, replicas[0])[: len(seqs)]
        padding = [replicas[0]] * (bucket.batch_size - len(seqs))  # padding rows read (never write) any cache
        return self._run(bucket, feeds, replicas + padding)[: len(seqs)]

    def _run(self, bucket: Bucket, feeds: dict[str, np.ndarray], replica: int | list[int]) -> np.ndarray:
        logits = self.last_logits = self.simulator.run(bucket, feeds, replica)  # (B, 1 or S, vocab)
        return logits[:, -1, :]
