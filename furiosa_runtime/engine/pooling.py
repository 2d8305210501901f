"""Embeddings: run a pooling artifact (``task="embed"``) and return vLLM-style outputs.

The pipelines of an embed artifact end in a pooling head compiled to NPU instructions
(mean or CLS over the real tokens, then L2 normalisation, as the model's
sentence-transformers config says), so one run of a bucket turns a batch of texts into
one vector each.  ``Embedder``:

* tokenizes as sentence-transformers does: surrounding whitespace stripped, the
  tokenizer's own template adds ``[CLS]``/``[SEP]``, texts cut at the pooling config's
  ``max_seq_length`` (special tokens included);
* sorts the texts longest first and fills the smallest bucket that holds each run of
  them, so texts of similar length share a bucket;
* left-pads each row, giving padding the KV slot -1: attention neither stores nor reads
  it and the head pools only tokens with a slot, so padding and batching never change a
  vector.

``LLM.embed`` / ``LLM.encode`` and the async engine's ``encode`` (``encode_stream``) are
thin layers over it.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import threading
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tokenizers
from tqdm.auto import tqdm

from furiosa_runtime.engine.errors import ContextLengthExceededError
from furiosa_runtime.engine.inputs import PromptType, batch_prompts, check_token_ids, parse_prompt, single_prompt
from furiosa_runtime.engine.model_runner import ModelRunner
from furiosa_runtime.engine.tokenizer import Tokenizer
from furiosa_runtime.npu.artifact import Artifact, Bucket, smallest_bucket

__all__ = [
    "EmbeddingOutput",
    "EmbeddingRequestOutput",
    "Embedder",
    "PoolingOutput",
    "PoolingRequestOutput",
    "encode_stream",
    "require_task",
]

_WRONG_TASK = {
    "embed": "is an embedding model (task=embed); use LLM.embed or LLM.encode",
    "generate": "is a generation model (task=generate); embeddings need an artifact built with model.task=embed",
}


def require_task(artifact: Artifact, task: str, caller: str) -> None:
    """Refuse, in one line, to run ``caller`` on an artifact built for another task."""
    actual = artifact.model_metadata.task
    if actual != task:
        raise ValueError(f"{caller}: artifact {artifact.metadata.name!r} {_WRONG_TASK[actual]}")


# -- outputs (vLLM's vllm.outputs names) ------------------------------------------------


@dataclass
class PoolingOutput:
    """The pooled vector of one prompt (vLLM keeps a tensor; here a float32 array)."""

    data: np.ndarray  # (hidden_size,)


@dataclass
class PoolingRequestOutput:
    """What ``LLM.encode`` returns per prompt."""

    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    finished: bool = True


@dataclass
class EmbeddingOutput:
    """An embedding as a plain list of floats."""

    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """What ``LLM.embed`` returns per prompt."""

    request_id: str
    outputs: EmbeddingOutput
    prompt_token_ids: list[int]
    finished: bool = True

    @classmethod
    def from_base(cls, output: PoolingRequestOutput) -> EmbeddingRequestOutput:
        embedding = EmbeddingOutput([float(x) for x in output.outputs.data])
        return cls(output.request_id, embedding, output.prompt_token_ids, output.finished)


# -- execution --------------------------------------------------------------------------


class Embedder:
    """Texts in, pooled vectors out, on the simulator that holds an embed artifact."""

    def __init__(self, artifact: Artifact, runner: ModelRunner, tokenizer: Tokenizer | None) -> None:
        require_task(artifact, "embed", "Embedder")
        pooling = artifact.model_metadata.pooling
        self.runner = runner
        self.blocks = runner.blocks
        self.buckets: list[Bucket] = list(artifact.generator_config.prefill_buckets)
        self.max_len = max(b.attention_size for b in self.buckets)
        self.tokenizer = _truncating(tokenizer, pooling.max_seq_length if pooling else None)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # one batch at a time owns the KV blocks it borrows

    @classmethod
    def of(cls, core: Any) -> Embedder:
        """The embedder of an engine core (``artifact``, ``runner``, ``tokenizer``):
        one per loaded artifact, shared by ``LLM`` and ``AsyncLLMEngine`` so they share its lock."""
        embedder = _EMBEDDERS.get(core)
        if embedder is None:
            embedder = _EMBEDDERS[core] = cls(core.artifact, core.runner, core.tokenizer)
        return embedder

    def encode(
        self, prompts: PromptType | Sequence[PromptType], request_ids: list[str] | None = None, use_tqdm: bool = False
    ) -> list[PoolingRequestOutput]:
        """The pooled vector of every prompt, in prompt order."""
        token_lists = self.tokenize(prompts)
        ids = request_ids or [str(next(self._ids)) for _ in token_lists]
        vectors = self.run(token_lists, use_tqdm)
        return [PoolingRequestOutput(i, PoolingOutput(v), t) for i, v, t in zip(ids, vectors, token_lists)]

    def tokenize(self, prompts: PromptType | Sequence[PromptType]) -> list[list[int]]:
        """Token ids of each prompt: a text, token ids, or a dict with ``prompt`` / ``prompt_token_ids``."""
        return [parse_prompt(_stripped(p), self.tokenizer)[1] for p in batch_prompts(prompts)]

    def run(self, token_lists: list[list[int]], use_tqdm: bool = False) -> list[np.ndarray]:
        """One vector per token list; longest first, each run of texts in the smallest bucket that holds it."""
        for tokens in token_lists:
            self._check_length(len(tokens))
            check_token_ids(tokens, self.runner.simulator.token_rows)
        order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
        vectors: list[np.ndarray] = [np.empty(0)] * len(token_lists)
        with tqdm(total=len(order), desc="embed", disable=not use_tqdm) as bar:
            while order:
                longest = len(token_lists[order[0]])
                fitting = [b for b in self.buckets if b.attention_size >= longest]
                take = max(b.batch_size for b in fitting)
                chunk, order = order[:take], order[take:]
                bucket = smallest_bucket(fitting, len(chunk), longest)
                assert bucket is not None
                for index, vector in zip(chunk, self._run_bucket(bucket, [token_lists[i] for i in chunk])):
                    vectors[index] = vector
                bar.update(len(chunk))
        return vectors

    def _check_length(self, length: int) -> None:
        if length == 0:
            raise ValueError("prompt: must contain at least one token")
        if length > self.max_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.max_len} tokens. However, you requested "
                f"{length} tokens in the input for embedding generation. Please reduce the length of the input.",
                max_model_len=self.max_len, prompt_tokens=length, max_completion_tokens=None,
            )  # fmt: skip

    def _run_bucket(self, bucket: Bucket, token_lists: list[list[int]]) -> np.ndarray:
        """Run one bucket on borrowed KV blocks; the pooled rows of the real texts, (n, hidden)."""
        with self._lock:
            ids = [f"embed-{next(self._ids)}" for _ in token_lists]
            try:
                for request_id, tokens in zip(ids, token_lists):
                    self.blocks.allocate(request_id, len(tokens))
                feeds = self.runner.prefill_feeds(bucket, [(i, tokens, 0) for i, tokens in zip(ids, token_lists)])
                pooled = self.runner.simulator.run(bucket, feeds)  # (B, hidden)
            finally:
                for request_id in ids:
                    self.blocks.free(request_id)
        return np.asarray(pooled[: len(token_lists)], dtype=np.float32)


def _stripped(prompt: PromptType) -> PromptType:
    """sentence-transformers strips the whitespace around every text before tokenizing it."""
    if isinstance(prompt, str):
        return prompt.strip()
    if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and isinstance(prompt.get("prompt"), str):
        return {**prompt, "prompt": prompt["prompt"].strip()}
    return prompt


_EMBEDDERS: weakref.WeakKeyDictionary[Any, Embedder] = weakref.WeakKeyDictionary()


def _truncating(tokenizer: Tokenizer | None, max_length: int | None) -> Tokenizer | None:
    """A copy of ``tokenizer`` that cuts texts to ``max_length`` tokens, special tokens
    included, the way sentence-transformers' tokenizer call does (the original is shared
    with the rest of the runtime and stays untouched); None stays None (token ids only)."""
    if tokenizer is None or max_length is None:
        return tokenizer
    clone = copy.copy(tokenizer)
    clone.backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    clone.backend.enable_truncation(max_length)
    return clone


async def encode_stream(embedder: Embedder, prompt: PromptType, request_id: str) -> AsyncIterator[PoolingRequestOutput]:
    """``AsyncLLMEngine.encode``: one final ``PoolingRequestOutput``, computed in a worker
    thread so that the event loop keeps serving other requests meanwhile."""
    (output,) = await asyncio.to_thread(embedder.encode, single_prompt(prompt), [request_id])
    yield output
