"""Model runner: pad a batch of sequences into a bucket, run its pipeline, return logits.

Prompts are left-padded inside a prefill bucket so every row's last real token sits in
the last column (the head may compute only that column).  Padding tokens get slot -1:
the paged-attention instruction neither stores nor attends to them, so padding can never
change a result.
"""

from __future__ import annotations

import numpy as np

from furiosa_runtime.artifact import Artifact, Bucket
from furiosa_runtime.block_manager import BlockManager
from furiosa_runtime.sequence import Sequence
from furiosa_runtime.simulator import NPUSimulator


def smallest_bucket(buckets: list[Bucket], batch: int, length: int) -> Bucket | None:
    """The cheapest bucket holding ``batch`` rows of ``length`` context, if any."""
    fitting = [b for b in buckets if b.batch_size >= batch and b.attention_size >= length]
    return min(fitting, key=lambda b: (b.batch_size * b.attention_size, b.attention_size), default=None)


class ModelRunner:
    def __init__(self, simulator: NPUSimulator, artifact: Artifact, blocks: BlockManager) -> None:
        self.simulator = simulator
        self.blocks = blocks
        self.prefill_buckets = list(artifact.generator_config.prefill_buckets)
        self.decode_buckets = list(artifact.generator_config.decode_buckets)

    @property
    def max_prefill_len(self) -> int:
        return max(b.attention_size for b in self.prefill_buckets)

    @property
    def max_model_len(self) -> int:
        return max(b.attention_size for b in [*self.decode_buckets, *self.prefill_buckets])

    def prefill(self, seqs: list[Sequence], bucket: Bucket) -> np.ndarray:
        """Write the KV of every token of ``seqs``; logits of each last token, (n, vocab)."""
        feeds = self._empty_feeds(bucket)
        width = bucket.input_len
        for row, seq in enumerate(seqs):
            tokens = seq.token_ids
            start = width - len(tokens)
            feeds["input_ids"][row, start:] = tokens
            feeds["positions"][row, start:] = np.arange(len(tokens))
            feeds["slot_mapping"][row, start:] = [self.blocks.slot(seq.request_id, p) for p in range(len(tokens))]
            self._fill_table(feeds, row, seq)
        return self._last_logits(bucket, feeds, len(seqs))

    def decode(self, seqs: list[Sequence], bucket: Bucket) -> np.ndarray:
        """Feed each sequence's newest token; logits of the next one, (n, vocab)."""
        feeds = self._empty_feeds(bucket)
        for row, seq in enumerate(seqs):
            position = seq.num_tokens - 1
            feeds["input_ids"][row, 0] = seq.token_ids[-1]
            feeds["positions"][row, 0] = position
            feeds["slot_mapping"][row, 0] = self.blocks.slot(seq.request_id, position)
            self._fill_table(feeds, row, seq)
        return self._last_logits(bucket, feeds, len(seqs))

    def _empty_feeds(self, bucket: Bucket) -> dict[str, np.ndarray]:
        shape = (bucket.batch_size, bucket.input_len)
        return {
            "input_ids": np.zeros(shape, dtype=np.int64),
            "positions": np.zeros(shape, dtype=np.int64),
            "slot_mapping": np.full(shape, -1, dtype=np.int64),
            "block_tables": np.zeros((bucket.batch_size, bucket.num_kv_blocks(self.blocks.block_size)), dtype=np.int64),
        }

    def _fill_table(self, feeds: dict[str, np.ndarray], row: int, seq: Sequence) -> None:
        table = self.blocks.tables[seq.request_id]
        feeds["block_tables"][row, : len(table)] = table

    def _last_logits(self, bucket: Bucket, feeds: dict[str, np.ndarray], rows: int) -> np.ndarray:
        feeds["position_ids"] = feeds["positions"]
        logits = self.simulator.run(bucket, feeds)  # (B, 1 or S, vocab)
        return logits[:rows, -1, :]
