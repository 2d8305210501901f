"""The OpenAI API's request and response bodies as pydantic models (vLLM's ``protocol.py``).

Requests are validated strictly from the JSON body: a string where a number belongs, a
float for ``n`` or ``true`` for ``max_tokens`` is refused, not coerced.  ``null`` means the
parameter's default, as OpenAI treats it.  Unknown fields are refused by name, so an
OpenAI parameter this server does not implement (``logit_bias``, ``tools``,
``response_format``, ``echo``, ...) fails with a 400 instead of being silently ignored.
vLLM's sampling extensions (``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``min_tokens``, ``stop_token_ids``, ...; the openai client sends them via ``extra_body``)
are accepted and map one to one onto ``SamplingParams``, beam search (``use_beam_search``,
``length_penalty``, ``early_stopping``) and ``prompt_logprobs`` included.

What one request may ask for is bounded where the cost grows with the number: ``n`` and
``best_of`` at OpenAI's 128 (the samples of one request run in the same steps, so a
huge ``n`` would hold the engine for hours, beyond the reach of an abort), ``logprobs``,
``top_logprobs`` and ``prompt_logprobs`` at vLLM's default ``max_logprobs`` of 20, and
``seed`` within int64, as vLLM bounds it.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from furiosa_runtime.engine.outputs import Logprob
from furiosa_runtime.engine.sampling_params import RequestOutputKind, SamplingParams

MAX_N = 128  # samples (or beams) of one request: OpenAI's limit
MAX_LOGPROBS = 20  # alternatives per token: vLLM's default max_logprobs, OpenAI's top_logprobs limit
INT64 = (-(2**63), 2**63 - 1)  # seed's range (vLLM's)
# apply_chat_template's own arguments, which the request or the server sets: a template
# variable of the same name would collide with them.
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "continue_final_message", "tokenize", "chat_template")

# -- requests ---------------------------------------------------------------------------


class OpenAIRequest(BaseModel):
    """Strict types, no unknown fields, and ``null`` for "the default"."""

    model_config = ConfigDict(extra="forbid", strict=True)
    # SamplingParams' name -> this request's, where an engine error's field is called otherwise here.
    engine_names: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class SamplingRequest(OpenAIRequest):
    """The parameters completions and chat completions share."""

    model: str
    n: int = Field(1, le=MAX_N)
    temperature: float | None = None  # OpenAI's 1.0; 0.0 with use_beam_search, which ranks raw log-probabilities
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the operator's logs; it changes nothing
    # vLLM's extensions
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:<id>", exact whatever the tokenizer
    use_beam_search: bool = False  # best_of (default n) beams, the n best returned
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    prompt_logprobs: int | None = Field(None, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _streams_have_no_final_only_results(self) -> SamplingRequest:
        """Beams and prompt logprobs come with the request's last output: refused when
        streaming rather than sent as one late chunk (vLLM refuses prompt_logprobs too)."""
        if self.stream and self.use_beam_search:
            raise ValueError("use_beam_search: cannot be streamed (the beams are known only when the search ends); "
                             "send stream=false")  # fmt: skip
        if self.stream and self.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: not available when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def sampling_temperature(self) -> float:
        """The temperature asked for, or the default: 1.0 (OpenAI's), 0.0 for beam search."""
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.use_beam_search else 1.0

    def sampling_params(self, max_tokens: int | None, logprobs: int | None, best_of: int | None = None) -> SamplingParams:
        """The engine's parameters for this request (SamplingParams checks every range):
        deltas when streaming, the finished outputs only otherwise."""
        return SamplingParams(
            n=self.n, best_of=best_of, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, temperature=self.sampling_temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, seed=self.seed, use_beam_search=self.use_beam_search,
            length_penalty=self.length_penalty, early_stopping=self.early_stopping, stop=self.stop,
            stop_token_ids=self.stop_token_ids, include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )  # fmt: skip


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: one prompt or several (texts or token ids)."""

    engine_names: ClassVar[dict[str, str]] = {"prompt_token_ids": "prompt"}

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    logprobs: int | None = Field(None, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, le=MAX_N)


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``: a conversation rendered with the chat template."""

    engine_names: ClassVar[dict[str, str]] = {"best_of": "n", "logprobs": "top_logprobs"}  # logprobs is a bool here

    messages: list[dict[str, Any]]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, le=MAX_LOGPROBS)
    # vLLM's chat template extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only allowed when logprobs is true")
        return self

    @model_validator(mode="after")
    def _template_kwargs_are_variables(self) -> ChatCompletionRequest:
        """Refuse keys that are apply_chat_template's own arguments (they would collide)."""
        taken = sorted(set(self.chat_template_kwargs or ()) & set(RESERVED_TEMPLATE_KWARGS))
        if taken:
            raise ValueError(f"chat_template_kwargs: {', '.join(taken)} cannot be set here: the request's fields and "
                             f"the server set {', '.join(RESERVED_TEMPLATE_KWARGS)}")  # fmt: skip
        return self


class EmbeddingRequest(OpenAIRequest):
    """``POST /v1/embeddings``: one input or several (texts or token ids)."""

    engine_names: ClassVar[dict[str, str]] = {"prompt": "input", "prompt_token_ids": "input"}

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


# -- responses --------------------------------------------------------------------------


class OpenAIResponse(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorInfo(OpenAIResponse):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIResponse):
    """The body of every error: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorInfo


class UsageInfo(OpenAIResponse):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


class ModelCard(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "furiosa_runtime"
    root: str
    max_model_len: int


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(OpenAIResponse):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


# vLLM's prompt logprobs: one entry per prompt position, None for the first (nothing
# predicts it), else token id -> logprob, rank and decoded token.
PromptLogprobs = list[dict[int, Logprob] | None]


class CompletionChoice(OpenAIResponse):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # its prompt's (vLLM repeats them on each of a prompt's choices)


class CompletionResponse(OpenAIResponse):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(OpenAIResponse):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(OpenAIResponse):
    content: list[ChatLogprob]


class ChatMessage(OpenAIResponse):
    role: str
    content: str


class ChatChoice(OpenAIResponse):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIResponse):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(OpenAIResponse):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(OpenAIResponse):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(OpenAIResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class EmbeddingData(OpenAIResponse):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # a base64 string of little-endian float32 with encoding_format="base64"


class EmbeddingResponse(OpenAIResponse):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: UsageInfo
