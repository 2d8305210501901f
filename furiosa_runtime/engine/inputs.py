"""Prompt inputs the vLLM way: a string, ``{"prompt": ...}``, ``{"prompt_token_ids": ...}``
or a list of token ids, turned into ``(text or None, token ids)``.

Without a tokenizer (an artifact built without tokenizer files) only token-id prompts
parse; a text is refused in one line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Integral
from typing import Any, NotRequired, TypedDict

from furiosa_runtime.engine.tokenizer import Tokenizer, require_tokenizer


class TextPrompt(TypedDict):
    """A text prompt, tokenized by the artifact's tokenizer (vLLM's ``TextPrompt``)."""

    prompt: str


class TokensPrompt(TypedDict):
    """A prompt given as token ids, with the text it stands for if known (vLLM's ``TokensPrompt``)."""

    prompt_token_ids: list[int]
    prompt: NotRequired[str]


PromptType = str | TextPrompt | TokensPrompt | dict[str, Any] | list[int]

# Keys a dict prompt may have; vLLM's others (multi_modal_data, ...) are refused, not ignored.
PROMPT_KEYS = ("prompt", "prompt_token_ids")
_FORMS = "use a str, a list of token ids, or a dict with 'prompt' or 'prompt_token_ids'"


def parse_prompt(prompt: PromptType, tokenizer: Tokenizer | None, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
    """The prompt text (None for token-id prompts) and its token ids."""
    if isinstance(prompt, str):
        return prompt, require_tokenizer(tokenizer, "prompt").encode(prompt, add_special_tokens=add_special_tokens)
    if isinstance(prompt, dict):
        return _parse_dict(prompt, tokenizer, add_special_tokens)
    if isinstance(prompt, list):
        return None, _token_ids(prompt)
    raise ValueError(f"prompt: unsupported prompt {_show(prompt)}; {_FORMS}")


def _parse_dict(prompt: dict[str, Any], tokenizer: Tokenizer | None, add_special_tokens: bool) -> tuple[str | None, list[int]]:
    """``{"prompt_token_ids": ...}`` (with an optional ``"prompt"`` text) or ``{"prompt": ...}``."""
    unknown = sorted(str(key) for key in prompt if key not in PROMPT_KEYS)
    if unknown:
        raise ValueError(f"prompt: not supported yet: key(s) {', '.join(unknown)} (allowed: {', '.join(PROMPT_KEYS)})")
    text = prompt.get("prompt")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"prompt: the 'prompt' of a dict prompt must be a str, got {_show(text)}")
    if "prompt_token_ids" in prompt:
        return text, _token_ids(prompt["prompt_token_ids"])
    if text is None:
        raise ValueError(f"prompt: unsupported prompt {_show(prompt)}; {_FORMS}")
    return text, require_tokenizer(tokenizer, "prompt").encode(text, add_special_tokens=add_special_tokens)


def check_token_ids(ids: list[int], num_rows: int) -> None:
    """Refuse ids the model's embedding has no row for (``num_rows``: its real row count)."""
    outside = [t for t in ids if not 0 <= t < num_rows]
    if outside:
        raise ValueError(f"prompt_token_ids: every id must be in [0, {num_rows}), got {outside[0]}")


def is_single_prompt(prompts: PromptType | Sequence[PromptType]) -> bool:
    """True for one prompt (a string, a dict, or a flat list of token ids)."""
    return isinstance(prompts, str | dict) or (isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], Integral))


def batch_prompts(prompts: PromptType | Iterable[PromptType], name: str = "prompts") -> list[PromptType]:
    """One prompt or an iterable of prompts as a list of prompts.

    Anything else (a number, bytes, None) is refused here, naming the argument ``name``:
    iterating bytes would yield ints and the error would name a byte instead.
    """
    if is_single_prompt(prompts):
        return [prompts]  # type: ignore[list-item]
    if isinstance(prompts, bytes | bytearray) or not isinstance(prompts, Iterable):
        raise ValueError(f"{name}: must be a prompt or a list of prompts ({_FORMS}), got {_show(prompts)}")
    return list(prompts)


def single_prompt(prompt: Any, name: str = "prompt") -> PromptType:
    """``prompt`` itself if it is one prompt; a list of prompts or anything else is refused
    (wrapping a bare int in a list would turn it into a token-id prompt)."""
    if not is_single_prompt(prompt):
        raise ValueError(f"{name}: must be one prompt ({_FORMS}), got {_show(prompt)}")
    return prompt


def _token_ids(ids: Any) -> list[int]:
    """Plain ints; NumPy integers are accepted too (token ids often come from arrays)."""
    if isinstance(ids, str | bytes | dict) or not isinstance(ids, Iterable):
        raise ValueError(f"prompt_token_ids: must be a list of integers, got {_show(ids)}")
    ids = list(ids)
    if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in ids):
        raise ValueError("prompt_token_ids: must be a list of integers")
    return [int(t) for t in ids]


def _show(value: Any, limit: int = 60) -> str:
    """A short repr for error messages (a long prompt must not flood the one line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"
