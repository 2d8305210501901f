"""``LLM``: load an artifact and generate, the vLLM way."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from functools import cached_property
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from furiosa_runtime.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from furiosa_runtime.engine.core import EngineCore
from furiosa_runtime.engine.inputs import PromptType, batch_prompts, parse_prompt
from furiosa_runtime.engine.jit import JitConfig
from furiosa_runtime.engine.outputs import CompletionOutput, RequestOutput
from furiosa_runtime.engine.pooling import Embedder, EmbeddingRequestOutput, PoolingRequestOutput, require_task
from furiosa_runtime.engine.sampling_params import RequestOutputKind, SamplingParams
from furiosa_runtime.engine.tokenizer import Tokenizer, require_tokenizer, validate_messages
from furiosa_runtime.entrypoints.arg_checks import (
    check_bool,
    check_devices,
    check_int,
    check_jit,
    check_path,
    check_seed,
)
from furiosa_runtime.npu.artifact import SchedulerConfig

TOKENIZER_MODES = ("auto", "slow")


class LLM:
    """An artifact running on the simulated NPU.

    ``LLM("artifacts/smollm2-135m-instruct").generate("Hello", SamplingParams(max_tokens=8))``

    The keyword arguments are furiosa-llm's.  ``devices``, ``pipeline_parallel_size`` and
    ``data_parallel_size`` lay the artifact out on the simulated PEs at load (tensor
    parallelism is fixed by the build; a blockwise artifact may be re-staged; replicas fill
    the remaining PEs when ``data_parallel_size`` is None); ``scheduler_config`` replaces
    the artifact's scheduler config; ``tokenizer`` names a tokenizer folder to use instead
    of the artifact's (an artifact built without tokenizer files takes token-id prompts
    only, see ``engine.py``).  ``weight_cache_bytes`` bounds the float32 copies of bf16
    weights the simulator keeps (None: what fits this machine, see
    ``NPUSimulator.default_weight_cache_bytes``; 0 widens on every use); outputs do not
    depend on it.  ``enable_prefix_caching`` (on by default, as in furiosa-llm and vLLM)
    keeps the KV blocks of finished prompts and reuses them for later prompts that start
    with the same tokens; outputs do not depend on it.  ``enable_jit_compilation`` compiles,
    in background processes, the prefill buckets the traffic asks for (``jit_threshold``
    prompts a missing bucket would serve better, its attention rounded up to a multiple of
    ``jit_unit_size``, at most ``jit_max_workers`` compiling at once, through the compile
    cache at ``cache_dir``) and records them beside the artifact; see ``engine/jit.py``.
    Settings the simulator cannot honour (a Hub revision) are refused with a ValueError
    rather than ignored, and every argument's type and range is checked before the artifact
    is read (one line naming the argument).
    """

    def __init__(
        self,
        model_id_or_path: str | Path,
        *,
        revision: str | None = None,
        pipeline_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        tokenizer: str | Path | None = None,
        tokenizer_mode: str = "auto",
        seed: int | None = None,
        devices: str | None = None,
        cache_dir: str | Path | None = None,
        scheduler_config: SchedulerConfig | None = None,
        enable_jit_compilation: bool = False,
        jit_threshold: int | None = None,
        jit_max_workers: int | None = None,
        jit_unit_size: int | None = None,
        weight_cache_bytes: int | None = None,
        enable_prefix_caching: bool = True,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(kwargs)
        if unknown:
            raise ValueError(f"LLM: unsupported argument(s) {', '.join(unknown)}")
        _check_load_args(model_id_or_path, tokenizer, cache_dir, seed, devices, scheduler_config)
        check_int("pipeline_parallel_size", pipeline_parallel_size, 1, optional=True)
        check_int("data_parallel_size", data_parallel_size, 1, optional=True)
        check_int("weight_cache_bytes", weight_cache_bytes, 0, optional=True)
        check_jit(jit_threshold, jit_max_workers, jit_unit_size, optional=True)
        check_bool("enable_jit_compilation", enable_jit_compilation)
        check_bool("enable_prefix_caching", enable_prefix_caching)
        _refuse(revision is not None, "revision", "artifacts are local folders; leave revision unset", revision)
        _refuse(tokenizer_mode not in TOKENIZER_MODES, "tokenizer_mode", "one of auto, slow", tokenizer_mode)
        self.engine = EngineCore(
            model_id_or_path, seed=seed, scheduler_config=scheduler_config, tokenizer=tokenizer,
            devices=devices, pipeline_parallel_size=pipeline_parallel_size, data_parallel_size=data_parallel_size,
            weight_cache_bytes=weight_cache_bytes, enable_prefix_caching=enable_prefix_caching,
            jit=_jit_config(jit_threshold, jit_max_workers, jit_unit_size, cache_dir) if enable_jit_compilation else None,
        )  # fmt: skip
        self.model_id_or_path = str(model_id_or_path)
        self.model_metadata = self.engine.artifact.model_metadata
        self.cache_dir = cache_dir
        self._counter = 0

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Abort whatever is still queued; the LLM stays usable for new requests."""
        for request_id in list(self.engine.groups):
            self.engine.abort_request(request_id)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_tokenizer(self) -> Tokenizer:
        """The tokenizer in use; a one-line ValueError when the artifact has none."""
        return require_tokenizer(self.engine.tokenizer, "tokenizer")

    @property
    def tokenizer(self) -> Tokenizer:
        return self.get_tokenizer()

    def generate(
        self,
        prompts: PromptType | Seq[PromptType] | None = None,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate completions for every prompt; outputs come back in prompt order.

        ``prompts`` is one prompt or a list (strings, token-id lists, ``{"prompt": ...}`` or
        ``{"prompt_token_ids": ...}`` dicts); ``sampling_params`` one for all or one each.
        Every request is validated before any runs, so a bad one fails the call cleanly.
        """
        require_task(self.engine.artifact, "generate", "LLM.generate")
        requests = self._parse(prompts, prompt_token_ids)
        params = _final_only(_per_prompt(sampling_params, len(requests)))
        for (_, tokens), p in zip(requests, params):
            self.engine.validate_request(tokens, p)
        ids: list[str] = []
        try:
            for (text, tokens), p in zip(requests, params):
                request_id = str(self._counter)
                self._counter += 1
                self.engine.add_request(request_id, text, tokens, p)
                ids.append(request_id)
            return self._run(ids, use_tqdm)
        except BaseException:  # a failed step or Ctrl-C: drop this call's requests, keep the LLM usable
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise

    def beam_search(self, prompts: PromptType | Seq[PromptType], params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: the ``beam_width`` best beams of every prompt, best first,
        ranked as transformers' ``generate(num_beams=beam_width)`` ranks them; each sequence's
        ``tokens`` and ``text`` include the prompt's."""
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"params: must be a BeamSearchParams, got {type(params).__name__}")
        sampling = SamplingParams(
            n=params.beam_width, best_of=params.beam_width, use_beam_search=True, temperature=params.temperature,
            max_tokens=params.max_tokens, ignore_eos=params.ignore_eos, length_penalty=params.length_penalty,
            early_stopping=params.early_stopping, logprobs=2 * params.beam_width, skip_special_tokens=False,
        )  # fmt: skip
        outputs = self.generate(prompts, sampling, use_tqdm=use_tqdm)
        return [BeamSearchOutput([self._beam_sequence(out.prompt_token_ids or [], c) for c in out.outputs]) for out in outputs]

    def _beam_sequence(self, prompt_token_ids: list[int], completion: CompletionOutput) -> BeamSearchSequence:
        tokens = [*prompt_token_ids, *completion.token_ids]
        text = self.engine.tokenizer.decode(tokens) if self.engine.tokenizer is not None else None
        return BeamSearchSequence(tokens, completion.logprobs or [], completion.cumulative_logprob or 0.0, text,
                                  completion.finish_reason, completion.stop_reason)  # fmt: skip

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template (the tokenizer's, or ``chat_template`` as in vLLM), then generate.

        ``messages`` is one conversation (a list of ``{"role", "content"}`` dicts) or a list of them.
        """
        tokenizer = require_tokenizer(self.engine.tokenizer, "messages")
        conversations = _conversations(messages)
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, chat_template=chat_template) for c in conversations]
        # The template already places the special tokens, so the tokenizer must not add more.
        prompts = [{"prompt": t, "prompt_token_ids": tokenizer.encode(t, add_special_tokens=False)} for t in texts]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def embed(self, prompts: PromptType | Seq[PromptType], use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        """vLLM's ``LLM.embed``: one embedding (``.outputs.embedding``, a list of floats) per prompt,
        pooled as the artifact's pooling config says; needs an artifact built with model.task=embed."""
        return [EmbeddingRequestOutput.from_base(o) for o in self.encode(prompts, use_tqdm=use_tqdm)]

    def encode(self, prompts: PromptType | Seq[PromptType], use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        """vLLM's ``LLM.encode``: the pooled vector of every prompt as an array (``.outputs.data``)."""
        embedder = self._embedder  # refuses a generation artifact first
        return embedder.encode(batch_prompts(prompts), use_tqdm=use_tqdm)

    @cached_property
    def _embedder(self) -> Embedder:
        """Runs pooling models on this LLM's simulator, KV blocks and tokenizer (built on first use)."""
        require_task(self.engine.artifact, "embed", "LLM.embed/encode")
        return Embedder.of(self.engine)

    def _parse(self, prompts: PromptType | Seq[PromptType] | None, prompt_token_ids: list[int] | list[list[int]] | None) -> list[tuple[str | None, list[int]]]:
        """(text, token ids) of every prompt; the legacy ``prompt_token_ids`` is one id list or a list of them."""
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("generate: give prompts or prompt_token_ids, not both")
        if prompts is None:
            if prompt_token_ids is None:
                raise ValueError("generate: give prompts or prompt_token_ids")
            batch = batch_prompts(prompt_token_ids, "prompt_token_ids")
            if any(isinstance(ids, str | dict) for ids in batch):
                raise ValueError("prompt_token_ids: must be a list of token ids or a list of such lists")
            prompts = [{"prompt_token_ids": ids} for ids in batch]
        return [parse_prompt(p, self.engine.tokenizer) for p in batch_prompts(prompts)]

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step the engine until every request in ``ids`` finishes.

        The progress bar counts generated tokens out of every sequence's ``max_tokens``
        (a request that stops early takes its unused budget off the total), with the
        finished requests in its postfix.
        """
        finished: dict[str, RequestOutput] = {}
        budget = {i: sum(seq.max_tokens for seq in self.engine.groups[i].seqs) for i in ids}
        with tqdm(total=sum(budget.values()), desc="generate", unit="tok", disable=not use_tqdm) as bar:
            while len(finished) < len(ids):
                generated = self.engine.num_generated_tokens
                outputs = self.engine.step()
                bar.update(self.engine.num_generated_tokens - generated)
                for output in outputs:
                    if output.finished:
                        finished[output.request_id] = output
                        bar.total -= budget[output.request_id] - sum(len(c.token_ids) for c in output.outputs)
                        bar.set_postfix_str(f"{len(finished)}/{len(ids)} requests", refresh=False)
                bar.refresh()
        return [finished[i] for i in ids]


def _per_prompt(sampling_params: object, count: int) -> list[SamplingParams]:
    """One SamplingParams for every prompt: the same one for all, or a list of one each."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * count
    if not isinstance(sampling_params, Seq) or isinstance(sampling_params, str):
        raise ValueError(f"sampling_params: must be a SamplingParams or a list of them, got {type(sampling_params).__name__}")
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"sampling_params: got {len(params)} for {count} prompts")
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"sampling_params[{i}]: must be a SamplingParams, got {type(p).__name__}")
    return params


