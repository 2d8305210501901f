"""The engine core: requests in, one scheduled NPU step at a time, RequestOutputs out.

``EngineCore`` owns the simulator, block manager, scheduler and sampler.  ``LLM``,
``LLMEngine`` and ``AsyncLLMEngine`` only tokenize, validate and collect outputs.

An artifact built without tokenizer files has ``tokenizer`` None: token-id prompts
work and their completions carry token ids with ``text=""`` (nothing to detokenize
with); text prompts, chat and stop strings are refused in one line.

Automatic prefix caching (``enable_prefix_caching``, on by default; see
``block_manager.py``) applies to generation artifacts.  With several data-parallel
replicas each keeps its own cache (a cached block's KV lives on the replica that computed
it), and a new sequence goes to the replica caching the longest prefix of it when that
one has room.  It is off for embedding artifacts, whose encoders attend in both directions
(a token's KV depends on the tokens after it, so a shared prefix does not mean shared KV)
and which run one pass per text anyway.

With ``jit`` (``enable_jit_compilation``) the engine also compiles, in background worker
processes, the prefill buckets its traffic asks for and serves each from the step after
it is ready (``jit.py``); a prompt longer than every prefill bucket is then admitted.

The engine logs its start (artifact, buckets, KV blocks) at INFO, every preemption at
WARNING (``scheduler.py``) and, every ``STATS_LOG_INTERVAL`` seconds while it runs, its
load and prefix-cache hit rate at DEBUG.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from furiosa_runtime.engine.beam_search import BeamSearch, Hypothesis
from furiosa_runtime.engine.block_manager import BlockManager
from furiosa_runtime.engine.errors import validate_context_length, validate_min_tokens
from furiosa_runtime.engine.inputs import check_token_ids
from furiosa_runtime.engine.jit import BucketCompiler, JitConfig
from furiosa_runtime.engine.model_runner import ModelRunner
from furiosa_runtime.engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from furiosa_runtime.engine.sampler import Sampler, log_softmax, min_tokens_banned_ids, top_logprobs
from furiosa_runtime.engine.sampling_params import RequestOutputKind, SamplingParams
from furiosa_runtime.engine.scheduler import Scheduler
from furiosa_runtime.engine.sequence import Sequence, SequenceGroup, Status
from furiosa_runtime.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from furiosa_runtime.npu.artifact import ArtifactFiles, Pipeline, SchedulerConfig, open_artifact
from furiosa_runtime.npu.isa import Program
from furiosa_runtime.npu.simulator import NPUSimulator

logger = logging.getLogger(__name__)
STATS_LOG_INTERVAL = 10.0  # seconds between two DEBUG lines of engine statistics


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and counters, for metrics and logs.

    The prefix-cache counters are in prompt tokens: of ``prefix_cache_queried_tokens`` looked
    up at admission, ``prefix_cache_hit_tokens`` were found in cached KV blocks.
    """

    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    preemptions: int
    steps: int
    npu_seconds: float

    @property
    def prefix_cache_hit_rate(self) -> float:
        """The share of queried prompt tokens found in the prefix cache (0 before any query)."""
        return self.prefix_cache_hit_tokens / self.prefix_cache_queried_tokens if self.prefix_cache_queried_tokens else 0.0


