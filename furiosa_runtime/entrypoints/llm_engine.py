"""``LLMEngine``: vLLM's request-level engine API over an ``EngineCore``.

    engine = LLMEngine.from_engine_args(EngineArgs(model="artifacts/tiny-llama"))
    engine.add_request("a", "Hello", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for output in engine.step():
            ...

Unlike furiosa-llm, whose native engine generates in a background thread, the simulator
runs when ``step`` is called: each call runs scheduler steps until at least one request
has new output (or nothing is left), and returns those outputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from furiosa_runtime.engine.core import EngineCore
from furiosa_runtime.engine.inputs import PromptType, parse_prompt
from furiosa_runtime.engine.outputs import RequestOutput
from furiosa_runtime.engine.sampling_params import SamplingParams
from furiosa_runtime.engine.tokenizer import Tokenizer, require_tokenizer
from furiosa_runtime.entrypoints.engine_args import EngineArgs
from furiosa_runtime.entrypoints.llm import LLM

GENERATION_TASKS = ("generate",)


class LLMEngineBase:
    """Request-id bookkeeping and prompt preparation shared by the sync and async engines."""

    def __init__(
        self,
        native_engine: EngineCore,
        tokenizer: Tokenizer | None,  # None: an artifact without tokenizer files (token-id prompts only)
        task_type: str,
        max_model_len: int,
        llm: LLM | None = None,  # keeps the LLM (and its engine) alive
        model_path: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.native_engine = native_engine
        self._tokenizer = tokenizer
        self.task_type = task_type
        self.max_model_len = max_model_len
        self._llm = llm
        self.model_path = model_path or (llm.model_id_or_path if llm is not None else None)
        self.trust_remote_code = trust_remote_code
        self.request_ids: set[str] = set()

    @classmethod
    def from_llm(cls, llm: LLM) -> Any:
        """An engine sharing ``llm``'s loaded artifact."""
        return cls(llm.engine, llm.engine.tokenizer, llm.model_metadata.task, llm.max_model_len, llm=llm,
                   trust_remote_code=bool(llm.model_metadata.trust_remote_code))  # fmt: skip

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> Any:
        """Load the artifact ``args.model`` with the scheduler and device settings of ``args``."""
        if not isinstance(args, EngineArgs):
            raise ValueError(f"engine_args must be an EngineArgs (e.g. EngineArgs(model=...)), got {type(args).__name__}")
        return cls.from_llm(args.create_llm())

    def get_tokenizer(self) -> Tokenizer:
        """The tokenizer in use; a one-line ValueError when the artifact has none."""
        return require_tokenizer(self._tokenizer, "tokenizer")

    @property
    def tokenizer(self) -> Tokenizer:
        return self.get_tokenizer()

    def try_add_request_id(self, request_id: str) -> None:
        """Register a new id; a non-string or duplicate id is a ValueError."""
        if not isinstance(request_id, str):
            raise ValueError(f"Request ID {request_id!r} must be a string.")
        if request_id in self.request_ids:
            raise ValueError(f"Request ID {request_id} already exist in the engine.")
        self.request_ids.add(request_id)

    def try_remove_request_id(self, request_id: str) -> None:
        self.request_ids.discard(request_id)

    def _prepare(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Tokenize (no special tokens added: chat templates already place them, as in
        furiosa-llm) and check the request against the model's lengths."""
        if self.task_type not in GENERATION_TASKS:
            raise ValueError("The model does not support text generation tasks.")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"Unsupported sampling parameters type: {type(params).__name__}. Expected SamplingParams.")
        text, token_ids = parse_prompt(prompt, self._tokenizer, add_special_tokens=False)
        self.native_engine.validate_request(token_ids, params)
        return text, token_ids


class LLMEngine(LLMEngineBase):
    """Add requests, then call ``step`` to advance them; vLLM's ``LLMEngine`` surface."""

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        """Abort every request this engine still tracks."""
        self.abort_request(list(self.request_ids))

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams) -> None:
        """Queue a request; it advances with each ``step``."""
        self.try_add_request_id(request_id)
        try:
            text, token_ids = self._prepare(prompt, params)
            self.native_engine.add_request(request_id, text, token_ids, params)
        except Exception:
            self.try_remove_request_id(request_id)
            raise

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        """Abort one request or several; unknown ids are ignored."""
        if not isinstance(request_id, str | Iterable):
            raise ValueError(f"request_id: must be a string or an iterable of strings, got {request_id!r}")
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            self.native_engine.abort_request(rid)
            self.try_remove_request_id(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.request_ids)

    def step(self) -> list[RequestOutput]:
        """Outputs of the requests that advanced, after at least one had something new."""
        while self.native_engine.has_unfinished_requests():
            outputs = [o for o in self.native_engine.step() if o.request_id in self.request_ids]
            for output in outputs:
                if output.finished:
                    self.try_remove_request_id(output.request_id)
            if outputs:
                return outputs
        return []