def _final_only(params: list[SamplingParams]) -> list[SamplingParams]:
    """The params with ``output_kind=FINAL_ONLY``, as vLLM's ``LLM`` runs every request:
    only finished outputs are returned, so a DELTA request would yield just its last delta.
    Changed on copies (one per distinct object), so the caller's params stay as they were."""
    copies: dict[int, SamplingParams] = {}
    for p in params:
        if p.output_kind is not RequestOutputKind.FINAL_ONLY and id(p) not in copies:
            copies[id(p)] = p.clone()
            copies[id(p)].output_kind = RequestOutputKind.FINAL_ONLY
    return [copies.get(id(p), p) for p in params]


def _conversations(messages: object) -> list[list[dict[str, Any]]]:
    """One conversation or a list of them, as a list of checked, non-empty conversations."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages: must be a non-empty list of {'role': ..., 'content': ...} dicts, or a list of such lists, "
                         f"got {messages!r:.60}")  # fmt: skip
    if not isinstance(messages[0], list | tuple):
        validate_messages(messages)
        return [list(messages)]  # type: ignore[arg-type]
    for i, conversation in enumerate(messages):
        if not isinstance(conversation, list | tuple) or not conversation:
            raise ValueError(f"messages[{i}]: every conversation must be a non-empty list of messages, got {conversation!r:.60}")
        validate_messages(conversation, f"messages[{i}]")
    return [list(c) for c in messages]


def _check_load_args(model: object, tokenizer: object, cache_dir: object, seed: object, devices: object, scheduler_config: object) -> None:
    """Types of the load arguments, checked before the artifact is read (one line each)."""
    check_path("model_id_or_path", model)
    check_path("tokenizer", tokenizer, optional=True)
    check_path("cache_dir", cache_dir, optional=True)
    check_seed(seed)
    check_devices(devices)
    if scheduler_config is not None and not isinstance(scheduler_config, SchedulerConfig):
        raise ValueError(f"scheduler_config must be None or a SchedulerConfig, got {type(scheduler_config).__name__}")


def _jit_config(threshold: int | None, max_workers: int | None, unit_size: int | None, cache_dir: str | Path | None) -> JitConfig:
    """The JIT settings given, with furiosa-llm's defaults for those left None."""
    given = {"threshold": threshold, "max_workers": max_workers, "unit_size": unit_size,
             "cache_dir": Path(cache_dir).expanduser() if cache_dir is not None else None}  # fmt: skip
    return JitConfig(**{name: value for name, value in given.items() if value is not None})


def _refuse(bad: bool, name: str, allowed: str, value: object) -> None:
    if bad:
        raise ValueError(f"{name}: not supported yet (allowed: {allowed}), got {value!r}")