class EngineCore:
    """Continuous batching over the buckets of one artifact on the simulated NPU."""

    def __init__(
        self,
        artifact_path: str | Path,
        seed: int | None = None,
        scheduler_config: SchedulerConfig | None = None,
        tokenizer: str | Path | None = None,
        *,
        devices: str | None = None,
        pipeline_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        weight_cache_bytes: int | None = None,
        enable_prefix_caching: bool = True,
        jit: JitConfig | None = None,
    ) -> None:
        self.path = Path(artifact_path)
        self.artifact, files = open_artifact(self.path)
        self.tokenizer: Tokenizer | None = Tokenizer.from_dir(tokenizer) if tokenizer is not None else _artifact_tokenizer(files)
        self.simulator = NPUSimulator(
            files, self.artifact, devices=devices, pipeline_parallel_size=pipeline_parallel_size,
            data_parallel_size=data_parallel_size, weight_cache_bytes=weight_cache_bytes,
        )  # fmt: skip
        files.verify_all()  # the listed files nothing above needed: an altered one still refuses the artifact
        paged = self.artifact.generator_config.paged_attention_config
        self.blocks = BlockManager(paged.num_blocks, paged.block_size, enable_caching=self._prefix_caching(enable_prefix_caching),
                                   replicas=self.simulator.mesh.dp)  # fmt: skip
        self.runner = ModelRunner(self.simulator, self.artifact, self.blocks)
        self.scheduler_config = scheduler_config or self.artifact.scheduler_config
        self.scheduler = Scheduler(list(self.runner.prefill_buckets), list(self.runner.decode_buckets), self.blocks, self.scheduler_config,
                                   virtual_engines=self.simulator.mesh.pp, placement=self.runner.timer)  # fmt: skip
        self.sampler = Sampler(seed)
        self.eos_token_ids = set(self.artifact.model_metadata.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.groups: dict[str, SequenceGroup] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}  # per sequence key
        self._emitted: dict[str, tuple[int, int, int]] = {}  # tokens, characters, logprobs already streamed
        self._forks: dict[str, list[Sequence]] = {}  # first sample's key -> samples waiting for its prompt
        self.beams: dict[str, BeamSearch] = {}  # request id -> its beam search (use_beam_search)
        self._beam_logits: dict[str, np.ndarray] = {}  # beam's key -> its next-token logits, until its siblings' are in
        self._beam_keys = itertools.count(1)  # the block-table keys of forked beams: "<request id>#b<n>"
        self.num_generated_tokens = 0  # tokens sampled so far, for progress bars
        self._stats_logged_at = time.monotonic()
        #: Compiles the prefill buckets traffic asks for (``jit.py``); None without enable_jit_compilation.
        self.jit = BucketCompiler(self.path, self.artifact, jit, self.add_bucket) if jit is not None else None
        self._log_start()

    def _prefix_caching(self, requested: bool) -> bool:
        """Whether prefix caching applies (see the module docstring), logged when it is refused."""
        if not requested:
            return False
        if self.artifact.model_metadata.task != "generate":
            logger.info("prefix caching off: %s is a %s artifact (its KV depends on the whole text)",
                        self.path, self.artifact.model_metadata.task)  # fmt: skip
            return False
        return True

    def _log_start(self) -> None:
        buckets = ", ".join(f"{b.phase} {b.batch_size}x{b.attention_size}" for b in [*self.runner.prefill_buckets, *self.runner.decode_buckets])
        mesh = self.simulator.mesh
        logger.info("engine started: %s (%s) on %d PEs (tp %d, pp %d, dp %d); buckets %s; %d KV blocks of %d tokens; "
                    "prefix caching %s", self.path, self.artifact.metadata.name, len(mesh.pes), mesh.tp, mesh.pp, mesh.dp,
                    buckets, self.blocks.num_usable, self.blocks.block_size, "on" if self.blocks.enable_caching else "off")  # fmt: skip

    def add_bucket(self, pipeline: Pipeline, programs: dict[str, Program]) -> None:
        """Serve one more bucket, compiled after the artifact (``jit.py``), from the next step on."""
        self.runner.add_bucket(pipeline, programs)
        self.scheduler.add_bucket(pipeline.bucket)
        self.artifact = self.simulator.artifact

    @property
    def npu_seconds(self) -> float:
        """The modelled NPU clock: when every step run so far has left the last pipeline stage,
        or a later idle wait (``wait_until``); steps overlap across stages and replicas
        (``replica_timer.py``)."""
        return self.runner.timer.now

    @property
    def max_model_len(self) -> int:
        """Longest context a request may reach: the largest bucket, bounded by the KV cache."""
        decode = [b.attention_size for b in self.runner.decode_buckets] or [self.runner.max_model_len]
        return min(max(decode), self.blocks.capacity_tokens)

    @property
    def max_prompt_len(self) -> int:
        """Longest prompt: the largest prefill bucket, or the whole context with chunked prefill
        or JIT compilation (``jit.py``: past the prefill buckets, positions are caught up in
        decode steps until a bucket holding the prompt is compiled)."""
        if self.scheduler_config.prefill_chunk_size is not None or self.jit is not None:
            return self.max_model_len
        return min(self.runner.max_prefill_len, self.max_model_len)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        npu_arrival_time: float | None = None,
    ) -> None:
        """Validate the request (see `validate_request`), then queue it.  ``npu_arrival_time``
        is when it arrived on the modelled NPU clock (default: now; ``simulate.serve``
        gives a workload's arrival times, which may be earlier)."""
        if request_id in self.groups:
            raise ValueError(f"Request ID {request_id} already exist in the engine.")
        self.validate_request(prompt_token_ids, params)
        if self.jit is not None:
            self.jit.observe(len(prompt_token_ids))
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(prompt_token_ids)
        metrics = RequestMetrics(arrival_time=arrival_time if arrival_time is not None else time.time(),
                                 npu_arrival_time=self.npu_seconds if npu_arrival_time is None else npu_arrival_time)  # fmt: skip
        num_seqs = 1 if params.use_beam_search else params.num_samples  # beams fork off the prompt's sequence
        seqs = [
            Sequence(self._seq_key(request_id, i, num_seqs), prompt, list(prompt_token_ids), params,
                     self.sampler.make_generator(params, i), max_tokens, group_id=request_id, index=i, metrics=metrics)
            for i in range(num_seqs)
        ]  # fmt: skip
        self.groups[request_id] = group = SequenceGroup(request_id, prompt, list(prompt_token_ids), params, seqs, metrics)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None] * len(prompt_token_ids)
        if params.use_beam_search:
            self.beams[request_id] = BeamSearch(params.num_samples, max_tokens, self._beam_stop_ids(params), params.length_penalty,
                                                params.early_stopping)  # fmt: skip
        for seq in seqs:
            if self.tokenizer is not None:
                self._detok[seq.request_id] = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens)
            self._emitted[seq.request_id] = (0, 0, 0)
        self.scheduler.add(seqs[0])
        if len(seqs) > 1:  # the other samples fork off the first once its prompt is computed
            self._forks[seqs[0].request_id] = seqs[1:]

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise unless the request fits, before anything is queued, so a bad request fails
        alone instead of in the middle of a step: a non-empty prompt of ids the embedding
        holds (its real rows, see ``NPUSimulator.token_rows``), no longer than a prefill
        bucket (any length up to the context with chunked prefill); prompt plus
        ``max_tokens`` within the largest bucket and the KV cache (the context-length
        errors), or with ``max_tokens=None`` room for ``min_tokens``; stop token ids and
        ``logprobs`` within the vocabulary; stop strings only with a tokenizer."""
        if not prompt_token_ids:
            raise ValueError("prompt: must contain at least one token")
        vocab = self.simulator.token_rows
        check_token_ids(prompt_token_ids, vocab)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: this artifact has no tokenizer to match stop strings against; use stop_token_ids")
        if len(prompt_token_ids) > self.max_prompt_len:
            validate_context_length(self.max_prompt_len, len(prompt_token_ids), None)
        validate_context_length(self.max_model_len, len(prompt_token_ids), params.max_tokens)
        if params.max_tokens is None:
            validate_min_tokens(self.max_model_len, len(prompt_token_ids), params.min_tokens)
        params.verify_vocab(vocab)
        if params.prompt_logprobs is not None and self.artifact.model_rewriting_config.calculate_logit_only_for_last_token:
            raise ValueError("prompt_logprobs: this artifact computes the logits of the last prompt token only; build it "
                             "with buckets.calculate_logit_only_for_last_token=false to get every prompt position's")  # fmt: skip
        if params.use_beam_search:
            self._validate_beams(len(prompt_token_ids), params)

    def _validate_beams(self, prompt_len: int, params: SamplingParams) -> None:
        """Refuse a beam search the artifact's buckets or the engine cannot hold: a width other
        than the one the decode buckets were built for (kv_cache_sharing_across_beams_config)
        or more tokens than it allows, more beams than ``max_processing_samples``, or beams
        whose KV cannot all be held at once."""
        width, built = params.num_samples, self.artifact.generator_config.kv_cache_sharing_across_beams_config
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - prompt_len
        if built is not None and width != built.beam_width:
            raise ValueError(f"best_of: beam width {width} does not match this artifact's decode buckets, built for "
                             f"kv_cache_sharing_across_beams_config.beam_width={built.beam_width}")  # fmt: skip
        if built is not None and max_tokens > built.max_new_tokens:
            raise ValueError(f"max_tokens: at most {built.max_new_tokens} with beam search on this artifact "
                             f"(kv_cache_sharing_across_beams_config.max_new_tokens), got {max_tokens}")  # fmt: skip
        if width > self.scheduler_config.max_processing_samples:
            raise ValueError(f"best_of: {width} beams exceed scheduler_config.max_processing_samples="
                             f"{self.scheduler_config.max_processing_samples}")  # fmt: skip
        need = width * self.blocks.blocks_needed(prompt_len + max_tokens)  # every beam lives on the replica of the first
        if need > self.blocks.num_usable_per_replica:
            raise ValueError(f"best_of: {width} beams of {prompt_len + max_tokens} tokens may need {need} KV blocks, "
                             f"the cache has {self.blocks.num_usable_per_replica}; fewer beams or max_tokens")  # fmt: skip

    def _beam_stop_ids(self, params: SamplingParams) -> set[int]:
        """The tokens that end a beam: the stop token ids, and EOS unless ``ignore_eos``."""
        return set(params.stop_token_ids or ()) | (set() if params.ignore_eos else self.eos_token_ids)

    @staticmethod
    def _seq_key(request_id: str, index: int, num_samples: int) -> str:
        return request_id if num_samples == 1 else f"{request_id}#{index}"

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its blocks; False if it is unknown or already finished."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return False
        self._forks.pop(group.seqs[0].request_id, None)
        self.beams.pop(request_id, None)
        for seq in group.seqs:
            self.scheduler.abort(seq)
            self._forget(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    def wait_until(self, npu_time: float) -> None:
        """Let the modelled NPU clock idle until ``npu_time`` (the next arrival of a modelled
        workload, when nothing runs); it never goes back."""
        self.runner.timer.wait_until(npu_time)

    def stats(self) -> EngineStats:
        """The current load and the counters since the engine started."""
        blocks, scheduler = self.blocks, self.scheduler
        return EngineStats(
            running=len(scheduler.running), waiting=len(scheduler.waiting),
            kv_blocks_total=blocks.num_usable, kv_blocks_used=blocks.num_usable - blocks.num_free,
            prefix_cache_queried_tokens=scheduler.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=scheduler.prefix_cache_hit_tokens,
            preemptions=scheduler.num_preemptions, steps=scheduler.num_steps, npu_seconds=self.npu_seconds,
        )  # fmt: skip

    def step(self) -> list[RequestOutput]:
        """Run one step: a prefill or decode batch on every data-parallel replica with work
        (``Scheduler.schedule_step``); return the outputs of the requests it advanced.
        Buckets compiled since the last step are served from this one on (``jit.py``)."""
        if self.jit is not None:
            self.jit.poll()
        batches = self.scheduler.schedule_step()
        if not batches:
            assert not self.scheduler.has_unfinished(), "admission control guarantees every request can be scheduled"
            return []
        now = time.time()
        for batch in batches:
            for seq in batch.seqs:
                seq.metrics.first_scheduled_time = seq.metrics.first_scheduled_time or now
            self.runner.timer.step(batch.bucket, batch.seqs)  # the modelled clock, replica by replica (replica_timer.py)
        columns = self.runner.run(batches)  # per batch (rows, 1 or S, vocab)
        self._maybe_log_stats()
        advanced: dict[str, SequenceGroup] = {}
        rows = [(batch.phase, seq, span, computed) for batch, logits in zip(batches, columns)
                for seq, span, computed in zip(batch.seqs, batch.spans, logits)]  # fmt: skip
        for phase, seq, (start, end), computed in rows:
            row = computed[-1]  # the logits of the row's last position
            self.scheduler.computed(seq, end)
            self._record_prompt_logprobs(seq, phase, start, end, computed)
            if end < seq.num_tokens:
                continue
            if seq.group_id in self.beams:  # a beam: its siblings' logits may still be missing
                self._beam_logits[seq.request_id] = row
            else:  # caught up: this row's logits give the next token
                for child in self._forks.pop(seq.request_id, ()):
                    self._fork(seq, child, row)
                self._append(seq, row)
            advanced[seq.group_id] = self.groups[seq.group_id]
        for group_id in [g for g in advanced if g in self.beams]:
            if not self._step_beams(advanced[group_id]):
                del advanced[group_id]
        return [out for group in advanced.values() if (out := self._output(group)) is not None]

    def _record_prompt_logprobs(self, seq: Sequence, phase: str, start: int, end: int, computed: np.ndarray) -> None:
        """Fill the request's prompt logprobs from this step's logits of positions ``[start, end)``
        (``computed``: a prefill row's are every column of an un-sliced program, left-padded; a
        decode row's is its one column): position p's logits give the logprobs of prompt token p + 1."""
        group = self.groups[seq.group_id]
        prompt, k = seq.prompt_token_ids, group.params.prompt_logprobs
        if k is None or start >= len(prompt) - 1:
            return
        columns = computed[start - end :] if phase == "prefill" else computed[-1:]  # (end - start, vocab)
        for position, logits in enumerate(columns[: len(prompt) - 1 - start], start):
            group.prompt_logprobs[position + 1] = self._logprob_dict(log_softmax(logits), prompt[position + 1], k)

    def _maybe_log_stats(self) -> None:
        """Every ``STATS_LOG_INTERVAL`` seconds, the load and prefix-cache hit rate at DEBUG."""
        now = time.monotonic()
        if now - self._stats_logged_at < STATS_LOG_INTERVAL or not logger.isEnabledFor(logging.DEBUG):
            return
        self._stats_logged_at = now
        stats = self.stats()
        logger.debug("running %d, waiting %d; KV blocks used %d/%d; prefix cache hit rate %.1f%% (%d of %d tokens); "
                     "%d preemptions; %d steps, %.3f s modelled NPU time", stats.running, stats.waiting, stats.kv_blocks_used,
                     stats.kv_blocks_total, 100 * stats.prefix_cache_hit_rate, stats.prefix_cache_hit_tokens,
                     stats.prefix_cache_queried_tokens, stats.preemptions, stats.steps, stats.npu_seconds)  # fmt: skip

    def _fork(self, parent: Sequence, child: Sequence, logits: np.ndarray) -> None:
        """Start sample ``child`` on ``parent``'s computed prompt and draw its first token from
        the same logits; without room it is queued to prefill the prompt itself."""
        if not self.scheduler.can_fork(parent):
            self.scheduler.add(child)
            return
        self.runner.fork(parent, child)
        self.scheduler.admit_fork(child)
        self._append(child, logits)

    # -- one new token ----------------------------------------------------------------

    def _append(self, seq: Sequence, logits: np.ndarray) -> None:
        params = seq.params
        banned = min_tokens_banned_ids(params, len(seq.output_token_ids), () if params.ignore_eos else self.eos_token_ids)
        token = self.sampler.sample(logits, params, seq.rng, banned, seq.prompt_token_ids, seq.output_token_ids)
        self._record_logprobs(seq, logits, token)
        seq.output_token_ids.append(token)
        self._count_token(seq.metrics, self.runner.timer.done(seq.group_id))
        detok = self._detok.get(seq.request_id)
        if detok is not None:
            seq.text += detok.add_tokens([token])
        self._check_stop(seq, token)
        if seq.is_finished:
            seq.metrics.npu_finished_time = self.runner.timer.done(seq.group_id)
            if detok is not None and not isinstance(seq.stop_reason, str):  # a stop string cut the text: drop what follows
                seq.text += detok.flush()
            self.scheduler.finish(seq)

    def _record_logprobs(self, seq: Sequence, logits: np.ndarray, token: int) -> None:
        """Cumulative log-probability (and the top ``logprobs``) when the request needs them."""
        params = seq.params
        if params.logprobs is None and params.num_samples == params.n:
            return
        logprobs = log_softmax(logits)
        seq.cumulative_logprob += float(logprobs[token])
        if params.logprobs is not None:
            seq.logprobs.append(self._logprob_dict(logprobs, token, params.logprobs))

    def _logprob_dict(self, logprobs: np.ndarray, token: int, k: int) -> dict[int, Logprob]:
        """``token``'s and the ``k`` most likely tokens' Logprobs at one position."""
        return {i: Logprob(lp, rank, self._token_text(i)) for i, (lp, rank) in top_logprobs(logprobs, token, k).items()}

    def _count_token(self, metrics: RequestMetrics, npu_time: float) -> None:
        """Count one generated token of a request, sampled at ``npu_time`` on the modelled
        clock (when its step left the last stage), in its metrics and the progress counter."""
        self.num_generated_tokens += 1
        now = time.time()
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        if metrics.npu_first_token_time is None:
            metrics.npu_first_token_time = npu_time

    def _token_text(self, token: int) -> str | None:
        """A logprob's ``decoded_token`` (None without a tokenizer, as vLLM leaves it undecoded)."""
        return None if self.tokenizer is None else self.tokenizer.decode([token], skip_special_tokens=False)

    def _check_stop(self, seq: Sequence, token: int) -> None:
        params = seq.params
        capped = len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len
        if len(seq.output_token_ids) < params.min_tokens:  # stops are ignored, lengths are not
            return seq.finish("length") if capped else None
        if token in (params.stop_token_ids or ()):
            return seq.finish("stop", token)
        if not params.ignore_eos and token in self.eos_token_ids:
            return seq.finish("stop")
        for stop in params.stop or ():
            index = seq.text.find(stop)
            if index >= 0:
                seq.text = seq.text[: index + (len(stop) if params.include_stop_str_in_output else 0)]
                return seq.finish("stop", stop)
        if capped:
            return seq.finish("length")

    # -- beam search --------------------------------------------------------------------

    def _step_beams(self, group: SequenceGroup) -> bool:
        """Advance a beam search by one token once the logits of every live beam are in
        (``BeamSearch.step``); False while some are still missing."""
        if any(seq.request_id not in self._beam_logits for seq in group.seqs):
            return False
        search = self.beams[group.request_id]
        logprobs = np.stack([log_softmax(self._beam_logits.pop(seq.request_id)) for seq in group.seqs])  # (beams, vocab)
        banned = min_tokens_banned_ids(group.params, len(group.seqs[0].output_token_ids), search.stop_ids)
        logprobs[:, [i for i in banned if i < logprobs.shape[1]]] = -np.inf  # as transformers' min_new_tokens does

        def entry(beam: int, token: int) -> dict[int, Logprob]:
            return self._logprob_dict(logprobs[beam], token, group.params.logprobs or 0)

        choices = search.step(group.seqs, logprobs, entry)
        group.seqs = self._next_beams(group, choices, entry)
        npu_time = self.runner.timer.done(group.request_id)
        self._count_token(group.metrics, npu_time)
        if search.done:
            for seq in group.seqs:
                self.scheduler.abort(seq)
            group.metrics.finished_time, group.metrics.npu_finished_time = time.time(), npu_time
        return True

    def _next_beams(self, group: SequenceGroup, choices: list[tuple[int, int]], entry: Callable[[int, int], dict[int, Logprob]]) -> list[Sequence]:
        """The live beams after a step: pruned parents free their blocks, a parent chosen
        once continues itself, one chosen again forks (shared full blocks, a copied partial
        last block), then every beam takes its token."""
        parents, chosen = group.seqs, {parent for parent, _ in choices}
        for index, seq in enumerate(parents):
            if index not in chosen:
                self.scheduler.abort(seq)
        beams: list[Sequence] = []
        continued: set[int] = set()
        for parent, _ in choices:
            beams.append(self._fork_beam(group, parents[parent]) if parent in continued else parents[parent])
            continued.add(parent)
        for beam, (parent, token) in zip(beams, choices):
            beam.logprobs.append(entry(parent, token))
            beam.cumulative_logprob += beam.logprobs[-1][token].logprob
            beam.output_token_ids.append(token)
        return beams

    def _fork_beam(self, group: SequenceGroup, parent: Sequence) -> Sequence:
        """A new beam continuing ``parent`` (before its next token); it shares ``parent``'s
        KV when there is room, else it is queued to compute its tokens itself."""
        child = Sequence(f"{group.request_id}#b{next(self._beam_keys)}", parent.prompt, parent.prompt_token_ids, parent.params,
                         None, parent.max_tokens, group_id=group.request_id, output_token_ids=list(parent.output_token_ids),
                         cumulative_logprob=parent.cumulative_logprob, logprobs=list(parent.logprobs), metrics=parent.metrics)  # fmt: skip
        if parent.status is Status.RUNNING and not parent.num_uncomputed and self.scheduler.can_fork(parent):
            self.runner.fork(parent, child)
            self.scheduler.admit_fork(child)
        else:
            self.scheduler.add(child)
        return child

    def _beam_output(self, group: SequenceGroup) -> RequestOutput | None:
        """A finished beam search's RequestOutput: its ``n`` best hypotheses, best first."""
        search = self.beams[group.request_id]
        if not search.done:
            return None
        del self.beams[group.request_id], self.groups[group.request_id]
        self.runner.timer.forget(group.request_id)
        completions = [self._hypothesis_output(i, h, group.params, search.stop_ids) for i, h in enumerate(search.best(group.params.n))]
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, True, group.metrics,
                             self._prompt_logprobs(group))  # fmt: skip

    def _hypothesis_output(self, index: int, hyp: Hypothesis, params: SamplingParams, stop_ids: set[int]) -> CompletionOutput:
        last = hyp.token_ids[-1]
        text = self.tokenizer.decode(hyp.token_ids, params.skip_special_tokens) if self.tokenizer is not None else ""
        return CompletionOutput(
            index, text, hyp.token_ids, hyp.cumulative_logprob, hyp.logprobs if params.logprobs is not None else None,
            finish_reason="stop" if last in stop_ids else "length", stop_reason=last if last in (params.stop_token_ids or ()) else None,
        )  # fmt: skip

    # -- outputs ------------------------------------------------------------------------

    def _output(self, group: SequenceGroup) -> RequestOutput | None:
        """The group's RequestOutput as its ``output_kind`` asks, or None (FINAL_ONLY, running)."""
        if group.request_id in self.beams:
            return self._beam_output(group)
        finished = group.is_finished
        if group.params.output_kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        seqs = group.seqs
        if group.params.num_samples > group.params.n:  # best_of: the n most likely samples
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[: group.params.n]
        completions = [self._completion(seq) for seq in seqs]
        if finished:
            self.groups.pop(group.request_id, None)
            for seq in group.seqs:
                self._forget(seq)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions, finished, group.metrics,
                             self._prompt_logprobs(group), num_cached_tokens=group.seqs[0].num_cached_tokens)  # fmt: skip

    @staticmethod
    def _prompt_logprobs(group: SequenceGroup) -> list[dict[int, Logprob] | None] | None:
        return group.prompt_logprobs if group.params.prompt_logprobs is not None else None

    def _completion(self, seq: Sequence) -> CompletionOutput:
        delta = seq.params.output_kind is RequestOutputKind.DELTA
        tokens_sent, chars_sent, logprobs_sent = self._emitted[seq.request_id] if delta else (0, 0, 0)
        self._emitted[seq.request_id] = (len(seq.output_token_ids), len(seq.text), len(seq.logprobs))
        wants_logprobs = seq.params.logprobs is not None
        return CompletionOutput(
            seq.index, seq.text[chars_sent:], seq.output_token_ids[tokens_sent:],
            cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
            logprobs=seq.logprobs[logprobs_sent:] if wants_logprobs else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
        )  # fmt: skip

    def _forget(self, seq: Sequence) -> None:
        """Drop what the engine keeps of a sequence of an ended request."""
        self.runner.timer.forget(seq.group_id)
        self._detok.pop(seq.request_id, None)
        self._emitted.pop(seq.request_id, None)
        self._beam_logits.pop(seq.request_id, None)


def _artifact_tokenizer(files: ArtifactFiles) -> Tokenizer | None:
    """The artifact's tokenizer, built from manifest-checked bytes (unlisted files are never
    read); None when the artifact was built without tokenizer files."""
    return Tokenizer.from_files(files.read_if_listed, str(files.root)) if files.listed("tokenizer.json") else None
