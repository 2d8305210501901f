"""``LLM``: load an artifact and generate, the vLLM way."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from furiosa_runtime.artifact import SchedulerConfig
from furiosa_runtime.engine import EngineCore
from furiosa_runtime.hardware import parse_devices
from furiosa_runtime.outputs import RequestOutput
from furiosa_runtime.sampling_params import SamplingParams

PromptInput = str | dict[str, Any] | list[int]


class LLM:
    """An artifact running on the simulated NPU.

    ``LLM("artifacts/smollm2-135m-instruct").generate("Hello", SamplingParams(max_tokens=8))``
    """

    def __init__(
        self,
        model_id_or_path: str | Path,
        *,
        devices: str | None = None,
        seed: int | None = None,
        scheduler_config: SchedulerConfig | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(kwargs)
        if unknown:
            raise ValueError(f"LLM: unsupported argument(s) {', '.join(unknown)}")
        if devices is not None:
            parse_devices(devices)
        self.engine = EngineCore(model_id_or_path, seed=seed, scheduler_config=scheduler_config)
        self.tokenizer = self.engine.tokenizer
        self.model_id_or_path = str(model_id_or_path)
        self._counter = 0

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def generate(
        self,
        prompts: PromptInput | Seq[PromptInput] | None = None,
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate completions for every prompt; outputs come back in prompt order."""
        requests = self._normalise(prompts, prompt_token_ids)
        params = sampling_params if isinstance(sampling_params, Seq) else [sampling_params or SamplingParams()] * len(requests)
        if len(params) != len(requests):
            raise ValueError(f"sampling_params: got {len(params)} for {len(requests)} prompts")
        ids = []
        for (text, tokens), p in zip(requests, params):
            request_id = str(self._counter)
            self._counter += 1
            self.engine.add_request(request_id, text, tokens, p)
            ids.append(request_id)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]], sampling_params: SamplingParams | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template, then generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        # The template already places the special tokens, so the tokenizer must not add more.
        prompts = [{"prompt": t, "prompt_token_ids": self.tokenizer.encode(t, add_special_tokens=False)} for t in texts]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _normalise(self, prompts, prompt_token_ids) -> list[tuple[str | None, list[int]]]:
        if prompts is None:
            if prompt_token_ids is None:
                raise ValueError("generate: give prompts or prompt_token_ids")
            return [(None, list(t)) for t in prompt_token_ids]
        if isinstance(prompts, str) or isinstance(prompts, dict) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        out = []
        for prompt in prompts:
            if isinstance(prompt, str):
                out.append((prompt, self.tokenizer.encode(prompt)))
            elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
                out.append((prompt.get("prompt"), list(prompt["prompt_token_ids"])))
            elif isinstance(prompt, dict) and "prompt" in prompt:
                out.append((prompt["prompt"], self.tokenizer.encode(prompt["prompt"])))
            elif isinstance(prompt, list):
                out.append((None, list(prompt)))
            else:
                raise ValueError(f"prompts: unsupported prompt {prompt!r}; use str, token ids or a dict")
        return out

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in ids]
