"""The engine core: requests in, one scheduled NPU step at a time, RequestOutputs out.

``EngineCore`` owns the simulator, block manager, scheduler and sampler.  ``LLM`` (and
the vLLM-style engines built on it) only tokenize, validate and collect outputs.
"""

from __future__ import annotations

import time
from pathlib import Path

from furiosa_runtime.artifact import SchedulerConfig, load_artifact
from furiosa_runtime.block_manager import BlockManager
from furiosa_runtime.errors import validate_context_length
from furiosa_runtime.model_runner import ModelRunner
from furiosa_runtime.outputs import CompletionOutput, RequestOutput
from furiosa_runtime.sampler import Sampler, min_tokens_banned_ids
from furiosa_runtime.sampling_params import RequestOutputKind, SamplingParams
from furiosa_runtime.scheduler import Batch, Scheduler
from furiosa_runtime.sequence import Sequence
from furiosa_runtime.simulator import NPUSimulator
from furiosa_runtime.tokenizer import IncrementalDetokenizer, Tokenizer


class EngineCore:
    """Continuous batching over the buckets of one artifact on the simulated NPU."""

    def __init__(self, artifact_path: str | Path, seed: int | None = None, scheduler_config: SchedulerConfig | None = None) -> None:
        self.path = Path(artifact_path)
        self.artifact = load_artifact(self.path)
        self.tokenizer = Tokenizer.from_dir(self.path)
        self.simulator = NPUSimulator(self.path, self.artifact)
        paged = self.artifact.generator_config.paged_attention_config
        self.blocks = BlockManager(paged.num_blocks, paged.block_size)
        self.runner = ModelRunner(self.simulator, self.artifact, self.blocks)
        self.scheduler = Scheduler(
            self.runner.prefill_buckets, self.runner.decode_buckets, self.blocks, scheduler_config or self.artifact.scheduler_config
        )
        self.sampler = Sampler(seed)
        self.eos_token_ids = set(self.artifact.model_metadata.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._emitted: dict[str, tuple[int, int]] = {}  # tokens and characters already streamed

    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Validate lengths against the buckets and queue the request."""
        if len(prompt_token_ids) > self.runner.max_prefill_len:
            validate_context_length(self.runner.max_prefill_len, len(prompt_token_ids), None)
        validate_context_length(self.max_model_len, len(prompt_token_ids), params.max_tokens)
        if not prompt_token_ids:
            raise ValueError("prompt: must contain at least one token")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_token_ids)
        seq = Sequence(request_id, prompt, list(prompt_token_ids), params, self.sampler.make_generator(params), max_tokens)
        self._detok[request_id] = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        self._emitted[request_id] = (0, 0)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        self._forget(request_id)
        return seq is not None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one prefill or decode step; return the outputs of the requests it advanced."""
        batch = self.scheduler.schedule()
        if batch is None:
            return self._fail_unschedulable()
        now = time.time()
        for seq in batch.seqs:
            seq.metrics.first_scheduled_time = seq.metrics.first_scheduled_time or now
        logits = self._run(batch)
        outputs = []
        for seq, row in zip(batch.seqs, logits):
            self._append(seq, row)
            output = self._output(seq)
            if output is not None:
                outputs.append(output)
        return outputs

    def _run(self, batch: Batch):
        if batch.phase == "prefill":
            return self.runner.prefill(batch.seqs, batch.bucket)
        return self.runner.decode(batch.seqs, batch.bucket)

    def _fail_unschedulable(self) -> list[RequestOutput]:
        """A waiting request that can never run (KV cache too small) fails instead of stalling."""
        if not self.scheduler.waiting or self.scheduler.running:
            return []
        seq = self.scheduler.waiting.popleft()
        seq.finish("abort")
        output = self._output(seq)
        return [output] if output is not None else []

    def _append(self, seq: Sequence, logits) -> None:
        params = seq.params
        banned = min_tokens_banned_ids(params, len(seq.output_token_ids), () if params.ignore_eos else self.eos_token_ids)
        token = self.sampler.sample(logits.astype("float64"), params, seq.rng, banned)
        seq.output_token_ids.append(token)
        now = time.time()
        seq.metrics.first_token_time = seq.metrics.first_token_time or now
        seq.metrics.last_token_time = now
        seq.text += self._detok[seq.request_id].add_tokens([token])
        self._check_stop(seq, token)
        if seq.is_finished:
            self.scheduler.finish(seq)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if len(seq.output_token_ids) < params.min_tokens:
            return
        if token in (params.stop_token_ids or ()):
            return seq.finish("stop", token)
        if not params.ignore_eos and token in self.eos_token_ids:
            return seq.finish("stop")
        for stop in params.stop or ():
            index = seq.text.find(stop)
            if index >= 0:
                seq.text = seq.text[: index + (len(stop) if params.include_stop_str_in_output else 0)]
                return seq.finish("stop", stop)
        if len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return seq.finish("length")

    def _output(self, seq: Sequence) -> RequestOutput | None:
        kind = seq.params.output_kind
        if kind is RequestOutputKind.FINAL_ONLY and not seq.is_finished:
            return None
        tokens_sent, chars_sent = self._emitted[seq.request_id] if kind is RequestOutputKind.DELTA else (0, 0)
        tokens, text = seq.output_token_ids[tokens_sent:], seq.text[chars_sent:]
        self._emitted[seq.request_id] = (len(seq.output_token_ids), len(seq.text))
        completion = CompletionOutput(0, text, list(tokens), finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
        output = RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], seq.is_finished, seq.metrics)
        if seq.is_finished:
            self._forget(seq.request_id)
        return output

    def _forget(self, request_id: str) -> None:
        self._detok.pop(request_id, None)
        self._emitted.pop(request_id, None)
