"""Request validation errors shared by the engines and the OpenAI-style front ends.

The messages follow the wording clients already know from OpenAI and vLLM, so that a
caller who hits the context limit can tell at a glance which number to shrink.
"""

from __future__ import annotations

__all__ = ["ContextLengthExceededError", "validate_context_length", "validate_min_tokens"]


class ContextLengthExceededError(ValueError):
    """The prompt, or the prompt plus the requested completion, does not fit the model.

    A `ValueError` subclass so that code written against vLLM (which raises plain
    `ValueError`) keeps working; the attributes let servers build structured replies.
    """

    def __init__(
        self,
        message: str,
        *,
        max_model_len: int,
        prompt_tokens: int,
        max_completion_tokens: int | None,
    ) -> None:
        super().__init__(message)
        self.max_model_len = max_model_len
        self.prompt_tokens = prompt_tokens
        self.max_completion_tokens = max_completion_tokens


def validate_context_length(
    max_model_len: int,
    prompt_tokens: int,
    max_completion_tokens: int | None,
) -> None:
    """Raise `ContextLengthExceededError` unless the request fits in `max_model_len`.

    `max_completion_tokens=None` means "generate until the context is full", so only the
    prompt is checked; it must still leave room for at least one generated token.
    """
    if prompt_tokens > max_model_len or (
        max_completion_tokens is None and prompt_tokens >= max_model_len
    ):
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. "
            f"However, your prompt is {prompt_tokens} tokens, which leaves no room for "
            "a completion. Please reduce the length of the messages.",
            max_model_len=max_model_len,
            prompt_tokens=prompt_tokens,
            max_completion_tokens=max_completion_tokens,
        )
    if max_completion_tokens is None:
        return
    total = prompt_tokens + max_completion_tokens
    if total > max_model_len:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {max_model_len} tokens. "
            f"However, you requested {total} tokens ({prompt_tokens} in the messages, "
            f"{max_completion_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            max_model_len=max_model_len,
            prompt_tokens=prompt_tokens,
            max_completion_tokens=max_completion_tokens,
        )


def validate_min_tokens(max_model_len: int, prompt_tokens: int, min_tokens: int) -> None:
    """Raise `ContextLengthExceededError` when ``min_tokens`` cannot fit after the prompt.

    Only needed with ``max_tokens=None`` (otherwise ``min_tokens <= max_tokens`` and the
    context-length check cover it): a request that must generate more tokens than the
    context leaves could never finish.
    """
    room = max_model_len - prompt_tokens
    if min_tokens > room:
        raise ContextLengthExceededError(
            f"min_tokens must be <= the {room} tokens this model's maximum context length of "
            f"{max_model_len} leaves after the {prompt_tokens}-token prompt, got {min_tokens}.",
            max_model_len=max_model_len,
            prompt_tokens=prompt_tokens,
            max_completion_tokens=min_tokens,
        )
